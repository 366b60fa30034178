// functions/sendEmail.ts when our setup is broken (here: a certificate the token endpoint does not
// know). Its own file, so the process-wide mailer starts with the broken settings.
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { before, describe, it } from "node:test";
import functionsModule, { type InvocationContext } from "@azure/functions";
import { issueCertificate } from "../cli/local/devCertificates.js";
import { loadStorageConfig } from "../shared/config.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { useLocalStack } from "./support/harness.js";

// @azure/functions is CommonJS and its InvocationContext is not detectable as a named ESM export.
const { InvocationContext: Context } = functionsModule;
let sendEmail: (entry: unknown, context: InvocationContext) => Promise<void>;

const context = (id: string, dequeueCount: number) =>
  new Context({ invocationId: `inv-${id}`, functionName: "sendEmail", triggerMetadata: { id, dequeueCount }, logHandler: () => {} });

describe("functions/sendEmail with a broken setup", () => {
  const local = useLocalStack("qm-func-misconf-");
  before(async () => {
    const certPath = join(local.workDir, "unregistered.pem");
    const stranger = issueCertificate({ commonName: "not on the app registration" });
    writeFileSync(certPath, stranger.certificatePem + stranger.privateKeyPem);
    Object.assign(process.env, local.stack.env, { CERT_PATH: certPath, RETRY_BASE_SECONDS: "30", MAX_DEQUEUE_COUNT: "5" });
    ({ sendEmail } = await import("../functions/sendEmail.js"));
  });

  it("throws for a retry, asks the token endpoint once, poisons nothing, and saves a message near its last attempt as a fresh copy", async () => {
    const { stack } = local;
    const { queue, poison } = await openMailQueues(loadStorageConfig(stack.env));
    const text = JSON.stringify({ id: "waiting-1", to: "a@example.test", subject: "Waits", text: "x" });

    await assert.rejects(sendEmail(text, context("m1", 1)), /TOKEN_AADSTS700027/);
    // The circuit is open: the next message does not hit the token endpoint again.
    await assert.rejects(sendEmail(text, context("m2", 2)), /TOKEN_AADSTS700027/);
    assert.equal(stack.oauth.stats.tokenRequests, 1);

    // One attempt before the host would poison it: continue as a fresh copy, return normally.
    await sendEmail(text, context("m3", 4));
    assert.equal((await poison.getProperties()).approximateMessagesCount, 0, "nothing poisoned");
    assert.equal((await queue.getProperties()).approximateMessagesCount, 1, "a fresh copy waits in the queue");
    assert.equal(stack.smtp.messages.length, 0);
  });
});
