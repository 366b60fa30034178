// `queue-mailer authorize --device-code` (RFC 8628) and the ways a browser sign-in can fail, against
// the local OAuth server alone (no queue needed: authorize only signs in and stores the token).
// The device flow runs with a confidential client (client_secret_basic), so the secret travels the
// registered way on every request; the server enforces the polling interval (a poll too early is
// slow_down) and the test makes it answer one authorization_pending and one slow_down before the
// user (this test, as a browser) enters the code. The stored refresh token is then redeemed
// in-process by the sender's own credential. Failures: a declined consent (access_denied) and a
// sign-in that never comes back (--timeout) end the command with what to do, store nothing, and
// leave no listener behind.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { startOAuthServer, type OAuthServer } from "../cli/local/oauthServer.js";
import { refreshTokenCredential } from "../shared/auth/refreshTokenCredential.js";
import { loadSendConfig } from "../shared/config.js";
import { TokenProvider } from "../shared/token/tokenProvider.js";
import { Browser, formsOf } from "./support/browser.js";
import { startCli, type CliResult } from "./support/cli.js";
import { capturingLogger, within } from "./support/harness.js";

const USER = "mailer@contoso.test";
const password = randomBytes(18).toString("base64url");
const CONFIDENTIAL_ID = "00000000-0000-4000-8000-0000000dc0de";
const PUBLIC_ID = "00000000-0000-4000-8000-0000000b0b0b";
const clientSecret = `${randomBytes(18).toString("base64")}~+/:`;

let oauth: OAuthServer;
let workDir: string;
const outputs: string[] = [];

function settings(overrides: Record<string, string> = {}): Record<string, string> {
  return {
    AUTH_METHOD: "refresh-token",
    TENANT_ID: "local-tenant",
    CLIENT_ID: PUBLIC_ID,
    TOKEN_URL: oauth.tokenUrl,
    AUTHORIZE_URL: oauth.authorizeUrl,
    DEVICE_CODE_URL: oauth.deviceCodeUrl,
    TOKEN_SCOPE: oauth.delegatedRefreshScope,
    SMTP_USER: USER,
    REFRESH_TOKEN_PATH: join(workDir, "refresh-token.json"),
    ...overrides,
  };
}

async function finished(running: { done: Promise<CliResult> }): Promise<CliResult> {
  const result = await running.done;
  outputs.push(result.stdout, result.stderr);
  return result;
}

before(async () => {
  workDir = mkdtempSync(join(tmpdir(), "qm-device-"));
  oauth = await startOAuthServer({
    // Short interval, so that a slow_down (+5 s) is the longest wait of this file.
    deviceCodeIntervalSeconds: 1,
    clients: [
      { clientId: CONFIDENTIAL_ID, auth: "client_secret_basic", secret: clientSecret, redirectUris: [] },
      { clientId: PUBLIC_ID, auth: "none", redirectUris: ["http://localhost"] },
    ],
    users: [{ username: USER, password }],
  });
});

after(async () => {
  await oauth?.close();
  if (workDir) rmSync(workDir, { recursive: true, force: true });
});

describe("queue-mailer authorize --device-code", () => {
  it("prints the code and URL, honours authorization_pending and slow_down, and stores a working refresh token", async () => {
    const path = join(workDir, "device-token.json");
    const env = settings({ CLIENT_ID: CONFIDENTIAL_ID, CLIENT_SECRET: clientSecret, CLIENT_AUTH: "basic", REFRESH_TOKEN_PATH: path });
    // A failing test must not leave the command waiting for minutes.
    const authorize = startCli(["authorize", "--device-code", "--timeout", "30"], { env });
    const verificationUrl = await authorize.line(/^http:\/\/127\.0\.0\.1:\d+\/devicelogin$/, "the verification URL on a line of its own");
    assert.equal(verificationUrl, oauth.verificationUrl);
    const userCode = /enter the code: ([A-Z]{4}-[A-Z]{4})$/.exec(await authorize.line(/enter the code: /, "the user code"))?.[1];
    assert.ok(userCode, authorize.output().stdout);

    // First poll, one interval after the code: the user has not signed in yet.
    await within(waitFor(() => oauth.stats.devicePolls.length === 1), 10_000, "the first poll");
    assert.equal(oauth.stats.devicePolls[0]?.answer, "authorization_pending");
    // The next pending poll is told to slow down; the user signs in only after it.
    oauth.slowDownNextDevicePoll();
    await within(waitFor(() => oauth.stats.devicePolls.length === 2), 10_000, "the second poll");
    assert.equal(oauth.stats.devicePolls[1]?.answer, "slow_down");

    const browser = new Browser();
    const entry = await browser.open(verificationUrl);
    const confirm = await browser.submit(entry, { user_code: userCode });
    const login = await browser.submit(confirm, {}, "op.deviceConfirmForm");
    const consent = await browser.submit(login, { username: USER, password });
    const done = await browser.submit(consent, {}, "accept");
    assert.match(done.html, /You have signed in/);

    const result = await finished(authorize);
    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stdout, /Signed in as mailer@contoso\.test/);
    assert.ok(result.stdout.includes(`Refresh token stored in REFRESH_TOKEN_PATH ${path}`));
    const polls = oauth.stats.devicePolls.map((p) => p.answer);
    assert.deepEqual(polls, ["authorization_pending", "slow_down", "issued"]);
    // After slow_down the interval is 1 + 5 s; the server counts any poll that came sooner.
    assert.equal(oauth.stats.devicePollsTooEarly, 0);
    assert.ok(oauth.stats.devicePolls[2]!.at - oauth.stats.devicePolls[1]!.at >= 5_700, "waited the longer interval");
    // The secret travelled as registered (Basic) on every poll.
    const device = oauth.stats.requests.filter((r) => r.grantType === "urn:ietf:params:oauth:grant-type:device_code");
    assert.equal(device.length, 3);
    assert.ok(device.every((r) => r.clientAuthentication === "client_secret_basic" && !r.fields.includes("client_secret")));
    assert.equal(statSync(path).mode & 0o777, 0o600);

    // The sender's credential redeems it: a delegated token for the user, and the token rotates.
    const stored = (JSON.parse(readFileSync(path, "utf8")) as { refresh_token: string }).refresh_token;
    const config = loadSendConfig({ ...env, AzureWebJobsStorage: "UseDevelopmentStorage=true" });
    assert.ok(config.auth.method === "refresh-token");
    const logger = capturingLogger();
    const tokens = new TokenProvider({ credential: refreshTokenCredential({ ...config.auth, lease: undefined }, logger), logger });
    const token = await tokens.getToken();
    const check = await oauth.verifyAccessToken(token.token, USER);
    assert.ok(check.ok, check.ok ? "" : check.reason);
    assert.notEqual((JSON.parse(readFileSync(path, "utf8")) as { refresh_token: string }).refresh_token, stored, "rotated and stored");
    outputs.push(...logger.lines);
  });
});

describe("queue-mailer authorize: failures end the command with what to do", () => {
  it("consent declined: error=access_denied is shown with the fix, nothing is stored, the listener is closed", async () => {
    const path = join(workDir, "declined.json");
    const authorize = startCli(["authorize", "--timeout", "30"], { env: settings({ REFRESH_TOKEN_PATH: path }) });
    const url = await authorize.line(/^http:\/\/127\.0\.0\.1:\d+\/local-tenant\/oauth2\/v2\.0\/authorize\?/, "the authorization URL");
    const redirect = new URL(url).searchParams.get("redirect_uri")!;
    const browser = new Browser();
    const login = await browser.open(url);
    const consent = await browser.submit(login, { username: USER, password });
    assert.ok(formsOf(consent).some((f) => f.id === "decline"));
    const landed = await browser.submit(consent, {}, "decline");
    assert.match(landed.html, /did not complete/);
    const result = await finished(authorize);
    assert.equal(result.status, 1);
    assert.match(result.stderr, /AUTHORIZE_ACCESS_DENIED: the sign-in answered access_denied: AADSTS65004: User declined to consent/);
    assert.match(result.stderr, /hint: The sign-in was cancelled or consent was declined\. Run `queue-mailer authorize` again/);
    assert.equal(existsSync(path), false, "nothing stored");
    await assert.rejects(fetch(redirect, { signal: AbortSignal.timeout(2_000) }));
  });

  it("no sign-in within --timeout: AUTHORIZE_TIMEOUT, nothing stored, the listener is closed", async () => {
    const path = join(workDir, "timeout.json");
    const authorize = startCli(["authorize", "--timeout", "2"], { env: settings({ REFRESH_TOKEN_PATH: path }) });
    const url = await authorize.line(/\/authorize\?/, "the authorization URL");
    const redirect = new URL(url).searchParams.get("redirect_uri")!;
    const result = await finished(authorize);
    assert.equal(result.status, 1);
    assert.match(result.stderr, /AUTHORIZE_TIMEOUT: no sign-in came back to http:\/\/localhost:\d+\/ in time; nothing was stored/);
    assert.equal(existsSync(path), false);
    await assert.rejects(fetch(redirect, { signal: AbortSignal.timeout(2_000) }));
  });

  it("a redirect with another state is refused (nothing stored)", async () => {
    const path = join(workDir, "state.json");
    const authorize = startCli(["authorize", "--timeout", "30"], { env: settings({ REFRESH_TOKEN_PATH: path }) });
    const url = await authorize.line(/\/authorize\?/, "the authorization URL");
    const redirect = new URL(new URL(url).searchParams.get("redirect_uri")!);
    redirect.search = new URLSearchParams({ code: "forged-code-value", state: "not-the-state" }).toString();
    const answer = await fetch(redirect);
    assert.equal(answer.status, 400);
    const result = await finished(authorize);
    assert.equal(result.status, 1);
    assert.match(result.stderr, /AUTHORIZE_STATE_MISMATCH/);
    assert.equal(existsSync(path), false);
    assert.equal(oauth.stats.requests.filter((r) => r.grantType === "authorization_code").length, 0, "the forged code was never redeemed");
  });

  it("AUTH_METHOD other than refresh-token, or no place for the token: the settings are named", async () => {
    const wrong = await finished({ done: startCli(["authorize"], { env: settings({ AUTH_METHOD: "certificate" }) }).done });
    assert.equal(wrong.status, 2);
    assert.match(wrong.stderr, /AUTH_METHOD: is "certificate", but `queue-mailer authorize` signs a user in/);
    const nowhere = await finished({ done: startCli(["authorize"], { env: settings({ REFRESH_TOKEN_PATH: "" }) }).done });
    assert.equal(nowhere.status, 2);
    assert.match(nowhere.stderr, /REFRESH_TOKEN_NAME: is not set, and neither is REFRESH_TOKEN_PATH/);
  });

  it("no token, code, device code, client secret or password in any output", () => {
    const secrets = [...oauth.secretsSeen(), clientSecret, password];
    assert.ok(secrets.length >= 8, `only ${secrets.length} secrets seen`);
    const text = outputs.join("\n");
    for (const secret of secrets) assert.ok(!text.includes(secret), `a secret (${secret.slice(0, 6)}…) appears in the output`);
  });
});

async function waitFor(condition: () => boolean): Promise<void> {
  while (!condition()) await new Promise((resolve) => setTimeout(resolve, 20));
}
