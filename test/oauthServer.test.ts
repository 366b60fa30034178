import { createHash, randomUUID } from "node:crypto";
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { SignJWT, importPKCS8 } from "jose";
import { certificateDer, issueCertificate } from "../cli/local/devCertificates.js";
import type { CertificateAndKey } from "../cli/local/devCertificates.js";
import { startOAuthServer } from "../cli/local/oauthServer.js";
import type { OAuthServer } from "../cli/local/oauthServer.js";

const clientId = "00000000-aaaa-bbbb-cccc-000000000001";

interface AssertionOptions {
  alg?: "PS256" | "RS256";
  /** Certificate whose thumbprint goes in the header (default: the signing one). */
  thumbprintOf?: CertificateAndKey;
  aud?: string;
  jti?: string;
}

async function assertion(pair: CertificateAndKey, aud: string, options: AssertionOptions = {}): Promise<string> {
  const alg = options.alg ?? "PS256";
  const der = certificateDer((options.thumbprintOf ?? pair).certificatePem);
  // PS256 uses the current SHA-256 thumbprint; RS256 the legacy SHA-1 `x5t`.
  const header =
    alg === "PS256"
      ? { alg, typ: "JWT", "x5t#S256": createHash("sha256").update(der).digest("base64url") }
      : { alg, typ: "JWT", x5t: createHash("sha1").update(der).digest("base64url") };
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({})
    .setProtectedHeader(header)
    .setAudience(options.aud ?? aud)
    .setIssuer(clientId)
    .setSubject(clientId)
    .setJti(options.jti ?? randomUUID())
    .setNotBefore(now)
    .setIssuedAt(now)
    .setExpirationTime(now + 600)
    .sign(await importPKCS8(pair.privateKeyPem, alg));
}

async function requestToken(server: OAuthServer, clientAssertion: string) {
  const response = await fetch(server.tokenUrl, {
    method: "POST",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "client_credentials",
      client_id: clientId,
      scope: server.scope,
      client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
      client_assertion: clientAssertion,
    }),
  });
  return { status: response.status, body: (await response.json()) as Record<string, unknown> };
}

describe("local OAuth server (Microsoft v2 token endpoint stand-in)", () => {
  const client = issueCertificate({ commonName: "queue-mailer test client" });
  const stranger = issueCertificate({ commonName: "someone else" });
  let server: OAuthServer;

  before(async () => {
    server = await startOAuthServer({ clientId, certificatePem: client.certificatePem });
  });
  after(() => server.close());

  it("uses Microsoft's URL shapes with the real port", () => {
    assert.match(server.tokenUrl, /^http:\/\/127\.0\.0\.1:\d+\/local-tenant\/oauth2\/v2\.0\/token$/);
    assert.doesNotMatch(server.tokenUrl, /:0\//);
    assert.equal(server.scope, "https://outlook.office365.com/.default");
  });

  it("issues an Outlook access token for a valid PS256 assertion", async () => {
    server.resetStats();
    const { status, body } = await requestToken(server, await assertion(client, server.tokenUrl));
    assert.equal(status, 200, JSON.stringify(body));
    assert.equal(body.token_type, "Bearer");
    assert.equal(body.expires_in, 3600);
    assert.equal(body.ext_expires_in, 3600);
    assert.equal(typeof body.access_token, "string");

    const check = await server.verifyAccessToken(body.access_token as string);
    assert.ok(check.ok, check.ok ? "" : check.reason);
    assert.deepEqual(check.claims.roles, ["SMTP.SendAsApp"]);
    assert.equal(check.claims.aud, "https://outlook.office365.com");
    assert.equal(check.claims.appid, clientId);
    assert.equal(check.claims.azp, clientId);
    assert.equal(server.stats.tokenRequests, 1);
    assert.equal(server.stats.tokensIssued, 1);
  });

  it("accepts the legacy RS256 assertion with a SHA-1 x5t", async () => {
    const { status, body } = await requestToken(server, await assertion(client, server.tokenUrl, { alg: "RS256" }));
    assert.equal(status, 200, JSON.stringify(body));
    assert.ok((await server.verifyAccessToken(body.access_token as string)).ok);
  });

  it("rejects a replayed assertion", async () => {
    const once = await assertion(client, server.tokenUrl);
    assert.equal((await requestToken(server, once)).status, 200);
    const { status, body } = await requestToken(server, once);
    assert.equal(status, 401);
    assert.equal(body.error, "invalid_client");
    assert.deepEqual(body.error_codes, [50013]);
    assert.match(String(body.error_description), /only be used once/);
  });

  it("rejects an assertion signed by another certificate's key", async () => {
    // The header names the registered certificate, but the signature is not its key's.
    const { status, body } = await requestToken(server, await assertion(stranger, server.tokenUrl, { thumbprintOf: client }));
    assert.equal(status, 401);
    assert.deepEqual(body.error_codes, [700027]);
    assert.match(String(body.error_description), /^AADSTS700027: Client assertion contains an invalid signature\./);
  });

  it("rejects a thumbprint that is not the registered certificate's", async () => {
    server.resetStats();
    const { status, body } = await requestToken(server, await assertion(client, server.tokenUrl, { thumbprintOf: stranger }));
    assert.equal(status, 401);
    assert.equal(body.error, "invalid_client");
    assert.deepEqual(body.error_codes, [700027]);
    assert.match(String(body.error_description), /^AADSTS700027: Client assertion contains an invalid signature\. \[Reason - the key was not found/);
    assert.equal(server.stats.errors.length, 1);
    assert.match(server.stats.errors[0]!.detail ?? "", /x5t#S256/);
  });

  it("rejects an assertion addressed to another audience, including the bare issuer", async () => {
    for (const aud of ["https://login.microsoftonline.com/local-tenant/oauth2/v2.0/token", server.issuer]) {
      const { status, body } = await requestToken(server, await assertion(client, server.tokenUrl, { aud }));
      assert.equal(status, 401, aud);
      assert.equal(body.error, "invalid_client");
      assert.deepEqual(body.error_codes, [50013]);
      assert.match(String(body.error_description), /audience/);
    }
  });

  it("verifyAccessToken rejects a token this server did not issue", async () => {
    const other = await startOAuthServer({ clientId, certificatePem: client.certificatePem, resource: "https://graph.microsoft.com" });
    try {
      const { status, body } = await requestToken(other, await assertion(client, other.tokenUrl));
      assert.equal(status, 200, JSON.stringify(body));
      const check = await server.verifyAccessToken(body.access_token as string);
      assert.equal(check.ok, false);
      assert.match(check.ok ? "" : check.reason, /signature/);
      assert.equal((await server.verifyAccessToken("not-a-jwt")).ok, false);
    } finally {
      await other.close();
    }
  });

  it("answers injected failures once, then recovers", async () => {
    server.resetStats();
    server.failNext(1, 503, { error: "temporarily_unavailable" }, { "retry-after": "1" });
    const failed = await requestToken(server, await assertion(client, server.tokenUrl));
    assert.equal(failed.status, 503);
    assert.deepEqual(failed.body, { error: "temporarily_unavailable" });
    const recovered = await requestToken(server, await assertion(client, server.tokenUrl));
    assert.equal(recovered.status, 200);
    assert.equal(server.stats.tokenRequests, 2);
    assert.equal(server.stats.tokensIssued, 1);
  });
});
