// The token provider against a real OAuth server (oidc-provider, cli/local/oauthServer.ts) that
// verifies our client assertions: single flight, reuse, refresh, renew after a 535, error
// classification, and that no secret reaches the logs.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { createServer as createNetServer, type Server as NetServer, type Socket } from "node:net";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { decodeJwt, decodeProtectedHeader } from "jose";
import { issueCertificate } from "../cli/local/devCertificates.js";
import { startOAuthServer } from "../cli/local/oauthServer.js";
import type { OAuthServer } from "../cli/local/oauthServer.js";
import { fileCertificateSource } from "../shared/auth/certificateSource.js";
import { certificateCredential } from "../shared/auth/certificateCredential.js";
import type { CredentialSource } from "../shared/auth/credentialSource.js";
import type { AssertionAlg, AuthConfig } from "../shared/config.js";
import { rejectionOf } from "./support/harness.js";
import { jsonLineLogger } from "../shared/log.js";
import { TokenProvider } from "../shared/token/tokenProvider.js";
import type { AccessToken, TokenProviderOptions } from "../shared/token/tokenProvider.js";

const clientId = "00000000-aaaa-bbbb-cccc-000000000002";
const client = issueCertificate({ commonName: "queue-mailer token test client" });
const stranger = issueCertificate({ commonName: "a certificate the app does not know" });

/** A port on 127.0.0.1 that nothing listens on (briefly bound, then released). */
async function closedPort(): Promise<number> {
  const server = createNetServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

describe("TokenProvider against the local OAuth server", () => {
  const dir = mkdtempSync(join(tmpdir(), "queue-mailer-token-"));
  const pemPath = join(dir, "client.pem");
  writeFileSync(pemPath, client.certificatePem + client.privateKeyPem);

  // Everything every provider in this suite logs, formatted exactly as in production.
  const lines: string[] = [];
  const logger = jsonLineLogger((line) => lines.push(line), "debug");
  // Secrets seen during the run, checked against the logs at the end.
  const issuedTokens = new Set<string>();
  const assertions = new Set<string>();

  let oauth: OAuthServer;
  let hanging: NetServer | undefined;
  const hangingSockets = new Set<Socket>();
  let stalling: Server | undefined;

  /** The real certificate credential; records the assertions it hands out (without changing them). */
  function credentialFor(path: string, alg: AssertionAlg = "PS256"): CredentialSource {
    const auth: AuthConfig = {
      method: "certificate",
      tenantId: "local-tenant",
      clientId,
      tokenUrl: oauth.tokenUrl,
      scope: oauth.scope,
      assertionAlg: alg,
      certificate: { kind: "file", path },
      signing: "local",
    };
    const real = certificateCredential(auth, logger, fileCertificateSource(path));
    return {
      method: real.method,
      async tokenRequest() {
        const request = await real.tokenRequest();
        if (request.form["client_assertion"]) assertions.add(request.form["client_assertion"]);
        return request;
      },
      invalidate: () => real.invalidate(),
    };
  }

  let credential: CredentialSource;

  /** `tokenUrl` sends the same request elsewhere (servers that fail in their own ways). */
  function provider(options: Partial<TokenProviderOptions> & { tokenUrl?: string } = {}): TokenProvider {
    const { tokenUrl, ...rest } = options;
    const base = rest.credential ?? credential;
    const redirected: CredentialSource = tokenUrl === undefined ? base : { ...base, tokenRequest: async () => ({ ...(await base.tokenRequest()), url: tokenUrl }) };
    return new TokenProvider({ logger, ...rest, credential: redirected });
  }

  function remember(token: AccessToken): AccessToken {
    issuedTokens.add(token.token);
    return token;
  }

  before(async () => {
    oauth = await startOAuthServer({ clientId, certificatePem: client.certificatePem });
    credential = credentialFor(pemPath);
  });

  after(async () => {
    await oauth.close();
    for (const socket of hangingSockets) socket.destroy();
    if (hanging) await new Promise<void>((resolve) => hanging!.close(() => resolve()));
    if (stalling) {
      stalling.closeAllConnections();
      await new Promise<void>((resolve) => stalling!.close(() => resolve()));
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it("50 concurrent getToken() calls make exactly one token request and share its token", async () => {
    oauth.resetStats();
    const tokens = provider();
    const results = await Promise.all(Array.from({ length: 50 }, () => tokens.getToken()));
    results.forEach(remember);
    assert.equal(oauth.stats.tokenRequests, 1);
    assert.equal(oauth.stats.tokensIssued, 1);
    assert.equal(tokens.stats.requests, 1);
    assert.equal(tokens.stats.failures, 0);
    const token = results[0]!;
    for (const result of results) assert.equal(result.token, token.token);

    // A real Outlook-shaped token for the app, valid for the server's lifetime (3600 s).
    const check = await oauth.verifyAccessToken(token.token);
    assert.ok(check.ok, check.ok ? "" : check.reason);
    assert.deepEqual(check.claims.roles, ["SMTP.SendAsApp"]);
    assert.equal(check.claims.appid, clientId);
    const lifetime = token.expiresAt.getTime() - Date.now();
    assert.ok(lifetime > 3590_000 && lifetime <= 3600_000, `expires in ${lifetime} ms`);

    // Later calls reuse it.
    const later = await tokens.getToken();
    assert.equal(later.token, token.token);
    assert.equal(oauth.stats.tokenRequests, 1);
    assert.equal(tokens.stats.requests, 1);
  });

  it("sends an assertion the server accepts: PS256, aud = token URL, iss = sub = client id", async () => {
    const before = assertions.size;
    oauth.resetStats();
    remember(await provider().getToken());
    assert.equal(assertions.size, before + 1);
    const jwt = [...assertions].at(-1)!;
    assert.equal(decodeProtectedHeader(jwt).alg, "PS256");
    const claims = decodeJwt(jwt);
    assert.equal(claims.aud, oauth.tokenUrl);
    assert.equal(claims.iss, clientId);
    assert.equal(claims.sub, clientId);
    assert.deepEqual(oauth.stats.errors, []);
  });

  it("the legacy RS256 assertion is accepted too", async () => {
    oauth.resetStats();
    const tokens = provider({ credential: credentialFor(pemPath, "RS256") });
    remember(await tokens.getToken());
    assert.equal(decodeProtectedHeader([...assertions].at(-1)!).alg, "RS256");
    assert.equal(oauth.stats.tokensIssued, 1);
  });

  it("requests a new token when the cached one is inside the refresh margin", async () => {
    oauth.resetStats();
    // A margin longer than the token's whole lifetime: every call is "too close to expiry".
    const tokens = provider({ refreshMarginSeconds: 7200 });
    const first = remember(await tokens.getToken());
    const second = remember(await tokens.getToken());
    assert.equal(oauth.stats.tokenRequests, 2);
    assert.notEqual(second.token, first.token);
    // Concurrent callers still share one request.
    await Promise.all(Array.from({ length: 10 }, () => tokens.getToken().then(remember)));
    assert.equal(oauth.stats.tokenRequests, 3);
  });

  it("reuses the token until REFRESH_MARGIN (300 s) before expiry, by the given clock", async () => {
    oauth.resetStats();
    let now = Date.now();
    const tokens = provider({ now: () => now });
    const first = remember(await tokens.getToken());
    assert.equal(first.expiresAt.getTime(), now + 3600_000);
    now += 3300_000 - 1000; // 301 s before expiry
    assert.equal((await tokens.getToken()).token, first.token);
    assert.equal(oauth.stats.tokenRequests, 1);
    now += 2000; // 299 s before expiry
    const second = remember(await tokens.getToken());
    assert.notEqual(second.token, first.token);
    assert.equal(oauth.stats.tokenRequests, 2);
  });

  it("renew() fetches a new token once for a burst of refusals", async () => {
    oauth.resetStats();
    let now = Date.now();
    const tokens = provider({ now: () => now });
    const first = remember(await tokens.getToken());
    assert.equal(oauth.stats.tokenRequests, 1);

    // Several pooled connections see 535 for the same token at once.
    const renewed = await Promise.all(Array.from({ length: 5 }, () => tokens.renew()));
    renewed.forEach(remember);
    assert.equal(oauth.stats.tokenRequests, 2);
    for (const token of renewed) assert.equal(token.token, renewed[0]!.token);
    assert.notEqual(renewed[0]!.token, first.token);

    // More refusals within 10 s: the renewed token is kept.
    now += 9000;
    assert.equal((await tokens.renew()).token, renewed[0]!.token);
    assert.equal((await tokens.getToken()).token, renewed[0]!.token);
    assert.equal(oauth.stats.tokenRequests, 2);

    // A refusal later than that renews again.
    now += 2000;
    const third = remember(await tokens.renew());
    assert.notEqual(third.token, renewed[0]!.token);
    assert.equal(oauth.stats.tokenRequests, 3);
    assert.ok(lines.some((line) => JSON.parse(line).event === "token.renew"));
  });

  it("renew() right after a token was fetched makes one more request, even in real time", async () => {
    oauth.resetStats();
    const tokens = provider();
    const first = remember(await tokens.getToken());
    const again = remember(await tokens.renew());
    assert.notEqual(again.token, first.token);
    await Promise.all([tokens.renew(), tokens.renew(), tokens.renew()]);
    assert.equal(oauth.stats.tokenRequests, 2);
  });

  it("a 503 with Retry-After is transient, keeps the server's code and delay; the next call succeeds", async () => {
    oauth.resetStats();
    const tokens = provider();
    oauth.failNext(
      1,
      503,
      { error: "temporarily_unavailable", error_description: "AADSTS50000: There was an error issuing a token. Trace ID: t", error_codes: [50000] },
      { "retry-after": "7" },
    );
    const error = await rejectionOf(tokens.getToken());
    assert.equal(error.code, "TOKEN_AADSTS50000");
    assert.equal(error.kind, "transient");
    assert.equal(error.retryAfterSeconds, 7);
    assert.equal(error.command, `POST ${oauth.tokenUrl}`);
    assert.match(error.response ?? "", /^503 temporarily_unavailable AADSTS50000/);
    assert.equal(tokens.stats.failures, 1);

    remember(await tokens.getToken());
    assert.equal(oauth.stats.tokenRequests, 2);
    assert.equal(oauth.stats.tokensIssued, 1);
  });

  it("5xx/429 without an AADSTS code still get a TOKEN_ code and stay transient", async () => {
    oauth.resetStats();
    const tokens = provider();
    oauth.failNext(1, 503, { error: "temporarily_unavailable" }, { "retry-after": "7" });
    let error = await rejectionOf(tokens.getToken());
    assert.equal(error.code, "TOKEN_TEMPORARILY_UNAVAILABLE");
    assert.equal(error.kind, "transient");
    assert.equal(error.retryAfterSeconds, 7);

    oauth.failNext(1, 429, { error: "too_many_requests" });
    error = await rejectionOf(tokens.getToken());
    assert.match(error.code, /^TOKEN_/);
    assert.equal(error.kind, "transient");
    assert.equal(error.retryAfterSeconds, undefined);

    oauth.failNext(1, 502, "<html><body>Bad gateway</body></html>");
    error = await rejectionOf(tokens.getToken());
    assert.equal(error.code, "TOKEN_HTTP_502");
    assert.equal(error.kind, "transient");

    remember(await tokens.getToken());
  });

  it("a 401 AADSTS700027 is a config error whose hint is about the certificate", async () => {
    oauth.resetStats();
    const tokens = provider();
    oauth.failNext(1, 401, {
      error: "invalid_client",
      error_description: "AADSTS700027: Client assertion contains an invalid signature. [Reason - The key was not found.]",
      error_codes: [700027],
    });
    const error = await rejectionOf(tokens.getToken());
    assert.equal(error.code, "TOKEN_AADSTS700027");
    assert.equal(error.kind, "config");
    assert.match(error.hint ?? "", /certificate/i);
    assert.equal(error.retryAfterSeconds, undefined);
    assert.ok(lines.some((line) => line.includes('"event":"token.failed"') && line.includes("TOKEN_AADSTS700027")));
    // The credential was invalidated (certificate re-read); the next attempt works.
    remember(await tokens.getToken());
    assert.equal(oauth.stats.tokenRequests, 2);
  });

  it("a 200 without an access_token → TOKEN_BAD_RESPONSE (transient)", async () => {
    const tokens = provider();
    oauth.failNext(1, 200, { token_type: "Bearer" });
    const error = await rejectionOf(tokens.getToken());
    assert.equal(error.code, "TOKEN_BAD_RESPONSE");
    assert.equal(error.kind, "transient");
  });

  it("an unreachable token endpoint → TOKEN_UNREACHABLE (transient)", async () => {
    const port = await closedPort();
    const tokenUrl = `http://127.0.0.1:${port}/local-tenant/oauth2/v2.0/token`;
    const tokens = provider({ tokenUrl, timeoutMs: 2000 });
    const error = await rejectionOf(tokens.getToken());
    assert.equal(error.code, "TOKEN_UNREACHABLE");
    assert.equal(error.kind, "transient");
    assert.match(error.message, /ECONNREFUSED/);
    assert.ok(error.message.includes(tokenUrl));
    assert.equal(tokens.stats.failures, 1);
  });

  it("a token endpoint that never answers → TOKEN_UNREACHABLE after timeoutMs", async () => {
    hanging = createNetServer((socket) => {
      hangingSockets.add(socket);
      socket.on("close", () => hangingSockets.delete(socket));
      socket.resume();
    });
    await new Promise<void>((resolve) => hanging!.listen(0, "127.0.0.1", resolve));
    const { port } = hanging.address() as AddressInfo;
    const tokens = provider({ tokenUrl: `http://127.0.0.1:${port}/token`, timeoutMs: 300 });
    const started = Date.now();
    const error = await rejectionOf(tokens.getToken());
    assert.equal(error.code, "TOKEN_UNREACHABLE");
    assert.equal(error.kind, "transient");
    assert.match(error.message, /timed out/);
    assert.ok(Date.now() - started < 5000);
  });

  it(
    "a response body that stalls or breaks off → TOKEN_UNREACHABLE (transient)",
    async () => {
      stalling = createServer((req, res) => {
        req.resume();
        res.writeHead(200, { "content-type": "application/json" });
        res.write('{"access_token":"');
        if (req.url === "/reset") setTimeout(() => res.destroy(), 50);
      });
      await new Promise<void>((resolve) => stalling!.listen(0, "127.0.0.1", resolve));
      const { port } = stalling.address() as AddressInfo;
      for (const path of ["/stall", "/reset"]) {
        const tokens = provider({ tokenUrl: `http://127.0.0.1:${port}${path}`, timeoutMs: 300 });
        const error = await rejectionOf(tokens.getToken());
        assert.equal(error.code, "TOKEN_UNREACHABLE", path);
        assert.equal(error.kind, "transient", path);
        assert.equal(tokens.stats.failures, 1, path);
      }
    },
  );

  it("a certificate the server does not know is rejected for real: TOKEN_AADSTS700027 (config)", async () => {
    oauth.resetStats();
    const strangerPath = join(dir, "stranger.pem");
    writeFileSync(strangerPath, stranger.certificatePem + stranger.privateKeyPem);
    const tokens = provider({ credential: credentialFor(strangerPath) });
    const error = await rejectionOf(tokens.getToken());
    assert.equal(error.code, "TOKEN_AADSTS700027");
    assert.equal(error.kind, "config");
    assert.match(error.hint ?? "", /certificate/i);
    assert.match(error.response ?? "", /^401 invalid_client AADSTS700027/);
    // oidc-provider itself refused it (no injected failure): the signature does not verify with the
    // registered certificate's key.
    assert.equal(oauth.stats.tokensIssued, 0);
    assert.deepEqual(oauth.stats.errors.map((e) => e.error), ["invalid_client"]);
    assert.match(String(oauth.stats.errors[0]?.detail), /signature verification failed/);

    // The rejection invalidated the cached certificate: once the right one is in place
    // (a renewal, a fixed deployment), the next request reads it and succeeds.
    writeFileSync(strangerPath, client.certificatePem + client.privateKeyPem);
    remember(await tokens.getToken());
    assert.equal(oauth.stats.tokensIssued, 1);
  });

  it("logs carry neither tokens, nor assertions, nor key material", () => {
    assert.ok(lines.length > 0);
    const events = new Set(lines.map((line) => String(JSON.parse(line).event)));
    for (const event of ["assertion.created", "token.acquired", "token.failed", "token.renew"]) assert.ok(events.has(event), `logged ${event}`);
    assert.ok(issuedTokens.size >= 10, `${issuedTokens.size} tokens seen`);
    assert.ok(assertions.size >= issuedTokens.size, `${assertions.size} assertions seen`);

    const keyLines = [client.privateKeyPem, stranger.privateKeyPem].flatMap((pem) => pem.split("\n").filter((l) => l.length > 20 && !l.startsWith("-----")));
    for (const line of lines) {
      assert.doesNotMatch(line, /eyJ/, line);
      assert.doesNotMatch(line, /PRIVATE KEY/, line);
      // Nothing was even handed to the logger that redaction had to catch.
      assert.doesNotMatch(line, /\[redacted/, line);
      for (const token of issuedTokens) assert.ok(!line.includes(token), "access token in a log line");
      for (const jwt of assertions) assert.ok(!line.includes(jwt) && !line.includes(jwt.split(".")[2]!), "assertion in a log line");
      for (const keyLine of keyLines) assert.ok(!line.includes(keyLine), "private key text in a log line");
    }
  });
});
