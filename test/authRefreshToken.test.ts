// AUTH_METHOD=refresh-token in-process: its settings, and the credential against the local OAuth server (rotation on every use,
// reuse revokes the family) and the Key Vault double through the real Azure SDK (Set Secret adds a
// version): where the rotated token goes, what happens when it cannot be stored, what happens when
// the stored token is refused but a newer one has been stored meanwhile, and what the expiry watch
// says about the grant. The cross-instance lease is exercised with processes and Azurite in
// test/authorize.test.ts.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import { SecretClient } from "@azure/keyvault-secrets";
import { DefaultAzureCredential } from "@azure/identity";
import { startOAuthServer, type OAuthServer } from "../cli/local/oauthServer.js";
import { refreshTokenCredential } from "../shared/auth/refreshTokenCredential.js";
import { fileRefreshTokenStore, REFRESH_TOKEN_CONTENT_TYPE } from "../shared/auth/refreshTokenStore.js";
import { loadAuthorizeConfig, loadExpiryConfig, loadSendConfig, type AuthConfig } from "../shared/config.js";
import { ConfigError } from "../shared/errors.js";
import { collectFindings, expirySourcesFor } from "../shared/expiry/runExpiryWatch.js";
import { TokenProvider } from "../shared/token/tokenProvider.js";
import { capturingLogger, rejectionOf, type CapturedLogger } from "./support/harness.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";

const USER = "mailer@contoso.test";
const CLIENT_ID = "00000000-0000-4000-8000-0000000de1e9";
const SECRET_NAME = "mailer-refresh-token";
const DAY_MS = 86_400_000;

let oauth: OAuthServer;
let kv: KeyVaultDouble;
let restoreEnv: () => void;
let workDir: string;
let vault: SecretClient;
const logs: CapturedLogger[] = [];

function logger(): CapturedLogger {
  const captured = capturingLogger();
  logs.push(captured);
  return captured;
}

type RefreshAuth = Extract<AuthConfig, { method: "refresh-token" }>;

function auth(location: Record<string, string>): RefreshAuth {
  const config = loadSendConfig({
    AzureWebJobsStorage: "UseDevelopmentStorage=true",
    AUTH_METHOD: "refresh-token",
    TENANT_ID: "local-tenant",
    CLIENT_ID,
    TOKEN_URL: oauth.tokenUrl,
    TOKEN_SCOPE: oauth.delegatedRefreshScope,
    SMTP_USER: USER,
    KEY_VAULT_URL: kv.vaultUrl,
    ...location,
  });
  assert.ok(config.auth.method === "refresh-token");
  // One process: the in-process lease (no storage account in this file).
  return { ...config.auth, lease: undefined };
}

const events = (log: CapturedLogger, event: string) => log.lines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((r) => r["event"] === event);

before(async () => {
  workDir = mkdtempSync(join(tmpdir(), "qm-rt-store-"));
  oauth = await startOAuthServer({ clients: [{ clientId: CLIENT_ID, auth: "none", redirectUris: ["http://localhost"] }], users: [{ username: USER, password: randomBytes(12).toString("hex") }] });
  // Before any Azure SDK client exists in this process (NO_PROXY is read once per process).
  kv = await startKeyVaultDouble();
  restoreEnv = kv.applyEnv();
  vault = new SecretClient(kv.vaultUrl, new DefaultAzureCredential());
});

after(async () => {
  restoreEnv?.();
  await Promise.allSettled([kv?.close(), oauth?.close()]);
  if (workDir) rmSync(workDir, { recursive: true, force: true });
});

beforeEach(() => {
  oauth.resetStats();
  kv.resetCounts();
});

/** The values of every version of the vault secret, oldest first. */
async function versionValues(): Promise<string[]> {
  const versions: Array<{ created: number; version: string }> = [];
  for await (const properties of vault.listPropertiesOfSecretVersions(SECRET_NAME)) versions.push({ created: properties.createdOn?.getTime() ?? 0, version: properties.version ?? "" });
  versions.sort((a, b) => a.created - b.created);
  return Promise.all(versions.map(async (v) => (await vault.getSecret(SECRET_NAME, { version: v.version })).value ?? ""));
}

describe("settings", () => {
  const base = { AzureWebJobsStorage: "UseDevelopmentStorage=true", AUTH_METHOD: "refresh-token", TENANT_ID: "contoso.onmicrosoft.com", CLIENT_ID: CLIENT_ID, SMTP_USER: USER };
  const problems = (fn: () => unknown): string[] => {
    try {
      fn();
    } catch (error) {
      assert.ok(error instanceof ConfigError, String(error));
      return error.settings;
    }
    return assert.fail("expected a ConfigError");
  };

  it("defaults: Exchange SMTP.Send with offline_access, the v2 endpoints of the tenant, the storage account as the lease", () => {
    const config = loadSendConfig({ ...base, REFRESH_TOKEN_PATH: "rt.json" });
    assert.ok(config.auth.method === "refresh-token");
    assert.equal(config.auth.scope, "https://outlook.office365.com/SMTP.Send offline_access");
    assert.equal(config.auth.tokenUrl, "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token");
    assert.equal(config.auth.authorizeUrl, "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize");
    assert.equal(config.auth.deviceCodeUrl, "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode");
    assert.deepEqual(config.auth.refreshToken, { kind: "file", path: "rt.json" });
    assert.equal(config.auth.clientSecret, undefined);
    assert.equal(config.auth.lease?.connectionString, "UseDevelopmentStorage=true");
    const graph = loadSendConfig({ ...base, REFRESH_TOKEN_PATH: "rt.json", TRANSPORT: "graph" });
    assert.equal(graph.auth.scope, "https://graph.microsoft.com/Mail.Send offline_access");
  });

  it("REFRESH_TOKEN_NAME needs KEY_VAULT_URL; one place only; none is named with the fix", () => {
    const vault = loadSendConfig({ ...base, REFRESH_TOKEN_NAME: "rt", KEY_VAULT_URL: "https://v.vault.azure.net", CLIENT_SECRET: "s3cr3t-value-1234", CLIENT_AUTH: "basic" });
    assert.ok(vault.auth.method === "refresh-token");
    assert.deepEqual(vault.auth.refreshToken, { kind: "keyVault", vaultUrl: "https://v.vault.azure.net", name: "rt" });
    assert.deepEqual(vault.auth.clientSecret, { kind: "value", setting: "CLIENT_SECRET", value: "s3cr3t-value-1234" });
    assert.deepEqual(problems(() => loadSendConfig({ ...base, REFRESH_TOKEN_NAME: "rt" })), ["KEY_VAULT_URL"]);
    assert.deepEqual(problems(() => loadSendConfig({ ...base, REFRESH_TOKEN_NAME: "rt", REFRESH_TOKEN_PATH: "rt.json", KEY_VAULT_URL: "https://v.vault.azure.net" })), ["REFRESH_TOKEN_NAME"]);
    assert.deepEqual(problems(() => loadSendConfig(base)), ["REFRESH_TOKEN_NAME"]);
  });

  it("authorize: another provider without TENANT_ID names the endpoint it lacks; the redirect port is checked", () => {
    const google = { AUTH_METHOD: "refresh-token", CLIENT_ID: "x.apps.googleusercontent.com", TOKEN_URL: "https://oauth2.googleapis.com/token", TOKEN_SCOPE: "https://mail.google.com/", REFRESH_TOKEN_PATH: "rt.json" };
    assert.deepEqual(problems(() => loadAuthorizeConfig(google, "browser")), ["AUTHORIZE_URL"]);
    const ok = loadAuthorizeConfig({ ...google, AUTHORIZE_URL: "https://accounts.google.com/o/oauth2/v2/auth", AUTHORIZE_REDIRECT_PORT: "8765" }, "browser");
    assert.equal(ok.redirectPort, 8765);
    assert.equal(ok.auth.scope, "https://mail.google.com/");
    assert.deepEqual(problems(() => loadAuthorizeConfig({ ...google, AUTHORIZE_URL: "https://accounts.google.com/o/oauth2/v2/auth", AUTHORIZE_REDIRECT_PORT: "70000" }, "browser")), ["AUTHORIZE_REDIRECT_PORT"]);
    assert.deepEqual(problems(() => loadAuthorizeConfig({ ...google, AUTHORIZE_URL: "http://accounts.google.com/auth" }, "browser")), ["AUTHORIZE_URL"], "plain http off loopback");
  });
});

describe("REFRESH_TOKEN_NAME: the refresh token in Key Vault", () => {
  it("every rotation is stored as a new version, with its content type and the user, before the access token is used", async () => {
    const first = await oauth.issueRefreshToken(CLIENT_ID, USER, oauth.delegatedRefreshScope);
    await vault.setSecret(SECRET_NAME, first, { contentType: REFRESH_TOKEN_CONTENT_TYPE, tags: { user: USER } });
    kv.resetCounts();
    const log = logger();
    const credential = refreshTokenCredential(auth({ REFRESH_TOKEN_NAME: SECRET_NAME }), log);
    for (let i = 0; i < 2; i++) {
      // A provider per redemption: one provider would reuse its access token for an hour.
      const token = await new TokenProvider({ credential, logger: log }).getToken();
      const check = await oauth.verifyAccessToken(token.token, USER);
      assert.ok(check.ok, check.ok ? "" : check.reason);
    }
    const values = await versionValues();
    assert.equal(values.length, 3, "the sign-in and two rotations");
    assert.equal(values[0], first);
    assert.equal(new Set(values).size, 3);
    assert.equal(kv.counts.secretSets, 2);
    const current = await vault.getSecret(SECRET_NAME);
    assert.equal(current.properties.contentType, REFRESH_TOKEN_CONTENT_TYPE);
    assert.equal(current.properties.tags?.["user"], USER, "who signed in travels with each version");
    assert.equal(events(log, "refresh_token.rotated").length, 2);
    assert.equal(oauth.stats.familiesRevoked, 0);
    // The version that is current now is the one the server knows as live: it still works.
    const again = await fetch(oauth.tokenUrl, { method: "POST", body: new URLSearchParams({ grant_type: "refresh_token", client_id: CLIENT_ID, refresh_token: current.value ?? "", scope: oauth.delegatedRefreshScope }) });
    assert.equal(again.status, 200);
    oauth.revokeUserGrants(USER);
  });

  it("a rotation that cannot be stored: the token is used, kept in memory, the error names the setting and the role, and the store is retried", async () => {
    const first = await oauth.issueRefreshToken(CLIENT_ID, USER, oauth.delegatedRefreshScope);
    await vault.setSecret(SECRET_NAME, first);
    kv.resetCounts();
    // The identity has Secrets User only (reads, cannot write): the next three writes are refused.
    kv.failNext(3, 403, undefined, undefined, "secretSets");
    const log = logger();
    const credential = refreshTokenCredential(auth({ REFRESH_TOKEN_NAME: SECRET_NAME }), log, { storeRetryMs: 300 });
    const tokens = new TokenProvider({ credential, logger: log });
    const token = await tokens.getToken();
    assert.ok((await oauth.verifyAccessToken(token.token, USER)).ok, "the access token is good although its refresh token is not stored yet");
    const failed = events(log, "refresh_token.store_failed");
    assert.equal(failed.length, 1);
    assert.equal(failed[0]!["setting"], "REFRESH_TOKEN_NAME");
    assert.match(JSON.stringify(failed[0]!["error"]), /KEYVAULT_ACCESS_DENIED.*Key Vault Secrets Officer/);
    // A second redemption while the store still fails uses the token held in memory (the stored
    // one is rotated out: this server would revoke the family if it came back).
    await new TokenProvider({ credential, logger: log }).getToken();
    assert.deepEqual(oauth.stats.requests.map((r) => r.status), [200, 200]);
    assert.equal(oauth.stats.familiesRevoked, 0);
    // The retries go on until the vault takes it: then the newest token is the current version.
    const deadline = Date.now() + 10_000;
    while (events(log, "refresh_token.rotated").length === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(kv.counts.secretSets, 4, "three refused writes, then one stored");
    const values = await versionValues();
    const newest = values.at(-1)!;
    assert.notEqual(newest, first);
    assert.equal(events(log, "refresh_token.rotated").length, 1);
    const works = await fetch(oauth.tokenUrl, { method: "POST", body: new URLSearchParams({ grant_type: "refresh_token", client_id: CLIENT_ID, refresh_token: newest, scope: oauth.delegatedRefreshScope }) });
    assert.equal(works.status, 200, "the stored token is the live one");
    oauth.revokeUserGrants(USER);
  });
});

describe("REFRESH_TOKEN_PATH: refused tokens", () => {
  it("invalid_grant, but a newer token was stored meanwhile (another instance, or queue-mailer authorize): read again and use it", async () => {
    const path = join(workDir, "reread.json");
    const store = fileRefreshTokenStore(path);
    const dead = await oauth.issueRefreshToken(CLIENT_ID, USER, oauth.delegatedRefreshScope);
    oauth.revokeUserGrants(USER);
    await store.write({ token: dead, user: USER });
    const log = logger();
    const tokens = new TokenProvider({ credential: refreshTokenCredential(auth({ REFRESH_TOKEN_PATH: path }), log), logger: log });
    // The refusal takes 400 ms; the new token lands in the file while the request is in flight.
    oauth.delayTokenResponses(400);
    try {
      const pending = tokens.getToken();
      await new Promise((resolve) => setTimeout(resolve, 150));
      const fresh = await oauth.issueRefreshToken(CLIENT_ID, USER, oauth.delegatedRefreshScope);
      await store.write({ token: fresh, user: USER });
      const token = await pending;
      assert.ok((await oauth.verifyAccessToken(token.token, USER)).ok);
      assert.deepEqual(oauth.stats.requests.map((r) => r.status), [400, 200], "refused, then the newer token worked");
      assert.equal(events(log, "refresh_token.reread").length, 1);
      const stored = (await store.read()).token;
      assert.notEqual(stored, fresh, "the newer token was rotated and that rotation stored");
    } finally {
      oauth.delayTokenResponses(0);
      oauth.revokeUserGrants(USER);
    }
  });

  it("invalid_grant and nothing newer: a config failure whose hint says to run queue-mailer authorize", async () => {
    const path = join(workDir, "revoked.json");
    const dead = await oauth.issueRefreshToken(CLIENT_ID, USER, oauth.delegatedRefreshScope);
    oauth.revokeUserGrants(USER);
    await fileRefreshTokenStore(path).write({ token: dead });
    const log = logger();
    const tokens = new TokenProvider({ credential: refreshTokenCredential(auth({ REFRESH_TOKEN_PATH: path }), log), logger: log });
    const error = await rejectionOf(tokens.getToken());
    assert.equal(error.code, "TOKEN_AADSTS50173");
    assert.equal(error.kind, "config");
    assert.match(error.hint ?? "", /REFRESH_TOKEN_PATH .*refused and no newer one is stored: a user must sign in again with `queue-mailer authorize`/);
    assert.equal(oauth.stats.requests.length, 1, "the store held the same token: no second request");
  });

  it("nobody signed in yet: REFRESH_TOKEN_MISSING (config) naming queue-mailer authorize, no request sent", async () => {
    const log = logger();
    const tokens = new TokenProvider({ credential: refreshTokenCredential(auth({ REFRESH_TOKEN_PATH: join(workDir, "absent.json") }), log), logger: log });
    const error = await rejectionOf(tokens.getToken());
    assert.equal(error.code, "REFRESH_TOKEN_MISSING");
    assert.equal(error.kind, "config");
    assert.match(error.hint ?? "", /queue-mailer authorize/);
    assert.equal(oauth.stats.tokenRequests, 0);
  });
});

describe("expiry watch: the delegated sign-in", () => {
  const expiryEnv = (extra: Record<string, string>) => ({ AUTH_METHOD: "refresh-token", EXPIRY_WARN_DAYS: "30,14,7", EXPIRY_CRITICAL_DAYS: "3", ...extra });

  it("a file last rotated 80 days ago: a warning 10 days before Microsoft's 90-day inactivity limit, naming the user", async () => {
    const path = join(workDir, "quiet.json");
    const rotatedAt = new Date(Date.now() - 80 * DAY_MS);
    writeFileSync(path, JSON.stringify({ refresh_token: randomBytes(24).toString("base64url"), user: USER, rotatedAt: rotatedAt.toISOString() }), { mode: 0o600 });
    const config = loadExpiryConfig(expiryEnv({ REFRESH_TOKEN_PATH: path }));
    const [finding, ...rest] = await collectFindings(expirySourcesFor(config), config, new Date());
    assert.equal(rest.length, 0);
    assert.equal(finding?.kind, "refresh-token");
    assert.equal(finding?.status, "warning");
    assert.equal(finding?.daysLeft, 10);
    assert.match(finding?.name ?? "", new RegExp(`Delegated sign-in of ${USER.replace(".", "\\.")} .*last rotated ${rotatedAt.toISOString().slice(0, 10)}, 80 days ago; Microsoft ends it after 90 days unused`));
    assert.match(finding?.action ?? "", /queue-mailer authorize/);
  });

  it("a token pasted into the file by hand: dated by the file's modification time; past 90 days it is expired", async () => {
    const path = join(workDir, "pasted.txt");
    writeFileSync(path, `${randomBytes(24).toString("base64url")}\n`, { mode: 0o600 });
    const old = new Date(Date.now() - 95 * DAY_MS);
    utimesSync(path, old, old);
    const config = loadExpiryConfig(expiryEnv({ REFRESH_TOKEN_PATH: path }));
    const [finding] = await collectFindings(expirySourcesFor(config), config, new Date());
    assert.equal(finding?.status, "expired");
  });

  it("Key Vault: dated by the current version, so a rotation just now is far from the limit", async () => {
    await vault.setSecret(SECRET_NAME, randomBytes(24).toString("base64url"), { tags: { user: USER } });
    const config = loadExpiryConfig(expiryEnv({ KEY_VAULT_URL: kv.vaultUrl, REFRESH_TOKEN_NAME: SECRET_NAME, EXPIRY_WATCH_NAMES: "nothing-else" }));
    const findings = await collectFindings(expirySourcesFor(config), config, new Date());
    const finding = findings.find((f) => f.kind === "refresh-token");
    assert.equal(finding?.status, "ok", JSON.stringify(findings));
    assert.equal(finding?.daysLeft, 90);
    assert.equal(finding?.source, `${kv.vaultUrl}/secrets/${SECRET_NAME}`);
  });

  it("no refresh token or client secret in any log line", () => {
    const secrets = oauth.secretsSeen();
    assert.ok(secrets.length >= 8);
    const text = logs.flatMap((l) => l.lines).join("\n");
    assert.ok(text.length > 0);
    for (const secret of secrets) assert.ok(!text.includes(secret), `a secret (${secret.slice(0, 6)}…) appears in the logs`);
  });
});
