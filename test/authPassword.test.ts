// AUTH_METHOD=password (resource owner password grant) through the whole local path: Azurite queue →
// worker → password (app setting or Key Vault double through the real Azure SDK) → oidc-provider's
// password grant, which checks every field, the user and the client (public, or confidential with
// its secret) → delegated token (scp SMTP.Send, upn) → smtp-server that accepts it only for that
// user. Entra's refusals (wrong password, MFA, missing secret) come from the local server's real error
// bodies and are asserted by code: the circuit opens and nothing is poisoned.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import type { QueueClient } from "@azure/storage-queue";
import { LOCAL_MAILBOX, LOCAL_PUBLIC_CLIENT_ID, startLocalStack, type LocalStack } from "../cli/local/localStack.js";
import { credentialSourceFor } from "../shared/auth/credentialSource.js";
import { loadSendConfig, loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { TokenProvider } from "../shared/token/tokenProvider.js";
import { capturingLogger, drain, readPoison, type CapturedLogger } from "./support/harness.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";

const CONFIDENTIAL_POST_ID = "00000000-0000-4000-8000-00000000c0f1";
const CONFIDENTIAL_BASIC_ID = "00000000-0000-4000-8000-00000000c0f2";
const MFA_USER = "mfa.required@contoso.test";
const ENROL_USER = "mfa.enrol@contoso.test";
const postSecret = randomBytes(30).toString("base64url");
const basicSecret = `${randomBytes(18).toString("base64")}~+/:`;
const mfaPassword = randomBytes(18).toString("base64url");
const wrongPassword = `wrong-${randomBytes(18).toString("base64url")}`;
const DELEGATED_SCOPE = "https://outlook.office365.com/SMTP.Send";

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
  workDir = mkdtempSync(join(tmpdir(), "qm-password-"));
  stack = await startLocalStack({ caDir: ".test-ca", workDir, authMethod: "password" });
  // Before any Azure SDK client exists in this process (NO_PROXY is read once per process).
  kv = await startKeyVaultDouble();
  restoreEnv = kv.applyEnv();
  ({ queue, poison } = await openMailQueues(loadStorageConfig(stack.env)));
  stack.oauth.registerClient({ clientId: CONFIDENTIAL_POST_ID, auth: "client_secret_post", secret: postSecret });
  stack.oauth.registerClient({ clientId: CONFIDENTIAL_BASIC_ID, auth: "client_secret_basic", secret: basicSecret });
  stack.oauth.registerUser({ username: MFA_USER, password: mfaPassword, mfa: "required" });
  stack.oauth.registerUser({ username: ENROL_USER, password: mfaPassword, mfa: "registration" });
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

/** Sends `count` messages (and one that is not JSON, so a poison record exists to search) and checks delivery. */
async function deliversWithOneToken(env: Record<string, string>, count: number, tag: string): Promise<void> {
  for (let i = 0; i < count; i++) await enqueueEmail(queue, { to: `${tag}${i}@example.test`, subject: `${tag} ${i}`, text: `Body ${i}` });
  await queue.sendMessage("not json at all");
  const logger = newLogger();
  const result = await drain(env, logger);
  assert.deepEqual({ sent: result.sent, poisoned: result.poisoned, retried: result.retried }, { sent: count, poisoned: 1, retried: 0 }, logger.lines.join("\n"));
  assert.equal(stack.smtp.messages.length, count);
  assert.equal(new Set(stack.smtp.messages.map((m) => m.headers["subject"]?.[0])).size, count, "each message arrived once");
  for (const message of stack.smtp.messages) assert.equal(message.authUser, LOCAL_MAILBOX);
  assert.equal(stack.oauth.stats.tokenRequests, 1, "one token request for the token's lifetime");
  assert.equal(stack.oauth.stats.tokensIssued, 1);
  const records = await readPoison(result.mailer);
  assert.deepEqual(records.map((r) => r.reason.code), ["MESSAGE_NOT_JSON"]);
  allPoisonRecords.push(...records);
}

/** One message, a token endpoint that refuses us: the circuit opens, nothing is sent or poisoned. */
async function refusedWith(env: Record<string, string>, code: string) {
  await enqueueEmail(queue, { to: "held@example.test", subject: "Held back", text: "x" });
  const result = await drain(env, newLogger());
  const error = result.circuitOpen;
  assert.equal(error?.code, code, error?.message);
  assert.equal(error?.kind, "config");
  assert.deepEqual({ sent: result.sent, poisoned: result.poisoned }, { sent: 0, poisoned: 0 });
  assert.equal(stack.smtp.messages.length, 0);
  assert.equal(stack.oauth.stats.tokensIssued, 0);
  const records = await readPoison(result.mailer);
  allPoisonRecords.push(...records);
  assert.equal(records.length, 0, "nothing poisoned");
  assert.equal((await queue.getProperties()).approximateMessagesCount, 1, "the message waits in the queue");
  return error;
}

describe("AUTH_METHOD=password", () => {
  it("public client: delivers with one token request carrying grant_type, username, password, client_id and scope", async () => {
    await deliversWithOneToken(stack.env, 5, "public");
    assert.deepEqual(stack.oauth.stats.requests, [
      {
        grantType: "password",
        clientId: LOCAL_PUBLIC_CLIENT_ID,
        clientAuthentication: "none",
        fields: ["client_id", "grant_type", "password", "scope", "username"],
        username: LOCAL_MAILBOX,
        scope: DELEGATED_SCOPE,
        status: 200,
      },
    ]);
  });

  it("the token is delegated: scp SMTP.Send and the user, no roles; the mail server takes it only for that user", async () => {
    const tokens = new TokenProvider({ credential: credentialSourceFor(loadSendConfig(stack.env).auth, newLogger()), logger: newLogger() });
    const { token } = await tokens.getToken();
    const check = await stack.oauth.verifyAccessToken(token, LOCAL_MAILBOX);
    assert.ok(check.ok, check.ok ? "" : check.reason);
    assert.equal(check.claims.scp, "SMTP.Send");
    assert.equal(check.claims.upn, LOCAL_MAILBOX);
    assert.equal(check.claims.aud, "https://outlook.office365.com");
    assert.equal(check.claims.roles, undefined);
    const otherUser = await stack.oauth.verifyAccessToken(token, "someone.else@contoso.test");
    assert.equal(otherUser.ok, false);
    assert.match(otherUser.ok ? "" : otherUser.reason, /is for mailer@contoso\.test, not someone\.else@contoso\.test/);
    assert.equal((await stack.oauth.verifyAccessToken(token)).ok, false, "no user to compare: refused");
  });

  it("confidential client: the secret goes with the password grant, in the body (post) or the Basic header (basic)", async () => {
    const cases = [
      { clientId: CONFIDENTIAL_POST_ID, secret: postSecret, clientAuth: "post", sent: "client_secret_post", fields: ["client_id", "client_secret", "grant_type", "password", "scope", "username"] },
      { clientId: CONFIDENTIAL_BASIC_ID, secret: basicSecret, clientAuth: "basic", sent: "client_secret_basic", fields: ["grant_type", "password", "scope", "username"] },
    ];
    for (const c of cases) {
      stack.oauth.resetStats();
      stack.smtp.messages.length = 0;
      await poison.clearMessages();
      await deliversWithOneToken({ ...stack.env, CLIENT_ID: c.clientId, CLIENT_SECRET: c.secret, CLIENT_AUTH: c.clientAuth }, 3, c.clientAuth);
      assert.deepEqual(stack.oauth.stats.requests, [
        { grantType: "password", clientId: c.clientId, clientAuthentication: c.sent, fields: c.fields, username: LOCAL_MAILBOX, scope: DELEGATED_SCOPE, status: 200 },
      ]);
    }
  });

  it("MAILBOX_PASSWORD_NAME: reads the password from Key Vault once", async () => {
    kv.putSecret("mailbox-password", stack.env["MAILBOX_PASSWORD"] ?? "");
    await deliversWithOneToken({ ...stack.env, MAILBOX_PASSWORD: "", MAILBOX_PASSWORD_NAME: "mailbox-password", KEY_VAULT_URL: kv.vaultUrl }, 2, "vault");
    assert.equal(kv.counts.secretGets, 1);
  });

  it("a wrong password: TOKEN_AADSTS50126", async () => {
    const error = await refusedWith({ ...stack.env, MAILBOX_PASSWORD: wrongPassword }, "TOKEN_AADSTS50126");
    assert.match(error.response ?? "", /^400 invalid_grant AADSTS50126: Error validating credentials due to invalid username or password\./);
    assert.match(error.hint ?? "", /MAILBOX_PASSWORD/);
  });

  it("an account that must use MFA: TOKEN_AADSTS50076; one that must register for it: TOKEN_AADSTS50079", async () => {
    const required = await refusedWith({ ...stack.env, SMTP_USER: MFA_USER, MAIL_FROM: MFA_USER, MAILBOX_PASSWORD: mfaPassword }, "TOKEN_AADSTS50076");
    assert.match(required.response ?? "", /^400 invalid_grant AADSTS50076: .*must use multi-factor authentication to access 'https:\/\/outlook\.office365\.com'/);
    assert.match(required.hint ?? "", /AUTH_METHOD=certificate/);

    await queue.clearMessages();
    stack.oauth.resetStats();
    const enrol = await refusedWith({ ...stack.env, SMTP_USER: ENROL_USER, MAIL_FROM: ENROL_USER, MAILBOX_PASSWORD: mfaPassword }, "TOKEN_AADSTS50079");
    assert.match(enrol.response ?? "", /AADSTS50079: .*must enroll in multi-factor authentication/);
    assert.match(enrol.hint ?? "", /register for multi-factor authentication/);
  });

  it("a confidential app without its secret: TOKEN_AADSTS7000218, hint names the secret and public client flows", async () => {
    const error = await refusedWith({ ...stack.env, CLIENT_ID: CONFIDENTIAL_POST_ID }, "TOKEN_AADSTS7000218");
    assert.match(error.response ?? "", /^401 invalid_client AADSTS7000218: The request body must contain the following parameter: 'client_assertion' or 'client_secret'\./);
    assert.match(error.hint ?? "", /CLIENT_SECRET/);
    assert.match(error.hint ?? "", /Allow public client flows/);
  });

  it("the local server answers other password-grant mistakes with Entra's codes", async () => {
    const ask = (form: Record<string, string>) =>
      fetch(stack.oauth.tokenUrl, { method: "POST", headers: { "content-type": "application/x-www-form-urlencoded" }, body: new URLSearchParams(form) })
        .then(async (r) => ({ status: r.status, body: (await r.json()) as { error?: string; error_codes?: number[] } }));
    const good = { grant_type: "password", client_id: LOCAL_PUBLIC_CLIENT_ID, username: LOCAL_MAILBOX, password: stack.env["MAILBOX_PASSWORD"] ?? "", scope: DELEGATED_SCOPE };
    const answers = {
      ok: await ask(good),
      publicClientWithSecret: await ask({ ...good, client_secret: postSecret }),
      unknownUser: await ask({ ...good, username: "nobody@contoso.test" }),
      notConsented: await ask({ ...good, scope: "https://outlook.office365.com/Mail.Send" }),
      otherResource: await ask({ ...good, scope: "https://graph.microsoft.com/SMTP.Send" }),
      noPassword: await ask({ ...good, password: "" }),
    };
    assert.deepEqual(
      Object.fromEntries(Object.entries(answers).map(([name, a]) => [name, `${a.status} ${a.body.error ?? "token"} ${a.body.error_codes?.[0] ?? ""}`.trim()])),
      {
        ok: "200 token",
        publicClientWithSecret: "401 invalid_client 700025",
        unknownUser: "400 invalid_grant 50034",
        notConsented: "400 invalid_grant 65001",
        otherResource: "400 invalid_target 500011",
        noPassword: "400 invalid_request 900144",
      },
    );
  });

  it("warns once per process that the grant is deprecated, and leaves no password or secret in logs or poison records", () => {
    const lines = allLogs.flatMap((l) => l.lines);
    assert.ok(allPoisonRecords.length > 0, "poison records were captured");
    const warnings = lines.filter((line) => line.includes('"auth.password_grant_deprecated"'));
    assert.equal(warnings.length, 1, "one warning although every test created a credential");
    const warning = warnings[0] ?? "";
    assert.match(warning, /"level":"warn"/);
    for (const words of [/multi-factor/, /Conditional Access/, /AUTH_METHOD=certificate/, /refresh-token/]) assert.match(warning, words);

    const text = lines.join("\n") + JSON.stringify(allPoisonRecords);
    const formEncoded = (value: string) => new URLSearchParams({ v: value }).toString().slice(2);
    const secrets = {
      mailboxPassword: stack.env["MAILBOX_PASSWORD"] ?? "",
      mfaPassword,
      wrongPassword,
      postSecret,
      basicSecret,
      basicHeader: Buffer.from(`${formEncoded(CONFIDENTIAL_BASIC_ID)}:${formEncoded(basicSecret)}`).toString("base64"),
    };
    for (const [name, value] of Object.entries(secrets)) {
      assert.ok(value.length >= 20, name);
      assert.ok(!text.includes(value), `${name} appears in a log line or poison record`);
    }
    assert.doesNotMatch(text, /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\./, "no JWT");
    assert.doesNotMatch(text, /dXNlcj/, "no XOAUTH2 initial response");
  });
});
