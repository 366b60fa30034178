// functions/sendEmail.ts as the Functions host calls it: the registered handler with an
// InvocationContext (outside the host, app.* registration only warns). Same stack as production:
// settings from process.env, certificate file, token from the OAuth server, SMTP with XOAUTH2.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import functionsModule, { type InvocationContext } from "@azure/functions";
import { startLocalStack, type LocalStack } from "../cli/local/localStack.js";
import { loadStorageConfig } from "../shared/config.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";

let stack: LocalStack;
let workDir: string;
let failNextData = false;
let sendEmail: (entry: unknown, context: InvocationContext) => Promise<void>;
const logged: string[] = [];

// @azure/functions is CommonJS and its InvocationContext is not detectable as a named ESM export.
const { InvocationContext: Context } = functionsModule;

function context(id: string, dequeueCount: number): InvocationContext {
  return new Context({
    invocationId: `inv-${id}`,
    functionName: "sendEmail",
    triggerMetadata: { id, dequeueCount },
    logHandler: (_level, ...args) => logged.push(args.map(String).join(" ")),
  });
}

before(async () => {
  workDir = mkdtempSync(join(tmpdir(), "qm-func-"));
  stack = await startLocalStack({
    caDir: ".test-ca",
    workDir,
    fault: ({ phase }) => {
      if (phase !== "data" || !failNextData) return undefined;
      failNextData = false;
      return { reply: 451, message: "4.3.0 Temporary server error, try again later" };
    },
  });
  Object.assign(process.env, stack.env);
  ({ sendEmail } = await import("../functions/sendEmail.js"));
});

after(async () => {
  await stack.stop();
  rmSync(workDir, { recursive: true, force: true });
});

describe("functions/sendEmail (queue trigger)", () => {
  it("sends a raw JSON message and a base64 one", async () => {
    await sendEmail(JSON.stringify({ to: "raw@example.test", subject: "Raw", text: "r" }), context("m1", 1));
    await sendEmail(Buffer.from(JSON.stringify({ to: "b64@example.test", subject: "Base64", text: "b" })).toString("base64"), context("m2", 1));
    // The host may hand JSON over already parsed.
    await sendEmail({ to: "object@example.test", subject: "Object", text: "o" }, context("m3", 1));
    const subjects = stack.smtp.messages.map((m) => m.headers["subject"]?.[0]);
    assert.deepEqual(subjects, ["Raw", "Base64", "Object"]);
  });

  it("poisons an invalid message with its reason and returns normally (no host retry)", async () => {
    const before = stack.smtp.messages.length;
    await sendEmail('{"to":"x@example.test","subject":"no body"}', context("bad", 1));
    assert.equal(stack.smtp.messages.length, before);
    const { poison } = await openMailQueues(loadStorageConfig(stack.env));
    const peeked = await poison.peekMessages({ numberOfMessages: 32 });
    const records = peeked.peekedMessageItems.map((m) => JSON.parse(Buffer.from(m.messageText, "base64").toString("utf8")));
    assert.equal(records.length, 1);
    assert.equal(records[0].reason.code, "MESSAGE_NO_BODY");
    assert.equal(records[0].original, '{"to":"x@example.test","subject":"no body"}');
    assert.equal(records[0].attempts, 1);
    await poison.clearMessages();
  });

  it("throws on a transient SMTP failure so the host retries, and sends on the retry", async () => {
    const before = stack.smtp.messages.length;
    failNextData = true;
    const text = JSON.stringify({ id: "retry-1", to: "retry@example.test", subject: "Retried", text: "x" });
    await assert.rejects(sendEmail(text, context("r1", 1)), /SMTP_TEMPORARY_FAILURE/);
    assert.equal(stack.smtp.messages.length, before);
    await sendEmail(text, context("r1", 2));
    assert.equal(stack.smtp.messages.length, before + 1);
  });

  it("on the last attempt poisons with the reason instead of letting the host poison without one", async () => {
    failNextData = true;
    const text = JSON.stringify({ to: "last@example.test", subject: "Last try", text: "x" });
    await sendEmail(text, context("l1", 5));
    const { poison } = await openMailQueues(loadStorageConfig(stack.env));
    const peeked = await poison.peekMessages({ numberOfMessages: 32 });
    const record = JSON.parse(Buffer.from(peeked.peekedMessageItems[0]?.messageText ?? "", "base64").toString("utf8"));
    assert.equal(record.reason.code, "SMTP_TEMPORARY_FAILURE");
    assert.match(record.reason.response, /^451 4\.3\.0/);
    assert.equal(record.attempts, 5);
    assert.ok(logged.some((line) => line.includes("message.poisoned")), "logged through the invocation context");
  });
});
