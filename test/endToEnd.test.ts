// The whole path for real: Azurite queue → worker → certificate from the Key Vault double (through
// the real Azure SDK clients and DefaultAzureCredential) → assertion verified by oidc-provider →
// token → smtp-server with STARTTLS + XOAUTH2 that verifies the token → .eml.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import type { QueueClient } from "@azure/storage-queue";
import { startLocalStack, LOCAL_MAILBOX, type LocalStack } from "../cli/local/localStack.js";
import { startSmtpSink } from "../cli/local/smtpSink.js";
import { issueCertificate } from "../cli/local/devCertificates.js";
import { loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { messageIdFor } from "../shared/transport/smtpTransport.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";
import { capturingLogger, drain, readPoison, type CapturedLogger } from "./support/harness.js";

let stack: LocalStack;
let kv: KeyVaultDouble;
let restoreEnv: () => void;
let workDir: string;
let queue: QueueClient;
let poison: QueueClient;
/** Every log line any test here captured: checked for secrets at the end. */
const allLogs: CapturedLogger[] = [];
const allPoisonRecords: unknown[] = [];

function newLogger(): CapturedLogger {
  const logger = capturingLogger();
  allLogs.push(logger);
  return logger;
}

function keyVaultEnv(certName: string): Record<string, string> {
  return { ...stack.env, CERT_PATH: "", KEY_VAULT_URL: kv.vaultUrl, CERT_NAME: certName };
}

before(async () => {
  workDir = mkdtempSync(join(tmpdir(), "qm-e2e-"));
  stack = await startLocalStack({ caDir: ".test-ca", workDir, outboxDir: join(workDir, "outbox") });
  kv = await startKeyVaultDouble();
  kv.putCertificate("smtp-pfx", { ...stack.clientCertificate, contentType: "application/x-pkcs12" });
  kv.putCertificate("smtp-pem", { ...stack.clientCertificate, contentType: "application/x-pem-file" });
  restoreEnv = kv.applyEnv();
  ({ queue, poison } = await openMailQueues(loadStorageConfig(stack.env)));
});

after(async () => {
  restoreEnv?.();
  await Promise.allSettled([kv?.close(), stack?.stop()]);
  if (workDir) rmSync(workDir, { recursive: true, force: true });
});

beforeEach(async () => {
  await Promise.all([queue.clearMessages(), poison.clearMessages()]);
  stack.smtp.messages.length = 0;
  stack.smtp.resetStats();
  stack.oauth.resetStats();
  kv.resetCounts();
});

describe("queue → Key Vault certificate → token → SMTP", () => {
  it("delivers 100 messages once each with one token request and one read of certificate and key (PKCS#12)", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 100; i++) {
      const { id } = await enqueueEmail(queue, { to: `user${i}@example.test`, subject: `Receipt ${i}`, text: `Body ${i}`, headers: { "X-Order": String(i) } });
      ids.push(id);
    }
    const result = await drain(keyVaultEnv("smtp-pfx"), newLogger());

    assert.deepEqual({ sent: result.sent, poisoned: result.poisoned, retried: result.retried }, { sent: 100, poisoned: 0, retried: 0 });
    const messages = stack.smtp.messages;
    assert.equal(messages.length, 100);
    const subjects = new Set(messages.map((m) => m.headers["subject"]?.[0]));
    assert.equal(subjects.size, 100, "each message arrived exactly once");
    for (const message of messages) {
      const order = Number(message.headers["x-order"]?.[0]);
      assert.equal(message.headers["subject"]?.[0], `Receipt ${order}`);
      assert.deepEqual(message.rcptTo, [`user${order}@example.test`]);
      assert.equal(message.headers["message-id"]?.[0], messageIdFor(ids[order] ?? "", LOCAL_MAILBOX));
      assert.equal(message.authUser, LOCAL_MAILBOX);
      assert.match(message.raw.toString("utf8"), new RegExp(`Body ${order}\\b`));
    }
    assert.equal(stack.oauth.stats.tokenRequests, 1, "one token for 100 messages");
    assert.equal(kv.counts.certificateGets, 1, "certificate read once");
    assert.equal(kv.counts.secretGets, 1, "private key read once");
    assert.ok(stack.smtp.stats.auths <= 3, `at most SMTP_MAX_CONNECTIONS AUTHs, got ${stack.smtp.stats.auths}`);
    assert.equal((await queue.getProperties()).approximateMessagesCount, 0);
    assert.equal((await readPoison(result.mailer)).length, 0);
  });

  it("reads a PEM-content certificate from Key Vault the same way", async () => {
    for (let i = 0; i < 10; i++) await enqueueEmail(queue, { to: "pem@example.test", subject: `PEM ${i}`, text: "x" });
    const result = await drain(keyVaultEnv("smtp-pem"), newLogger());
    assert.equal(result.sent, 10);
    assert.equal(stack.smtp.messages.length, 10);
    assert.equal(stack.oauth.stats.tokenRequests, 1);
    assert.deepEqual({ certificates: kv.counts.certificateGets, secrets: kv.counts.secretGets }, { certificates: 1, secrets: 1 });
  });

  it("sends every field: cc, bcc, reply-to, html with text, custom headers, attachments", async () => {
    const attachment = Buffer.from("Total: 42.00\n");
    await enqueueEmail(queue, {
      id: "order-7731",
      to: ["\"Hopper, Grace\" <grace@example.test>", "ada@example.test"],
      cc: "linus@example.test",
      bcc: "audit@example.test",
      replyTo: "support@contoso.test",
      subject: "Your receipt – №7731",
      text: "Plain alternative",
      html: "<p>Rich <b>body</b></p>",
      headers: { "X-Campaign": "receipts" },
      attachments: [{ filename: "receipt.txt", contentType: "text/plain", content: attachment.toString("base64") }],
    });
    await drain(stack.env, newLogger());
    const [message] = await stack.smtp.waitForMessages(1);
    assert.ok(message);
    const raw = message.raw.toString("utf8");
    assert.deepEqual(message.rcptTo.sort(), ["ada@example.test", "audit@example.test", "grace@example.test", "linus@example.test"]);
    assert.match(message.headers["to"]?.[0] ?? "", /"Hopper, Grace" <grace@example\.test>, ada@example\.test/);
    assert.equal(message.headers["cc"]?.[0], "linus@example.test");
    assert.equal(message.headers["bcc"], undefined, "Bcc is envelope-only");
    assert.equal(message.headers["reply-to"]?.[0], "support@contoso.test");
    assert.equal(message.headers["from"]?.[0], LOCAL_MAILBOX);
    assert.equal(message.headers["x-campaign"]?.[0], "receipts");
    assert.equal(message.headers["message-id"]?.[0], messageIdFor("order-7731", LOCAL_MAILBOX));
    assert.match(message.headers["subject"]?.[0] ?? "", /=\?UTF-8\?/, "non-ASCII subject is encoded");
    assert.match(raw, /multipart\/mixed/);
    assert.match(raw, /Content-Type: text\/html/);
    assert.match(raw, /filename=receipt\.txt/);
    assert.ok(raw.includes(attachment.toString("base64")), "attachment content is in the message");
  });

  it("poisons an invalid message at once with its reason, and delivers the next one", async () => {
    const notJson = "{ this is not json";
    const injected = Buffer.from(JSON.stringify({ to: "victim@example.test", subject: "Hi\r\nBcc: everyone@example.test", text: "x" })).toString("base64");
    await queue.sendMessage(notJson);
    await queue.sendMessage(injected);
    await enqueueEmail(queue, { to: "good@example.test", subject: "Still delivered", text: "ok" });

    const result = await drain(stack.env, newLogger());
    assert.deepEqual({ sent: result.sent, poisoned: result.poisoned }, { sent: 1, poisoned: 2 });
    assert.equal(stack.smtp.messages.length, 1);
    assert.equal(stack.smtp.messages[0]?.headers["subject"]?.[0], "Still delivered");

    const records = await readPoison(result.mailer);
    allPoisonRecords.push(...records);
    const byCode = new Map(records.map((r) => [r.reason.code, r]));
    assert.deepEqual([...byCode.keys()].sort(), ["MESSAGE_HEADER_INJECTION", "MESSAGE_NOT_JSON"]);
    assert.equal(byCode.get("MESSAGE_NOT_JSON")?.original, notJson, "original text kept exactly");
    assert.equal(byCode.get("MESSAGE_HEADER_INJECTION")?.original, injected);
    assert.match(byCode.get("MESSAGE_HEADER_INJECTION")?.reason.message ?? "", /subject contains a control character/);
    for (const record of records) {
      assert.equal(record.attempts, 1, "not retried");
      assert.ok(!Number.isNaN(Date.parse(record.failedAt)));
    }
    assert.equal((await queue.getProperties()).approximateMessagesCount, 0);
  });

  it("fetches a new token once when the SMTP server answers 535 at AUTH", async () => {
    // A server that refuses the first token it sees (as Exchange does with a token whose
    // permissions changed) and accepts later ones that verify.
    let refused = 0;
    const tls = issueCertificate({ commonName: "localhost", hosts: ["127.0.0.1"] }, { certificatePem: (await import("node:fs")).readFileSync(".test-ca/ca.pem", "utf8"), privateKeyPem: (await import("node:fs")).readFileSync(".test-ca/ca-key.pem", "utf8") });
    const picky = await startSmtpSink({
      tls: { key: tls.privateKeyPem, cert: tls.certificatePem },
      verifyToken: async (_user, token) => (refused++ === 0 ? { ok: false, reason: "stale" } : stack.oauth.verifyAccessToken(token)),
    });
    try {
      await enqueueEmail(queue, { to: "renew@example.test", subject: "After renewal", text: "x" });
      const logger = newLogger();
      const result = await drain({ ...stack.env, SMTP_PORT: String(picky.port) }, logger);
      assert.equal(result.sent, 1, logger.lines.join("\n"));
      assert.equal(picky.messages.length, 1);
      assert.equal(picky.stats.authFailures, 1);
      assert.equal(stack.oauth.stats.tokenRequests, 2, "one token, then exactly one renewal");
    } finally {
      await picky.close();
    }
  });

  it("leaves no token, assertion, key, secret or XOAUTH2 string in logs or poison records", () => {
    const text = allLogs.flatMap((l) => l.lines).join("\n") + JSON.stringify(allPoisonRecords);
    assert.ok(allLogs.flatMap((l) => l.lines).some((line) => line.includes("assertion.created")), "debug logs were captured");
    assert.ok(text.includes('"jti"'), "assertion claims are logged");
    assert.doesNotMatch(text, /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\./, "no JWT (token or assertion)");
    assert.doesNotMatch(text, /PRIVATE KEY/);
    assert.doesNotMatch(text, /dXNlcj/, "no XOAUTH2 initial response");
    assert.ok(!text.includes(kv.clientSecret), "no client secret");
    assert.ok(!text.includes(stack.clientCertificate.privateKeyPem.split("\n")[1] ?? "never"), "no key material");
  });
});
