// AUTH_METHOD=google-service-account through the whole path: Azurite queue → worker → the service
// account's JSON key (a file, or a Key Vault secret read through the real Azure SDK from the Key
// Vault double) → RFC 7523 JWT bearer grant verified by the Google token endpoint double
// (oidc-provider + jose: signature by kid, iss, sub, aud, scope, lifetime) → token → SMTP sink that
// checks the token's subject is the XOAUTH2 user. Google's own error bodies (and Gmail's 535 5.7.8)
// are produced by really breaking the setup (delegation revoked, unknown user, key deleted, clock
// off) and must open the circuit without poisoning anything. The key's age feeds the expiry watch.
import assert from "node:assert/strict";
import { utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import { GOOGLE_MAIL_SCOPE, MAX_ASSERTION_LIFETIME_SECONDS, type GoogleServiceAccountKeyJson, type GoogleTokenServer } from "../cli/local/googleTokenServer.js";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import type { SmtpFault, SmtpFaultAction } from "../cli/local/smtpSink.js";
import { loadExpiryConfig, loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { runConfiguredExpiryWatch } from "../shared/expiry/expiryWatch.js";
import type { ExpiryFinding } from "../shared/expiry/finding.js";
import { collectFindings, expirySourcesFor } from "../shared/expiry/runExpiryWatch.js";
import { openMailQueues, type MailQueues } from "../shared/queue/mailQueue.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";
import { capturingLogger, drain, readPoison, useLocalStack, within, type CapturedLogger } from "./support/harness.js";

const DAY_MS = 86_400_000;
/** Gmail's reply to a refused XOAUTH2 token (one line here: the sink cannot send a multi-line reply at AUTH). */
const GMAIL_BAD_CREDENTIALS = "5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials";

let fault: ((ctx: SmtpFault) => SmtpFaultAction | undefined) | undefined;
const allLogs: CapturedLogger[] = [];
const allPoison: unknown[] = [];
/** Every private key this file created: none may appear anywhere. */
const privateKeys: string[] = [];

function newLogger(): CapturedLogger {
  const logger = capturingLogger();
  allLogs.push(logger);
  return logger;
}

function events(logger: CapturedLogger, event: string): Array<Record<string, unknown>> {
  return logger.lines.map((line) => JSON.parse(line) as Record<string, unknown>).filter((r) => r["event"] === event);
}

describe("AUTH_METHOD=google-service-account", () => {
  const local = useLocalStack("qm-google-", { authMethod: "google-service-account", fault: (ctx) => fault?.(ctx) });
  let kv: KeyVaultDouble;
  let restoreEnv: (() => void) | undefined;
  let queues: MailQueues;
  let google: GoogleTokenServer;
  let key: GoogleServiceAccountKeyJson;

  /** A new key of the stack's service account, written to a file; its settings. */
  function keyFile(name: string, newKey: GoogleServiceAccountKeyJson): string {
    privateKeys.push(newKey.private_key);
    const path = join(local.workDir, name);
    writeFileSync(path, JSON.stringify(newKey, null, 2), { mode: 0o600 });
    return path;
  }

  before(async () => {
    kv = await startKeyVaultDouble();
    // Before any Azure SDK client of this process is built: NO_PROXY is read once per process.
    restoreEnv = kv.applyEnv();
    queues = await openMailQueues(loadStorageConfig(local.stack.env));
    assert.ok(local.stack.google, "the stack serves Google");
    ({ server: google, key } = local.stack.google);
    privateKeys.push(key.private_key);
  });

  after(async () => {
    restoreEnv?.();
    await kv?.close();
  });

  beforeEach(async () => {
    fault = undefined;
    await Promise.all([queues.queue.clearMessages(), queues.poison.clearMessages()]);
    local.stack.smtp.messages.length = 0;
    local.stack.smtp.resetStats();
    google.resetStats();
    google.setClockOffset(0);
    google.delegate(key.client_id, [GOOGLE_MAIL_SCOPE]);
    kv.resetCounts();
  });

  /** What the token endpoint received, checked claim by claim against the key and the settings. */
  function assertAssertionFrom(usedKey: GoogleServiceAccountKeyJson): void {
    assert.ok(google.stats.assertions.length > 0, "an assertion reached the token endpoint");
    for (const { header, claims, formFields } of google.stats.assertions) {
      assert.deepEqual(formFields.sort(), ["assertion", "grant_type"], "Google's form: no client_id, no scope field");
      assert.equal(header["alg"], "RS256");
      assert.equal(header["kid"], usedKey.private_key_id, "kid = private_key_id");
      assert.equal(claims["iss"], usedKey.client_email, "iss = client_email");
      assert.equal(claims["sub"], LOCAL_MAILBOX, "sub = SMTP_USER");
      assert.equal(claims["aud"], usedKey.token_uri, "aud = the key's token_uri (TOKEN_URL unset)");
      assert.equal(claims["scope"], GOOGLE_MAIL_SCOPE, "scope = TOKEN_SCOPE's default for this method");
      const lifetime = Number(claims["exp"]) - Number(claims["iat"]);
      assert.ok(lifetime > 0 && lifetime <= MAX_ASSERTION_LIFETIME_SECONDS, `lifetime ${lifetime}s within Google's hour`);
      assert.ok(Math.abs(Number(claims["iat"]) - Date.now() / 1000) < 60, "a fresh iat");
    }
  }

  async function delivered(env: Record<string, string>, count: number, prefix: string): Promise<void> {
    for (let i = 0; i < count; i++) await enqueueEmail(queues.queue, { to: `${prefix}${i}@example.test`, subject: `${prefix} ${i}`, text: `Body ${i}` });
    const logger = newLogger();
    const result = await within(drain(env, logger), 30_000, "the worker to drain");
    allPoison.push(...(await readPoison(result.mailer)));
    assert.deepEqual({ sent: result.sent, poisoned: result.poisoned, retried: result.retried }, { sent: count, poisoned: 0, retried: 0 }, logger.lines.slice(-10).join("\n"));
    const messages = local.stack.smtp.messages;
    assert.equal(new Set(messages.map((m) => m.headers["subject"]?.[0])).size, count, "each message arrived exactly once");
    for (const message of messages) assert.equal(message.authUser, LOCAL_MAILBOX, "XOAUTH2 user = SMTP_USER, accepted by the sink's token check");
    assert.equal(google.stats.tokenRequests, 1, `one token for ${count} messages`);
    assert.equal(google.stats.tokensIssued, 1);
    assert.equal((await queues.queue.getProperties()).approximateMessagesCount, 0);
    assert.equal((await queues.poison.peekMessages({ numberOfMessages: 32 })).peekedMessageItems.length, 0);
  }

  it("key from a file (GOOGLE_KEY_PATH): delivers with one token request, and the token endpoint verified what we sent", async () => {
    await delivered(local.stack.env, 5, "file");
    assertAssertionFrom(key);
    assert.equal(google.stats.errors.length, 0);
  });

  it("key from Key Vault (GOOGLE_KEY_NAME): delivers with one token request and one secret read", async () => {
    // A second key of the same service account, so the kid proves which key signed.
    const vaultKey = google.createKey(key.client_email);
    privateKeys.push(vaultKey.private_key);
    kv.putSecret("google-sa-key", JSON.stringify(vaultKey), { contentType: "application/json" });
    await delivered({ ...local.stack.env, GOOGLE_KEY_PATH: "", GOOGLE_KEY_NAME: "google-sa-key", KEY_VAULT_URL: kv.vaultUrl }, 3, "vault");
    assertAssertionFrom(vaultKey);
    assert.notEqual(vaultKey.private_key_id, key.private_key_id);
    assert.equal(kv.counts.secretGets, 1, "the key is read once");
  });

  describe("Google's refusals: config errors, circuit open, nothing poisoned, the message waits", () => {
    async function refused(env: Record<string, string>, expected: { code: string; hint: RegExp; response?: RegExp }): Promise<CapturedLogger> {
      await enqueueEmail(queues.queue, { to: "waits@example.test", subject: "Waits for the fix", text: "x" });
      const logger = newLogger();
      const result = await within(drain(env, logger), 30_000, "the worker to stop on the broken setup");
      const poison = await readPoison(result.mailer);
      allPoison.push(...poison);
      assert.equal(result.circuitOpen?.code, expected.code, logger.lines.slice(-8).join("\n"));
      assert.equal(result.circuitOpen?.kind, "config");
      assert.match(result.circuitOpen?.hint ?? "", expected.hint);
      if (expected.response) assert.match(result.circuitOpen?.response ?? "", expected.response);
      assert.equal(result.poisoned, 0);
      assert.equal(poison.length, 0, "nothing poisoned");
      assert.equal(local.stack.smtp.messages.length, 0, "nothing delivered");
      assert.equal((await queues.queue.getProperties()).approximateMessagesCount, 1, "the message is still queued");
      assert.equal(events(logger, "circuit.open").length, 1, "one clear error");
      return logger;
    }

    it("unauthorized_client (no domain-wide delegation): TOKEN_UNAUTHORIZED_CLIENT with the Admin console step", async () => {
      google.revokeDelegation(key.client_id);
      await refused(local.stack.env, {
        code: "TOKEN_UNAUTHORIZED_CLIENT",
        hint: /Domain-wide delegation.*client ID.*https:\/\/mail\.google\.com\//s,
        response: /^401 unauthorized_client Client is unauthorized to retrieve access tokens using this method/,
      });
      // The failed attempt and the worker's one probe before a drain gives up: both refused.
      assert.ok(google.stats.errors.length >= 1);
      assert.deepEqual(new Set(google.stats.errors.map((e) => e.error)), new Set(["unauthorized_client"]));
    });

    it("invalid_grant 'Invalid email or User ID' (SMTP_USER not in the domain): TOKEN_INVALID_GRANT naming SMTP_USER", async () => {
      await refused({ ...local.stack.env, SMTP_USER: "nobody@contoso.test", MAIL_FROM: "nobody@contoso.test" }, {
        code: "TOKEN_INVALID_GRANT",
        hint: /SMTP_USER.*Workspace user/,
        response: /^400 invalid_grant Invalid email or User ID$/,
      });
      assert.equal(google.stats.assertions[0]?.claims["sub"], "nobody@contoso.test");
    });

    it("invalid_grant 'Invalid JWT Signature.' (key deleted in Google): TOKEN_INVALID_GRANT with the rotation step", async () => {
      const doomed = google.createKey(key.client_email);
      const path = keyFile("deleted-key.json", doomed);
      google.deleteKey(doomed.private_key_id);
      await refused({ ...local.stack.env, GOOGLE_KEY_PATH: path }, {
        code: "TOKEN_INVALID_GRANT",
        hint: /deleted or disabled.*new JSON key/,
        response: /^400 invalid_grant Invalid JWT Signature\.$/,
      });
    });

    it("a signature by a key Google does not hold for that kid is refused the same way (the double really verifies)", async () => {
      // Same kid and service account as the registered key, but another private key.
      const impostor = google.createKey(key.client_email);
      google.deleteKey(impostor.private_key_id);
      const path = keyFile("impostor-key.json", { ...impostor, private_key_id: key.private_key_id });
      await refused({ ...local.stack.env, GOOGLE_KEY_PATH: path }, { code: "TOKEN_INVALID_GRANT", hint: /deleted or disabled/, response: /Invalid JWT Signature/ });
      assert.match(google.stats.errors[0]?.detail ?? "", /signature does not verify/);
    });

    it("invalid_grant 'Invalid grant: account not found' (service account unknown to Google): TOKEN_INVALID_GRANT", async () => {
      const path = keyFile("unknown-account.json", { ...key, client_email: "deleted@queue-mailer-local.iam.gserviceaccount.com" });
      await refused({ ...local.stack.env, GOOGLE_KEY_PATH: path }, { code: "TOKEN_INVALID_GRANT", hint: /does not exist or is disabled/, response: /^400 invalid_grant Invalid grant: account not found$/ });
    });

    it("invalid_grant 'Token must be a short-lived token (60 minutes)…' (clock off by 2 h): TOKEN_INVALID_GRANT pointing at the clock", async () => {
      google.setClockOffset(2 * 3600);
      await refused(local.stack.env, {
        code: "TOKEN_INVALID_GRANT",
        hint: /clock/,
        response: /Invalid JWT: Token must be a short-lived token \(60 minutes\) and in a reasonable timeframe/,
      });
    });

    it("Gmail 535 5.7.8 'Username and Password not accepted': SMTP_AUTH_REJECTED with the Gmail hint, after one token renewal", async () => {
      fault = ({ phase }) => (phase === "auth" ? { reply: 535, message: GMAIL_BAD_CREDENTIALS } : undefined);
      await refused(local.stack.env, { code: "SMTP_AUTH_REJECTED", hint: /Gmail refused the token.*SMTP_USER.*https:\/\/mail\.google\.com\//, response: /^535 5\.7\.8 Username and Password not accepted/ });
      assert.equal(google.stats.tokenRequests, 2, "one token, then one renewal");
    });

    it("a malformed key file: GOOGLE_KEY_INVALID naming GOOGLE_KEY_PATH and the fix, without the key", async () => {
      const userCredential = { type: "authorized_user", client_id: "x", client_secret: "GOCSPX-never-printed-0123456789", refresh_token: "1//never-printed-refresh-token" };
      const path = join(local.workDir, "not-a-service-account.json");
      writeFileSync(path, JSON.stringify(userCredential));
      const logger = await refused({ ...local.stack.env, GOOGLE_KEY_PATH: path }, { code: "GOOGLE_KEY_INVALID", hint: /Create new key > JSON.*GOOGLE_KEY_PATH/ });
      const text = logger.lines.join("\n");
      assert.match(text, /GOOGLE_KEY_PATH \(.*not-a-service-account\.json\) is not a Google service account key: it is a user's OAuth credential/);
      assert.ok(!text.includes("never-printed"), "nothing of the file's content is printed");
      assert.equal(google.stats.tokenRequests, 0);
    });

    it("a malformed key in Key Vault: GOOGLE_KEY_INVALID naming GOOGLE_KEY_NAME, without the key", async () => {
      const broken = { ...key, private_key: "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n" };
      kv.putSecret("google-sa-broken", JSON.stringify(broken));
      const logger = await refused({ ...local.stack.env, GOOGLE_KEY_PATH: "", GOOGLE_KEY_NAME: "google-sa-broken", KEY_VAULT_URL: kv.vaultUrl }, { code: "GOOGLE_KEY_INVALID", hint: /Key Vault secret named by GOOGLE_KEY_NAME/ });
      assert.match(logger.lines.join("\n"), /GOOGLE_KEY_NAME \(secret \\"google-sa-broken\\" in https:\/\/[^)]+\) is not a Google service account key: private_key cannot be read/);
    });
  });

  describe("expiry watch: the key's age against Google's 90-day rotation", () => {
    const now = new Date();
    const findGoogle = (findings: ExpiryFinding[]): ExpiryFinding => {
      const found = findings.filter((f) => f.key.startsWith("google-key:") || f.name.startsWith("Google service account key"));
      assert.equal(found.length, 1, JSON.stringify(findings));
      return found[0]!;
    };
    const findingsFor = async (env: Record<string, string>, at = now) => {
      const config = loadExpiryConfig(env);
      return findGoogle(await collectFindings(expirySourcesFor(config), config, at));
    };

    it("reports the age from Google's published certificate: ok when new, warning within 30 days of 90, still a warning (rotation overdue, the key works) past 90", async () => {
      const fresh = await findingsFor({ AUTH_METHOD: "google-service-account", GOOGLE_KEY_PATH: local.stack.google!.keyPath });
      assert.equal(fresh.status, "ok");
      assert.match(fresh.name, new RegExp(`^Google key ${key.private_key_id.slice(0, 8)} of ${key.client_email} \\(created ${now.toISOString().slice(0, 10)}, 0 days old; rotate every 90 days\\)$`));
      assert.equal(fresh.inUse, true);
      assert.ok(google.stats.certificateRequests >= 1, "the published certificate was read");

      const at70 = google.createKey(key.client_email, { createdAt: new Date(Date.now() - 70 * DAY_MS) });
      const seventy = await findingsFor({ AUTH_METHOD: "google-service-account", GOOGLE_KEY_PATH: keyFile("key-70.json", at70) });
      assert.equal(seventy.status, "warning");
      assert.equal(seventy.daysLeft, 20);
      assert.match(seventy.name, /70 days old/);

      const createdAt = new Date(Date.now() - 100 * DAY_MS);
      const old = google.createKey(key.client_email, { createdAt });
      const env = { AUTH_METHOD: "google-service-account", GOOGLE_KEY_PATH: keyFile("key-100.json", old) };
      const hundred = await findingsFor(env);
      assert.equal(hundred.status, "warning", "past 90 days: rotation overdue, but the key still works");
      assert.equal(hundred.kind, "google-key");
      assert.match(hundred.action, /Create a new key for the service account/);
      assert.equal(hundred.daysLeft, -10);
      assert.equal(hundred.expiresOn?.getTime(), Math.floor(createdAt.getTime() / 1000) * 1000 + 90 * DAY_MS, "rotation date = creation + 90 days");
      assert.match(hundred.name, /100 days old/);

      // Through the deployed watch: the alert is logged (the channel that cannot be switched off).
      const logger = newLogger();
      await runConfiguredExpiryWatch({ config: loadExpiryConfig(env), storage: loadStorageConfig(local.stack.env), logger });
      const alerts = events(logger, "expiry.alert").filter((a) => String(a["name"]).includes(old.private_key_id.slice(0, 8)));
      assert.equal(alerts.length, 1);
      assert.equal(alerts[0]?.["status"], "warning");
      assert.equal(alerts[0]?.["level"], "warn");
      assert.equal(alerts[0]?.["inUse"], true);
    });

    it("uses Google's earlier expiry when an organisation policy set one", async () => {
      const expiring = google.createKey(key.client_email, { createdAt: new Date(Date.now() - 10 * DAY_MS), expiresAt: new Date(Date.now() + 5 * DAY_MS) });
      const finding = await findingsFor({ AUTH_METHOD: "google-service-account", GOOGLE_KEY_PATH: keyFile("key-policy.json", expiring) });
      assert.equal(finding.status, "critical");
      assert.equal(finding.daysLeft, 5);
    });

    it("falls back to the file's modification time, and says so, when Google's certificate cannot be had", async () => {
      const { client_x509_cert_url: _unused, ...withoutUrl } = google.createKey(key.client_email);
      const path = keyFile("key-no-url.json", withoutUrl as GoogleServiceAccountKeyJson);
      const modified = new Date(Date.now() - 95 * DAY_MS);
      utimesSync(path, modified, modified);
      const finding = await findingsFor({ AUTH_METHOD: "google-service-account", GOOGLE_KEY_PATH: path });
      assert.equal(finding.status, "warning");
      assert.match(finding.name, /95 days old; rotate every 90 days; age from the file's modification time \(the key has no client_x509_cert_url\), the key may be older/);
    });

    it("a key Google no longer lists (deleted) is an error finding with the rotation steps", async () => {
      const gone = google.createKey(key.client_email);
      const path = keyFile("key-gone.json", gone);
      google.deleteKey(gone.private_key_id);
      const finding = await findingsFor({ AUTH_METHOD: "google-service-account", GOOGLE_KEY_PATH: path });
      assert.equal(finding.status, "error");
      assert.match(finding.detail ?? "", /no longer lists key .* deleted or disabled/);
      assert.match(finding.action, /create a new JSON key/);
    });

    it("GOOGLE_KEY_NAME: the key is read from Key Vault; its age from Google, or from the secret version's date", async () => {
      const vaultKey = google.createKey(key.client_email, { createdAt: new Date(Date.now() - 3 * DAY_MS) });
      privateKeys.push(vaultKey.private_key);
      kv.putSecret("google-expiry-key", JSON.stringify(vaultKey));
      const env = { AUTH_METHOD: "google-service-account", GOOGLE_KEY_NAME: "google-expiry-key", KEY_VAULT_URL: kv.vaultUrl, EXPIRY_WATCH_NAMES: "nothing-else" };
      const published = await findingsFor(env);
      assert.equal(published.status, "ok");
      assert.match(published.name, /3 days old; rotate every 90 days\)$/);
      assert.match(published.source, /\/secrets\/google-expiry-key$/);

      const { client_x509_cert_url: _unused, ...withoutUrl } = google.createKey(key.client_email);
      privateKeys.push(withoutUrl.private_key);
      kv.putSecret("google-expiry-key", JSON.stringify(withoutUrl));
      const stored = await findingsFor(env, new Date(Date.now() + 100 * DAY_MS));
      assert.equal(stored.status, "warning", "100 days after the secret version was stored: rotation overdue");
      assert.match(stored.name, /age from the Key Vault secret version's date/);
    });
  });

  it("leaves no key, assertion, token or XOAUTH2 string in any log or poison record", () => {
    const lines = allLogs.flatMap((l) => l.lines);
    assert.ok(lines.some((line) => line.includes('"assertion.created"')), "debug logs were captured");
    assert.ok(lines.some((line) => line.includes('"google.key.loaded"')));
    const text = lines.join("\n") + JSON.stringify(allPoison);
    assert.doesNotMatch(text, /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\./, "no JWT (token or assertion)");
    assert.doesNotMatch(text, /PRIVATE KEY/);
    assert.doesNotMatch(text, /dXNlcj/, "no XOAUTH2 initial response");
    for (const pem of privateKeys) {
      const body = pem.split("\n")[5] ?? "never";
      assert.ok(!text.includes(body), "no key material");
    }
  });
});
