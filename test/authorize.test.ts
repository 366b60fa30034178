// AUTH_METHOD=refresh-token end to end, every program a real process: `queue-mailer authorize` signs
// the mailbox user in against oidc-provider (authorization code + PKCE, refresh tokens that rotate
// on every use and whose reuse revokes the whole family), with this test playing the user's browser:
// it opens the URL the command prints, signs in, consents and follows the redirect to the command's
// loopback listener. Then `queue-mailer worker --drain` delivers through the SMTP sink, which
// accepts only a delegated token (scp SMTP.Send) for that very user; each redemption rotates the
// stored refresh token; two workers started together on one stored token both deliver (one
// redeemer at a time: the lease in Azurite's Table service); the old token is refused; a revoked
// grant opens the circuit without poisoning anything. Finally no token, code or PKCE verifier may
// appear in anything any of these processes printed.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import type { QueueClient } from "@azure/storage-queue";
import { LOCAL_DELEGATED_CLIENT_ID, LOCAL_MAILBOX, startLocalStack, type LocalStack } from "../cli/local/localStack.js";
import { loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { Browser, formsOf } from "./support/browser.js";
import { spawnCli, startCli, type CliResult, type RunningCli } from "./support/cli.js";

let stack: LocalStack;
let workDir: string;
let queue: QueueClient;
let poison: QueueClient;
/** Everything every process printed, searched for secrets at the end. */
const outputs: string[] = [];
/** Each refresh token that was stored, in order. */
const storedTokens: string[] = [];
const browser = new Browser();

/** The settings every process gets: the stack's, and the CA for STARTTLS to the SMTP sink. */
const env = () => ({ ...stack.env, NODE_EXTRA_CA_CERTS: stack.caPath });

function storedToken(): string {
  const token = (JSON.parse(readFileSync(stack.refreshTokenPath!, "utf8")) as { refresh_token: string }).refresh_token;
  if (storedTokens.at(-1) !== token) storedTokens.push(token);
  return token;
}

/** `queue-mailer authorize`, running; its output joins `outputs` when it ends. */
function startAuthorize(args: string[]): RunningCli {
  const running = startCli(["authorize", ...args], { env: env(), timeoutMs: 60_000 });
  void running.done.then((result) => outputs.push(result.stdout, result.stderr));
  return running;
}

async function worker(extra: Record<string, string> = {}): Promise<CliResult> {
  const result = await spawnCli(["worker", "--drain", "--log-level", "debug"], { env: { ...env(), ...extra }, timeoutMs: 30_000 });
  outputs.push(result.stdout, result.stderr);
  return result;
}

async function enqueue(count: number, tag: string, to: QueueClient = queue): Promise<void> {
  for (let i = 0; i < count; i++) await enqueueEmail(to, { to: `${tag}${i}@example.test`, subject: `${tag} ${i}`, text: `Body ${i}` });
}

/** The refresh token grants the token endpoint answered since the last reset, as "status". */
const refreshRedemptions = () => stack.oauth.stats.requests.filter((r) => r.grantType === "refresh_token").map((r) => r.status);

before(async () => {
  workDir = mkdtempSync(join(tmpdir(), "qm-authorize-"));
  // Nobody has signed in yet: `queue-mailer authorize` is what stores the first refresh token.
  stack = await startLocalStack({ caDir: ".test-ca", workDir, authMethod: "refresh-token", authorizeRefreshToken: false });
  ({ queue, poison } = await openMailQueues(loadStorageConfig(stack.env)));
});

after(async () => {
  await stack?.stop();
  if (workDir) rmSync(workDir, { recursive: true, force: true });
});

beforeEach(() => {
  stack.oauth.resetStats();
  stack.smtp.messages.length = 0;
});

describe("AUTH_METHOD=refresh-token", { concurrency: false }, () => {
  it("queue-mailer authorize: the printed URL, sign-in, consent and the loopback redirect store a refresh token; the listener closes", async () => {
    const authorize = startAuthorize([]);
    const url = await authorize.line(new RegExp(`^${stack.oauth.authorizeUrl.replace(/[.?]/g, "\\$&")}\\?`), "the authorization URL on a line of its own");
    const request = new URL(url).searchParams;
    assert.equal(request.get("client_id"), LOCAL_DELEGATED_CLIENT_ID);
    assert.equal(request.get("response_type"), "code");
    assert.equal(request.get("code_challenge_method"), "S256");
    assert.match(request.get("code_challenge") ?? "", /^[A-Za-z0-9_-]{43}$/);
    assert.match(request.get("state") ?? "", /^[A-Za-z0-9_-]{16,}$/);
    assert.match(request.get("redirect_uri") ?? "", /^http:\/\/localhost:\d+\/$/);
    assert.deepEqual(request.get("scope")?.split(" ").sort(), [...stack.oauth.delegatedRefreshScope.split(" "), "openid", "profile", "email"].sort());

    // The user's browser: sign-in page, consent page, then the redirect to the command's listener.
    const login = await browser.open(url);
    assert.equal(login.status, 200, login.html);
    const consent = await browser.submit(login, { username: LOCAL_MAILBOX, password: "not the password" });
    assert.match(consent.html, /incorrect/, "a wrong password is refused on the page");
    const consentPage = await browser.submit(consent, { username: LOCAL_MAILBOX, password: stack.mailboxPassword });
    assert.deepEqual(formsOf(consentPage).map((f) => f.id).sort(), ["accept", "decline"]);
    const landed = await browser.submit(consentPage, {}, "accept");
    assert.equal(new URL(landed.url).origin, new URL(request.get("redirect_uri")!).origin, "the browser ends at the loopback listener");
    assert.equal(landed.status, 200);
    assert.match(landed.html, /You can close this window/);

    const result = await authorize.done;
    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stdout, new RegExp(`Signed in as ${LOCAL_MAILBOX.replace(".", "\\.")}`));
    assert.ok(result.stdout.includes(`Refresh token stored in REFRESH_TOKEN_PATH ${stack.refreshTokenPath}`), result.stdout);
    // The code was redeemed once, with the PKCE verifier (the server requires and checks it).
    assert.deepEqual(stack.oauth.stats.requests.map((r) => ({ grant: r.grantType, fields: r.fields, status: r.status })), [
      { grant: "authorization_code", fields: ["client_id", "code", "code_verifier", "grant_type", "redirect_uri"], status: 200 },
    ]);
    assert.equal(statSync(stack.refreshTokenPath!).mode & 0o777, 0o600, "the token file is readable by its owner only");
    storedToken();
    assert.equal(stack.oauth.refreshTokenFamilies(LOCAL_MAILBOX, LOCAL_DELEGATED_CLIENT_ID), 1);
    // The listener is gone with the command.
    await assert.rejects(fetch(request.get("redirect_uri")!, { signal: AbortSignal.timeout(2_000) }), "nothing listens on the redirect port any more");
  });

  it("worker --drain delivers with the delegated token and rotates the stored refresh token; a second run still works", async () => {
    for (const run of [1, 2]) {
      stack.oauth.resetStats();
      stack.smtp.messages.length = 0;
      const before = storedToken();
      await enqueue(2, `run${run}-`);
      const result = await worker();
      assert.equal(result.status, 0, result.stderr);
      assert.equal(stack.smtp.messages.length, 2, `run ${run}: both messages arrived`);
      for (const message of stack.smtp.messages) assert.equal(message.authUser, LOCAL_MAILBOX, "XOAUTH2 as the signed-in user, with a token the sink accepted for that user");
      assert.deepEqual(refreshRedemptions(), [200], `run ${run}: one redemption for the token's lifetime`);
      const afterRun = storedToken();
      assert.notEqual(afterRun, before, `run ${run}: the rotated refresh token was stored`);
      assert.match(result.stderr, /"event":"refresh_token\.rotated"/);
    }
    assert.equal(new Set(storedTokens).size, storedTokens.length, "every rotation stored a new token");
    assert.equal(stack.oauth.stats.familiesRevoked, 0);
  });

  it("two workers started together on one stored refresh token both deliver, and the family survives", async () => {
    // Each worker drains its own queue, so both must redeem; they share the stored token and the
    // storage account (the lease). Without the lease both would redeem the same token, and this
    // server would revoke the whole family on the second use.
    const otherQueue = "outbound-email-b";
    const { queue: queueB } = await openMailQueues(loadStorageConfig({ ...stack.env, MAIL_QUEUE: otherQueue }));
    await enqueue(2, "a-");
    await enqueue(2, "b-", queueB);
    const before = storedToken();
    // A slow token endpoint: each redemption takes 1.5 s, so the two workers' redemptions overlap
    // for certain (process start-up differs by less than that). Without the lease both would send
    // the same refresh token inside that window.
    stack.oauth.delayTokenResponses(1_500);
    let a: CliResult;
    let b: CliResult;
    try {
      [a, b] = await Promise.all([worker(), worker({ MAIL_QUEUE: otherQueue })]);
    } finally {
      stack.oauth.delayTokenResponses(0);
    }
    assert.equal(a.status, 0, a.stderr);
    assert.equal(b.status, 0, b.stderr);
    assert.equal(stack.smtp.messages.length, 4);
    assert.deepEqual(stack.smtp.messages.map((m) => m.rcptTo[0]).sort(), ["a-0@example.test", "a-1@example.test", "b-0@example.test", "b-1@example.test"]);
    assert.deepEqual(refreshRedemptions(), [200, 200], "two redemptions, one after the other, both accepted");
    assert.equal(stack.oauth.stats.familiesRevoked, 0, "no rotated-out token was ever presented");
    assert.equal(stack.oauth.refreshTokenFamilies(LOCAL_MAILBOX, LOCAL_DELEGATED_CLIENT_ID), 1, "the family is alive");
    assert.notEqual(storedToken(), before);
  });

  it("an old (rotated-out) refresh token is refused by the server, which then revokes the family", async () => {
    const old = storedTokens[0]!;
    const response = await fetch(stack.oauth.tokenUrl, { method: "POST", body: new URLSearchParams({ grant_type: "refresh_token", client_id: LOCAL_DELEGATED_CLIENT_ID, refresh_token: old, scope: stack.oauth.delegatedRefreshScope }) });
    const body = (await response.json()) as { error?: string; error_description?: string };
    assert.equal(response.status, 400);
    assert.equal(body.error, "invalid_grant");
    assert.match(body.error_description ?? "", /^AADSTS70000: .*refresh token already used/);
    assert.equal(stack.oauth.stats.familiesRevoked, 1);
    assert.equal(stack.oauth.refreshTokenFamilies(LOCAL_MAILBOX, LOCAL_DELEGATED_CLIENT_ID), 0);
  });

  it("a revoked grant: nothing poisoned, the circuit opens, worker --drain exits non-zero naming queue-mailer authorize", async () => {
    // Revoked already by the reuse above; an admin's "revoke sessions" as well, so this holds on its own.
    stack.oauth.revokeUserGrants(LOCAL_MAILBOX);
    await Promise.all([queue.clearMessages(), poison.clearMessages()]);
    await enqueue(1, "held-");
    const before = storedToken();
    const result = await worker();
    assert.equal(result.status, 3, `${result.stdout}\n${result.stderr}`);
    assert.match(result.stderr, /sending is paused: TOKEN_AADSTS50173: /);
    assert.match(result.stderr, /hint: The refresh token in REFRESH_TOKEN_PATH .* was refused and no newer one is stored: a user must sign in again with `queue-mailer authorize`/);
    assert.match(result.stderr, /"event":"refresh_token\.refused"/);
    assert.equal(stack.smtp.messages.length, 0);
    assert.equal((await poison.peekMessages({ numberOfMessages: 32 })).peekedMessageItems.length, 0, "nothing poisoned");
    assert.equal((await queue.getProperties()).approximateMessagesCount, 1, "the message waits in the queue");
    // The store was read again before giving up; it held the same token, so no second attempt.
    assert.ok(refreshRedemptions().every((status) => status === 400));
    assert.equal(storedToken(), before, "a refused token is not replaced by anything");
  });

  it("no refresh token, access token, authorization code or PKCE verifier in any output", () => {
    const secrets = stack.oauth.secretsSeen();
    const code = browser.visited.map((u) => new URL(u).searchParams.get("code")).find((c) => c !== null);
    assert.ok(code && secrets.includes(code), "the authorization code is among the secrets searched for");
    for (const token of storedTokens) assert.ok(secrets.includes(token), "every stored refresh token is among them");
    // Codes, verifier, refresh tokens (5 stored), access tokens (5 redemptions and the code's), ID token.
    assert.ok(secrets.length >= 12, `only ${secrets.length} secrets seen`);
    const text = outputs.join("\n");
    assert.ok(outputs.length >= 12, "the output of every process is searched");
    assert.match(text, /"event":"token\.acquired"/, "the workers' debug logs are part of it");
    for (const secret of secrets) assert.ok(!text.includes(secret), `a secret (${secret.slice(0, 6)}…) appears in the output`);
  });
});
