// `queue-mailer doctor` with TRANSPORT=graph (its own local stack with the Microsoft Graph mail
// double): the token must be for Graph and carry Mail.Send, and step transport is the Graph
// transport's own verify(), which proves Mail.Send on the mailbox without sending. Graph's refusals
// (an application access policy, an unknown mailbox, SendAs) are produced by the double and must
// name the step and the Exchange or portal fix.
import assert from "node:assert/strict";
import { beforeEach, describe, it } from "node:test";
import { LOCAL_CLIENT_ID, LOCAL_MAILBOX } from "../cli/local/localStack.js";
import { assertFails, doctorRunner, JWT } from "./support/doctorRun.js";
import { useLocalStack } from "./support/harness.js";

const outputs: string[] = [];

const doctor = doctorRunner(outputs);

describe("queue-mailer doctor, TRANSPORT=graph", () => {
  const local = useLocalStack("qm-doctor-graph-", { transport: "graph" });
  const graph = () => {
    assert.ok(local.stack.graph, "the stack serves Graph");
    return local.stack.graph;
  };

  beforeEach(() => {
    graph().restrictTo(undefined);
    graph().messages.length = 0;
    local.stack.smtp.resetStats();
  });

  it("a healthy setup: a Graph token with Mail.Send, verify() without sending, and a test message", async () => {
    const run = await doctor(local.stack.env, { sendTest: "someone@example.test" });
    assert.equal(run.report.ok, true, run.text);
    assert.match(run.check("token-contents").message, /aud https:\/\/graph\.microsoft\.com.*roles Mail\.Send/);
    assert.match(run.check("transport").message, /Mail\.Send as mailer@contoso\.test/);
    assert.equal(graph().messages.length, 1, "only the test message was sent");
    assert.equal(local.stack.smtp.stats.connections, 0, "SMTP is not used with TRANSPORT=graph");
  });

  it("an application access policy that leaves the mailbox out: Test-ApplicationAccessPolicy with the ids", async () => {
    graph().restrictTo(["someone-else@contoso.test"]);
    const check = assertFails(await doctor(local.stack.env), "transport", "GRAPH_ACCESS_DENIED");
    assert.ok((check.fix ?? "").includes(`Test-ApplicationAccessPolicy -Identity "${LOCAL_MAILBOX}" -AppId ${LOCAL_CLIENT_ID}`), check.fix ?? "");
    assert.equal(graph().messages.length, 0);
  });

  it("a token for Exchange instead of Graph fails at token-contents with the Graph scope to set", async () => {
    const run = await doctor({ ...local.stack.env, TOKEN_SCOPE: local.stack.oauth.scope });
    const check = assertFails(run, "token-contents", "TOKEN_AUDIENCE_WRONG");
    assert.match(check.fix ?? "", /set it to https:\/\/graph\.microsoft\.com\/\.default/);
    assert.equal(run.check("transport").status, "skip");
  });

  it("From another address: Graph's SendAsDenied gets the Add-RecipientPermission fix", async () => {
    const check = assertFails(await doctor({ ...local.stack.env, MAIL_FROM: "billing@contoso.test" }, { sendTest: "customer@example.test" }), "send-test", "GRAPH_SEND_AS_DENIED");
    assert.ok((check.fix ?? "").includes(`Add-RecipientPermission -Identity "billing@contoso.test" -Trustee "${LOCAL_MAILBOX}" -AccessRights SendAs`), check.fix ?? "");
  });

  it("no output holds a token", () => {
    assert.ok(outputs.length > 8);
    for (const text of outputs) assert.doesNotMatch(text, JWT);
  });
});
