// AUTH_METHOD=secret through the whole local path: Azurite queue → worker → client secret (app
// setting or Key Vault double through the real Azure SDK) → oidc-provider, which checks the secret
// and how it travelled (client_secret_post or client_secret_basic, each refused the other way) →
// app-only token → smtp-server that verifies it. Token endpoint rejections are Entra's real error
// bodies from the local server, asserted by code: the circuit opens and nothing is poisoned.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import type { QueueClient } from "@azure/storage-queue";
import { LOCAL_MAILBOX, LOCAL_SECRET_CLIENT_ID, startLocalStack, type LocalStack } from "../cli/local/localStack.js";
import { runWorker } from "../cli/worker.js";
import { loadExpiryConfig, loadSendConfig, loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { runConfiguredExpiryWatch } from "../shared/expiry/expiryWatch.js";
import { collectFindings, expirySourcesFor } from "../shared/expiry/runExpiryWatch.js";
import { createMailer } from "../shared/mailer.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { capturingLogger, drain, readPoison, type CapturedLogger } from "./support/harness.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";

const DAY = 86_400_000;
const BASIC_CLIENT_ID = "00000000-0000-4000-8000-0000000ba51c";
const EXPIRED_CLIENT_ID = "00000000-0000-4000-8000-00000000dead";
const ROTATED_CLIENT_ID = "00000000-0000-4000-8000-00000000f0f0";
// A secret with characters that change under form-urlencoding (RFC 6749 2.3.1 encodes id and secret
// before base64 for client_secret_basic): sent unencoded, the server would read another secret.
const basicSecret = `${randomBytes(18).toString("base64")}~+/:%&=`;
const wrongSecret = `wrong-${randomBytes(24).toString("base64url")}`;
const expiredSecret = randomBytes(30).toString("base64url");
const oldVaultSecret = randomBytes(30).toString("base64url");
const newVaultSecret = randomBytes(30).toString("base64url");

let stack: LocalStack;
let kv: KeyVaultDouble;
let restoreEnv: () => void;
let workDir: string;
let queue: QueueClient;
let poison: QueueClient;
/** Every log line and poison record of this file: searched for secrets at the end. */
const allLogs: CapturedLogger[] = [];
const allPoisonRecords: unknown[] = [];

function newLogger(): CapturedLogger {
  const logger = capturingLogger();
  allLogs.push(logger);
  return logger;
}

before(async () => {
  workDir = mkdtempSync(join(tmpdir(), "qm-secret-"));
  stack = await startLocalStack({ caDir: ".test-ca", workDir, authMethod: "secret" });
  // Before any Azure SDK client exists in this process (NO_PROXY is read once per process).
  kv = await startKeyVaultDouble();
  restoreEnv = kv.applyEnv();
  ({ queue, poison } = await openMailQueues(loadStorageConfig(stack.env)));
  stack.oauth.registerClient({ clientId: BASIC_CLIENT_ID, auth: "client_secret_basic", secret: basicSecret });
  stack.oauth.registerClient({ clientId: EXPIRED_CLIENT_ID, auth: "client_secret_post", secret: expiredSecret, secretExpiresAt: new Date(Date.now() - DAY) });
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

async function enqueueMany(count: number, tag: string): Promise<void> {
  for (let i = 0; i < count; i++) await enqueueEmail(queue, { to: `${tag}${i}@example.test`, subject: `${tag} ${i}`, text: `Body ${i}` });
}

/** Sends `count` messages (and one that is not JSON, so a poison record exists to search) and checks delivery. */
async function deliversWithOneToken(env: Record<string, string>, count: number, tag: string): Promise<void> {
  await enqueueMany(count, tag);
  await queue.sendMessage("not json at all");
  const result = await drain(env, newLogger());
  assert.deepEqual({ sent: result.sent, poisoned: result.poisoned, retried: result.retried }, { sent: count, poisoned: 1, retried: 0 });
  assert.equal(stack.smtp.messages.length, count);
  assert.equal(new Set(stack.smtp.messages.map((m) => m.headers["subject"]?.[0])).size, count, "each message arrived once");
  for (const message of stack.smtp.messages) assert.equal(message.authUser, LOCAL_MAILBOX);
  assert.equal(stack.oauth.stats.tokenRequests, 1, "one token request for the token's lifetime");
  assert.equal(stack.oauth.stats.tokensIssued, 1);
  const records = await readPoison(result.mailer);
  assert.deepEqual(records.map((r) => r.reason.code), ["MESSAGE_NOT_JSON"]);
  allPoisonRecords.push(...records);
}

/** One message, a token endpoint that refuses our credential: the circuit opens, nothing is sent or poisoned. */
async function refusedWith(env: Record<string, string>, code: string) {
  await enqueueEmail(queue, { to: "held@example.test", subject: "Held back", text: "x" });
  const result = await drain(env, newLogger());
  const error = result.circuitOpen;
  assert.equal(error?.code, code, error?.message);
  assert.equal(error?.kind, "config");
  assert.deepEqual({ sent: result.sent, poisoned: result.poisoned }, { sent: 0, poisoned: 0 });
  assert.equal(stack.smtp.messages.length, 0);
  assert.equal(stack.oauth.stats.tokensIssued, 0);
  assert.ok(stack.oauth.stats.tokenRequests >= 1);
  const records = await readPoison(result.mailer);
  allPoisonRecords.push(...records);
  assert.equal(records.length, 0, "nothing poisoned");
  assert.equal((await queue.getProperties()).approximateMessagesCount, 1, "the message waits in the queue");
  return error;
}

describe("AUTH_METHOD=secret", () => {
  it("client_secret_post: delivers with one token request, the secret in the form body", async () => {
    await deliversWithOneToken(stack.env, 5, "post");
    assert.deepEqual(stack.oauth.stats.requests, [
      {
        grantType: "client_credentials",
        clientId: LOCAL_SECRET_CLIENT_ID,
        clientAuthentication: "client_secret_post",
        fields: ["client_id", "client_secret", "grant_type", "scope"],
        scope: "https://outlook.office365.com/.default",
        status: 200,
      },
    ]);
  });

  it("client_secret_basic: delivers with one token request, id and secret form-encoded in the Basic header", async () => {
    await deliversWithOneToken({ ...stack.env, CLIENT_ID: BASIC_CLIENT_ID, CLIENT_SECRET: basicSecret, CLIENT_AUTH: "basic" }, 5, "basic");
    assert.deepEqual(stack.oauth.stats.requests, [
      { grantType: "client_credentials", clientId: BASIC_CLIENT_ID, clientAuthentication: "client_secret_basic", fields: ["grant_type", "scope"], scope: "https://outlook.office365.com/.default", status: 200 },
    ]);
  });

  it("the local server decodes Basic credentials as RFC 6749 says: an unencoded secret with '+' is a different secret (7000215)", async () => {
    const send = (id: string, secret: string) =>
      fetch(stack.oauth.tokenUrl, {
        method: "POST",
        headers: { authorization: `Basic ${Buffer.from(`${id}:${secret}`).toString("base64")}`, "content-type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams({ grant_type: "client_credentials", scope: stack.oauth.scope }),
      }).then(async (r) => ({ status: r.status, body: (await r.json()) as { error?: string; error_codes?: number[] } }));
    const plusSecret = `${randomBytes(12).toString("base64url")}+${randomBytes(12).toString("base64url")}`;
    stack.oauth.registerClient({ clientId: "00000000-0000-4000-8000-0000000000b5", auth: "client_secret_basic", secret: plusSecret });
    const unencoded = await send("00000000-0000-4000-8000-0000000000b5", plusSecret);
    assert.deepEqual([unencoded.status, unencoded.body.error_codes], [401, [7000215]]);
    const encoded = await send("00000000-0000-4000-8000-0000000000b5", encodeURIComponent(plusSecret));
    assert.equal(encoded.status, 200, JSON.stringify(encoded.body));
  });

  it("a secret sent the other way than the client is registered is refused: TOKEN_INVALID_CLIENT, hint names CLIENT_AUTH", async () => {
    const asBasic = await refusedWith({ ...stack.env, CLIENT_AUTH: "basic" }, "TOKEN_INVALID_CLIENT");
    assert.match(asBasic.response ?? "", /^401 invalid_client .*registered for client_secret_post but the request used client_secret_basic/);
    assert.match(asBasic.hint ?? "", /CLIENT_AUTH/);
    assert.equal(stack.oauth.stats.requests[0]?.clientAuthentication, "client_secret_basic");

    await queue.clearMessages();
    stack.oauth.resetStats();
    const asPost = await refusedWith({ ...stack.env, CLIENT_ID: BASIC_CLIENT_ID, CLIENT_SECRET: basicSecret, CLIENT_AUTH: "post" }, "TOKEN_INVALID_CLIENT");
    assert.match(asPost.response ?? "", /registered for client_secret_basic but the request used client_secret_post/);
    assert.equal(stack.oauth.stats.requests[0]?.clientAuthentication, "client_secret_post");
  });

  it("a wrong secret: TOKEN_AADSTS7000215 from Entra's error body", async () => {
    const error = await refusedWith({ ...stack.env, CLIENT_SECRET: wrongSecret }, "TOKEN_AADSTS7000215");
    assert.match(error.response ?? "", /^401 invalid_client AADSTS7000215: Invalid client secret provided\./);
    assert.match(error.hint ?? "", /Secret ID/);
  });

  it("an expired secret: TOKEN_AADSTS7000222", async () => {
    const error = await refusedWith({ ...stack.env, CLIENT_ID: EXPIRED_CLIENT_ID, CLIENT_SECRET: expiredSecret }, "TOKEN_AADSTS7000222");
    assert.match(error.response ?? "", /^401 invalid_client AADSTS7000222: The provided client secret keys for app '00000000-0000-4000-8000-00000000dead' are expired/);
    assert.match(error.hint ?? "", /expired.*Certificates & secrets/);
  });

  it("CLIENT_SECRET_NAME: reads the secret from Key Vault, and after a rejection reads it again and picks up the new version without a restart", async () => {
    // The app's secret was rotated; the vault still holds the old value.
    stack.oauth.registerClient({ clientId: ROTATED_CLIENT_ID, auth: "client_secret_post", secret: newVaultSecret });
    kv.putSecret("smtp-client-secret", oldVaultSecret);
    // Probes a second apart at most, to keep the test short.
    const env = { ...stack.env, CLIENT_ID: ROTATED_CLIENT_ID, CLIENT_SECRET: "", CLIENT_SECRET_NAME: "smtp-client-secret", KEY_VAULT_URL: kv.vaultUrl, RETRY_MAX_SECONDS: "1" };
    await enqueueMany(2, "rotated");
    const logger = newLogger();
    const mailer = createMailer(loadSendConfig(env), logger);
    try {
      const refused = await runWorker({ mailer, logger, drain: true, maxPollIntervalMs: 200 });
      assert.equal(refused.circuitOpen?.code, "TOKEN_AADSTS7000215");
      assert.equal(refused.poisoned, 0);
      assert.equal(kv.counts.secretGets, 2, "read once, then again after the rejection (the probe)");

      const newVersion = kv.putSecret("smtp-client-secret", newVaultSecret);
      const recovered = await runWorker({ mailer, logger, drain: true, maxPollIntervalMs: 200 });
      assert.equal(recovered.circuitOpen, undefined);
      assert.equal(recovered.sent, 2);
      assert.equal(stack.smtp.messages.length, 2);
      assert.equal(kv.counts.secretGets, 3, "the vault is read only after rejections");
      assert.equal(stack.oauth.stats.tokensIssued, 1);
      assert.ok(logger.lines.some((line) => line.includes('"secret.loaded"') && line.includes(newVersion)), "the new version is logged by version, not value");
      allPoisonRecords.push(...(await readPoison(mailer)));
    } finally {
      await mailer.close();
    }
  });

  it("expiry watch: a Key Vault client secret in use is always watched; one in an app setting is named as unchecked unless the app registration is read", async () => {
    const now = new Date();
    kv.putSecret("sender-secret", "x".repeat(40), { expiresOn: new Date(now.getTime() + 5 * DAY) });
    const vaultEnv = { KEY_VAULT_URL: kv.vaultUrl, CLIENT_SECRET_NAME: "sender-secret", EXPIRY_WATCH_NAMES: "nothing-matches-*" };

    const watched = await collectFindings(expirySourcesFor(loadExpiryConfig({ ...vaultEnv, AUTH_METHOD: "secret" })), loadExpiryConfig({ ...vaultEnv, AUTH_METHOD: "secret" }), now);
    const secret = watched.find((f) => f.name === "sender-secret");
    assert.deepEqual({ kind: secret?.kind, inUse: secret?.inUse, status: secret?.status, daysLeft: secret?.daysLeft }, { kind: "secret", inUse: true, status: "critical", daysLeft: 5 });
    assert.equal(watched.length, 1, "EXPIRY_WATCH_NAMES matches nothing else");
    // Another method does not use CLIENT_SECRET_NAME, so the secret is not the sender's.
    const certificateConfig = loadExpiryConfig({ ...vaultEnv, AUTH_METHOD: "certificate" });
    assert.equal((await collectFindings(expirySourcesFor(certificateConfig), certificateConfig, now)).length, 0);

    // A secret in an app setting: the watch cannot date it and says what to turn on (info, no alert).
    const settingConfig = loadExpiryConfig({ AUTH_METHOD: "secret", CLIENT_SECRET: "app-setting-secret-value" });
    const logger = newLogger();
    const run = await runConfiguredExpiryWatch({ config: settingConfig, storage: loadStorageConfig(stack.env), logger, now });
    assert.deepEqual(run.findings.map((f) => `${f.name}:${f.status}:${f.inUse}`), ["CLIENT_SECRET:unchecked:true"]);
    assert.match(run.findings[0]?.action ?? "", /EXPIRY_CHECK_APP_REGISTRATION=true/);
    assert.deepEqual(run.channels["log"]?.delivered ?? [], []);
    const notice = logger.lines.find((line) => line.includes('"expiry.not_checked"'));
    assert.ok(notice, logger.lines.join("\n"));
    assert.match(notice, /"level":"info"/);
    assert.match(notice, /EXPIRY_CHECK_APP_REGISTRATION=true/);

    // With the app registration read through Graph, its secrets' end dates are the findings instead.
    kv.putApplication({ appId: LOCAL_SECRET_CLIENT_ID, passwordCredentials: [{ displayName: "smtp", endDateTime: new Date(now.getTime() + 20 * DAY) }] });
    const appConfig = loadExpiryConfig({ AUTH_METHOD: "secret", CLIENT_SECRET: "app-setting-secret-value", EXPIRY_CHECK_APP_REGISTRATION: "true", CLIENT_ID: LOCAL_SECRET_CLIENT_ID });
    const fromGraph = await collectFindings(expirySourcesFor(appConfig), appConfig, now);
    assert.deepEqual(fromGraph.map((f) => `${f.kind}:${f.status}:${f.daysLeft}`), ["app-secret:warning:20"]);
  });

  it("leaves no client secret, Basic credentials or token in logs or poison records", () => {
    const lines = allLogs.flatMap((l) => l.lines);
    assert.ok(lines.some((line) => line.includes('"client_secret.used"')), "debug logs were captured");
    assert.ok(allPoisonRecords.length > 0, "poison records were captured");
    const text = lines.join("\n") + JSON.stringify(allPoisonRecords);
    const formEncoded = (value: string) => new URLSearchParams({ v: value }).toString().slice(2);
    const basicHeader = Buffer.from(`${formEncoded(BASIC_CLIENT_ID)}:${formEncoded(basicSecret)}`).toString("base64");
    const secrets = { local: stack.env["CLIENT_SECRET"] ?? "", basicSecret, wrongSecret, expiredSecret, oldVaultSecret, newVaultSecret, basicHeader, encodedBasicSecret: formEncoded(basicSecret) };
    for (const [name, value] of Object.entries(secrets)) {
      assert.ok(value.length >= 20, name);
      assert.ok(!text.includes(value), `${name} appears in a log line or poison record`);
    }
    assert.doesNotMatch(text, /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\./, "no JWT");
    assert.doesNotMatch(text, /dXNlcj/, "no XOAUTH2 initial response");
  });
});
