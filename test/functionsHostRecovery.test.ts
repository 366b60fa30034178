// functions/sendEmail.ts recovering from a broken setup, as the Functions host drives it: nothing
// probes between invocations there, so each probe an invocation makes must end the circuit's
// probe (open again, back off, or close). Its own file, so the process-wide mailer starts with the
// broken certificate.
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import functionsModule, { type InvocationContext } from "@azure/functions";
import { issueCertificate } from "../cli/local/devCertificates.js";
import { useLocalStack } from "./support/harness.js";

// @azure/functions is CommonJS and its InvocationContext is not detectable as a named ESM export.
const { InvocationContext: Context } = functionsModule;
let sendEmail: (entry: unknown, context: InvocationContext) => Promise<void>;

const context = (id: string, dequeueCount: number) =>
  new Context({ invocationId: `inv-${id}-${dequeueCount}`, functionName: "sendEmail", triggerMetadata: { id, dequeueCount }, logHandler: () => {} });

// The process-wide mailer logs circuit events through console.log (JSON lines); keep them.
const processLines: string[] = [];
const consoleLog = console.log;
const events = () => processLines.flatMap((line) => {
  try {
    return [(JSON.parse(line) as { event: string }).event];
  } catch {
    return [];
  }
});
let refuseLogins = false;
let dropNextMail = false;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe("functions/sendEmail after the setup is fixed", () => {
  const local = useLocalStack("qm-func-recover-", {
    fault: ({ phase }) => {
      if (phase === "auth" && refuseLogins) return { reply: 535, message: "5.7.3 Authentication unsuccessful" };
      if (phase === "mail" && dropNextMail) {
        dropNextMail = false;
        return { drop: true };
      }
      return undefined;
    },
  });
  let certPath: string;
  before(async () => {
    certPath = join(local.workDir, "cert.pem");
    const stranger = issueCertificate({ commonName: "not on the app registration" });
    writeFileSync(certPath, stranger.certificatePem + stranger.privateKeyPem);
    // RETRY_BASE_SECONDS 1: the circuit's probes come after 1 s, then 2 s. MAX_DEQUEUE_COUNT high
    // enough that no invocation here is near its last attempt (no fresh copies).
    Object.assign(process.env, local.stack.env, { CERT_PATH: certPath, RETRY_BASE_SECONDS: "1", RETRY_MAX_SECONDS: "8", MAX_DEQUEUE_COUNT: "20" });
    console.log = (...args: unknown[]) => void processLines.push(args.map(String).join(" "));
    ({ sendEmail } = await import("../functions/sendEmail.js"));
  });
  after(() => {
    console.log = consoleLog;
  });

  it("broken certificate → open; fixed → first probe answered 503 → after the backoff the next invocation sends and the circuit closes", async () => {
    const { stack } = local;
    const text = JSON.stringify({ id: "recover-1", to: "a@example.test", subject: "Recovers", text: "x" });

    await assert.rejects(sendEmail(text, context("m1", 1)), /TOKEN_AADSTS700027/);
    assert.deepEqual(events().filter((e) => e.startsWith("circuit.")), ["circuit.open"]);
    assert.equal(stack.oauth.stats.tokenRequests, 1);

    // The operator fixes the certificate; the token endpoint answers the first probe with a 503.
    writeFileSync(certPath, stack.clientCertificate.certificatePem + stack.clientCertificate.privateKeyPem);
    stack.oauth.failNext(1, 503, { error: "temporarily_unavailable", error_description: "AADSTS50000: service busy", error_codes: [50000] });

    // Before the backoff: the message waits, no token request.
    await assert.rejects(sendEmail(text, context("m1", 2)), /TOKEN_AADSTS700027/);
    assert.equal(stack.oauth.stats.tokenRequests, 1, "no probe before the backoff");

    await sleep(1_100);
    // The probe: the token endpoint is busy (transient), so the message is retried by the host.
    await assert.rejects(sendEmail(text, context("m1", 3)), /TOKEN_TEMPORARILY_UNAVAILABLE|TOKEN_AADSTS50000/);
    assert.equal(stack.oauth.stats.tokenRequests, 2, "the probe asked the token endpoint");
    assert.equal(stack.smtp.messages.length, 0);

    // Right after a failed probe: wait again (backoff 2 s), no token request.
    await assert.rejects(sendEmail(text, context("m1", 4)), /TOKEN_AADSTS700027/);
    assert.equal(stack.oauth.stats.tokenRequests, 2);

    // After the backoff the next invocation is the new probe: it sends, and the circuit closes.
    await sleep(2_100);
    await sendEmail(text, context("m1", 5));
    assert.equal(stack.smtp.messages.length, 1);
    assert.equal(stack.smtp.messages[0]?.headers["subject"]?.[0], "Recovers");
    assert.equal(stack.oauth.stats.tokenRequests, 3);
    assert.deepEqual(events().filter((e) => e === "circuit.open" || e === "circuit.closed"), ["circuit.open", "circuit.closed"]);

    // Closed: the next message goes straight out on the cached token.
    await sendEmail(JSON.stringify({ id: "recover-2", to: "b@example.test", subject: "After", text: "y" }), context("m2", 1));
    assert.equal(stack.smtp.messages.length, 2);
    assert.equal(stack.oauth.stats.tokenRequests, 3);
  });

  it("a permanent failure of the probing message closes the circuit too: the server judged the message, so the setup works", async () => {
    const { stack } = local;
    // Break the mailbox side: every login is refused with 535, and the pooled connection is
    // dropped so that the next send has to log in again.
    refuseLogins = true;
    dropNextMail = true;
    const waiting = JSON.stringify({ id: "perm-0", to: "d@example.test", subject: "Waits", text: "w" });
    // Whether the pool still holds a logged-in connection is nodemailer's business: the first try
    // either loses that connection (transient) or meets the refused login.
    let attempt = 1;
    await assert.rejects(sendEmail(waiting, context("p0", attempt)), /SMTP_CONNECTION_FAILED|SMTP_AUTH_REJECTED/);
    if (events().filter((e) => e === "circuit.open").length < 2) await assert.rejects(sendEmail(waiting, context("p0", ++attempt)), /SMTP_AUTH_REJECTED/);
    assert.equal(events().filter((e) => e === "circuit.open").length, 2, "opened again");
    dropNextMail = false;

    refuseLogins = false;
    await sleep(1_100);
    // The probe is a message the server refuses for its own fault: From is not the mailbox.
    const before = stack.smtp.messages.length;
    await sendEmail(JSON.stringify({ id: "perm-1", from: "someone-else@contoso.test", to: "e@example.test", subject: "SendAs", text: "s" }), context("p1", 1));
    assert.equal(stack.smtp.messages.length, before, "refused by the server");
    assert.equal(events().filter((e) => e === "circuit.closed").length, 2, "closed by a permanent failure");

    // Closed: the waiting message goes out at once.
    await sendEmail(waiting, context("p0", attempt + 1));
    assert.equal(stack.smtp.messages.length, before + 1);
  });
});
