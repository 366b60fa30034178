// The Key Vault test double, driven through the real Azure SDK clients: DefaultAzureCredential
// (EnvironmentCredential → MSAL → POST /<tenant>/oauth2/v2.0/token), CertificateClient and
// SecretClient, all reaching the double through HTTPS_PROXY. Run with
// NODE_EXTRA_CA_CERTS=.test-ca/ca.pem (the double's certificate is issued by that CA).
// The keys part (sign with a certificate's key, CERT_SIGNING=vault) is driven through
// @azure/keyvault-keys' CryptographyClient and KeyClient; signatures are checked with node:crypto.
// The Microsoft Graph part (app registration credentials, for the expiry watch) is driven through
// @azure/core-rest-pipeline with bearerTokenAuthenticationPolicy and the same credential.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { constants, createHash, createPrivateKey, verify, X509Certificate } from "node:crypto";
import { execFile } from "node:child_process";
import { realpathSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { createServer as createNetServer } from "node:net";
import type { AddressInfo, Socket } from "node:net";
import forge from "node-forge";
import { ClientSecretCredential, DefaultAzureCredential } from "@azure/identity";
// Transitive dependency (of @azure/identity and the Key Vault clients): resolvable, fine for a test.
import {
  bearerTokenAuthenticationPolicy,
  createDefaultHttpClient,
  createPipelineFromOptions,
  createPipelineRequest,
} from "@azure/core-rest-pipeline";
import type { HttpClient, Pipeline } from "@azure/core-rest-pipeline";
import { CertificateClient } from "@azure/keyvault-certificates";
import { CryptographyClient, KeyClient } from "@azure/keyvault-keys";
import { SecretClient } from "@azure/keyvault-secrets";
import { certificateDer, issueCertificate } from "../cli/local/devCertificates.js";
import type { CertificateAndKey } from "../cli/local/devCertificates.js";
import { startKeyVaultDouble } from "./support/keyVaultDouble.js";
import type { KeyVaultDouble } from "./support/keyVaultDouble.js";

interface RestErrorLike {
  name: string;
  statusCode?: number;
  code?: string;
  message: string;
}

/** assert.rejects validator for the SDK's RestError (not imported: @azure/core-rest-pipeline is transitive). */
function restError(statusCode: number, code?: string, messagePart?: string): (error: unknown) => boolean {
  return (error: unknown) => {
    const e = error as RestErrorLike;
    assert.equal(e.name, "RestError", `expected a RestError, got ${String(error)}`);
    assert.equal(e.statusCode, statusCode);
    if (code !== undefined) assert.equal(e.code, code);
    if (messagePart !== undefined) assert.match(e.message, new RegExp(messagePart));
    return true;
  };
}

const GRAPH = "https://graph.microsoft.com/v1.0";
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const ISO_UTC = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/;

interface GraphError {
  error: { code: string; message: string; innerError?: Record<string, string> };
}

/** GET through a core-rest-pipeline pipeline (built now: it reads HTTPS_PROXY at construction). */
async function graphGet(
  pipeline: Pipeline,
  httpClient: HttpClient,
  url: string,
): Promise<{ status: number; body: any; wwwAuthenticate: string | undefined }> {
  const response = await pipeline.sendRequest(httpClient, createPipelineRequest({ url, method: "GET" }));
  return {
    status: response.status,
    body: response.bodyAsText ? JSON.parse(response.bodyAsText) : undefined,
    wwwAuthenticate: response.headers.get("www-authenticate"),
  };
}

/** Seconds precision, like the dates an app registration carries. */
function wholeSeconds(ms: number): Date {
  return new Date(Math.floor(ms / 1000) * 1000);
}

function sha1Base64Url(der: Buffer): string {
  return createHash("sha1").update(der).digest("base64url");
}

/** Certificates and keys inside a base64 PFX with an empty password (node-forge: Node cannot read PKCS#12). */
function readPfx(base64: string): { certificates: X509Certificate[]; privateKeyPems: string[] } {
  const asn1 = forge.asn1.fromDer(forge.util.decode64(base64));
  const pfx = forge.pkcs12.pkcs12FromAsn1(asn1, "");
  const certBags = pfx.getBags({ bagType: forge.pki.oids.certBag! })[forge.pki.oids.certBag!] ?? [];
  const keyBags = pfx.getBags({ bagType: forge.pki.oids.pkcs8ShroudedKeyBag! })[forge.pki.oids.pkcs8ShroudedKeyBag!] ?? [];
  return {
    certificates: certBags.map((bag) => new X509Certificate(forge.pki.certificateToPem(bag.cert!))),
    privateKeyPems: keyBags.map((bag) => forge.pki.privateKeyToPem(bag.key!)),
  };
}

describe("Key Vault test double through the real Azure SDK", () => {
  let double: KeyVaultDouble;
  let restoreEnv: () => void;
  let credential: DefaultAzureCredential;
  let certificates: CertificateClient;
  let secrets: SecretClient;
  let pfxPair: CertificateAndKey;
  let pemPair: CertificateAndKey;
  let pfxVersion: string;

  before(async () => {
    double = await startKeyVaultDouble();
    // NO_PROXY is read once per process by the SDK, HTTPS_PROXY when a client or credential is
    // constructed: apply the env before constructing anything.
    restoreEnv = double.applyEnv();
    credential = new DefaultAzureCredential();
    certificates = new CertificateClient(double.vaultUrl, credential);
    secrets = new SecretClient(double.vaultUrl, credential);
    pfxPair = issueCertificate({ commonName: "queue-mailer sender (pfx)" });
    pemPair = issueCertificate({ commonName: "queue-mailer sender (pem)" });
    pfxVersion = double.putCertificate("mailer-pfx", pfxPair);
    double.putCertificate("mailer-pem", { ...pemPair, contentType: "application/x-pem-file" });
    double.putCertificate("mailer-locked", { ...issueCertificate({ commonName: "non-exportable" }), exportable: false });
  });

  after(async () => {
    await double?.close();
    restoreEnv?.();
  });

  it("exposes the env a process needs", () => {
    assert.match(double.vaultUrl, /^https:\/\/[a-z0-9-]+\.vault\.azure\.net$/);
    assert.equal(double.env.KEY_VAULT_URL, double.vaultUrl);
    assert.equal(double.env.HTTPS_PROXY, double.proxyUrl);
    assert.match(double.proxyUrl, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.equal(double.env.NO_PROXY, "127.0.0.1,localhost");
    assert.equal(double.env.AZURE_TOKEN_CREDENTIALS, "EnvironmentCredential");
    assert.equal(process.env.AZURE_TENANT_ID, double.tenantId);
    assert.equal(process.env.AZURE_CLIENT_ID, double.clientId);
    assert.equal(process.env.AZURE_CLIENT_SECRET, double.clientSecret);
    assert.equal(process.env.AZURE_REGIONAL_AUTHORITY_NAME, undefined);
    assert.equal(realpathSync(double.env.NODE_EXTRA_CA_CERTS!), realpathSync(".test-ca/ca.pem"));
  });

  it("serves a PKCS#12 certificate: cer is the DER, the secret is the PFX with the key", async () => {
    const der = certificateDer(pfxPair.certificatePem);
    const certificate = await certificates.getCertificate("mailer-pfx");
    assert.deepEqual(Buffer.from(certificate.cer!), der);
    assert.equal(certificate.name, "mailer-pfx");
    assert.equal(certificate.properties.version, pfxVersion);
    assert.equal(certificate.properties.id, `${double.vaultUrl}/certificates/mailer-pfx/${pfxVersion}`);
    assert.equal(certificate.secretId, `${double.vaultUrl}/secrets/mailer-pfx/${pfxVersion}`);
    assert.equal(certificate.keyId, `${double.vaultUrl}/keys/mailer-pfx/${pfxVersion}`);
    assert.equal(Buffer.from(certificate.properties.x509Thumbprint!).toString("base64url"), sha1Base64Url(der));
    assert.equal(certificate.properties.enabled, true);
    const x509 = new X509Certificate(der);
    assert.equal(certificate.properties.expiresOn?.getTime(), Math.floor(new Date(x509.validTo).getTime() / 1000) * 1000);
    assert.equal(certificate.policy?.contentType, "application/x-pkcs12");
    assert.equal(certificate.policy?.exportable, true);

    const secret = await secrets.getSecret("mailer-pfx");
    assert.equal(secret.properties.contentType, "application/x-pkcs12");
    assert.equal(secret.properties.managed, true);
    assert.equal(secret.properties.version, pfxVersion);
    assert.equal(secret.properties.certificateKeyId, `${double.vaultUrl}/keys/mailer-pfx/${pfxVersion}`);
    const pfx = readPfx(secret.value!);
    assert.equal(pfx.certificates.length, 1);
    assert.deepEqual(pfx.certificates[0]!.raw, der);
    assert.equal(pfx.privateKeyPems.length, 1);
    assert.ok(pfx.certificates[0]!.checkPrivateKey(createPrivateKey(pfx.privateKeyPems[0]!)));
  });

  it("serves a PEM certificate: the secret is private key + certificate", async () => {
    const certificate = await certificates.getCertificate("mailer-pem");
    assert.deepEqual(Buffer.from(certificate.cer!), certificateDer(pemPair.certificatePem));
    assert.equal(certificate.policy?.contentType, "application/x-pem-file");

    const secret = await secrets.getSecret("mailer-pem");
    assert.equal(secret.properties.contentType, "application/x-pem-file");
    const value = secret.value!;
    assert.ok(value.includes(pemPair.privateKeyPem.trim()));
    assert.ok(value.includes(pemPair.certificatePem.trim()));
    assert.ok(value.indexOf("PRIVATE KEY") < value.indexOf("BEGIN CERTIFICATE"), "key first, then certificate");
    const x509 = new X509Certificate(value.slice(value.indexOf("-----BEGIN CERTIFICATE-----")));
    assert.ok(x509.checkPrivateKey(createPrivateKey(value)));
  });

  it("gets one token for both clients; each client answers one challenge", () => {
    assert.equal(double.counts.tokenRequests, 1);
    assert.equal(double.counts.challenges, 2);
    assert.equal(double.counts.certificateGets, 2);
    assert.equal(double.counts.secretGets, 2);
    const tokenPosts = double.requests.filter((r) => r.host === "login.microsoftonline.com");
    assert.deepEqual(tokenPosts.map((r) => `${r.method} ${r.path} ${r.status}`), [`POST /${double.tenantId}/oauth2/v2.0/token 200`]);
    assert.equal(double.requests.filter((r) => r.status === 401).length, 2);
    assert.deepEqual(double.refused, [], "nothing tried to leave through the proxy");
  });

  it("has no secret for a non-exportable certificate (404), but its certificate is readable", async () => {
    const certificate = await certificates.getCertificate("mailer-locked");
    assert.equal(certificate.policy?.exportable, false);
    assert.ok(certificate.cer && certificate.cer.length > 0);
    await assert.rejects(secrets.getSecret("mailer-locked"), restError(404, "SecretNotFound"));
  });

  it("answers 404 CertificateNotFound / SecretNotFound for unknown names and versions", async () => {
    await assert.rejects(certificates.getCertificate("nope"), restError(404, "CertificateNotFound", "nope"));
    await assert.rejects(secrets.getSecret("nope"), restError(404, "SecretNotFound", "nope"));
    await assert.rejects(
      certificates.getCertificateVersion("mailer-pfx", "0".repeat(32)),
      restError(404, "CertificateNotFound"),
    );
  });

  it("makes the newest version current and keeps older versions addressable", async () => {
    const next = issueCertificate({ commonName: "queue-mailer sender (rotated)" });
    const nextVersion = double.putCertificate("mailer-pfx", next);
    assert.notEqual(nextVersion, pfxVersion);
    const current = await certificates.getCertificate("mailer-pfx");
    assert.equal(current.properties.version, nextVersion);
    assert.deepEqual(Buffer.from(current.cer!), certificateDer(next.certificatePem));
    const old = await certificates.getCertificateVersion("mailer-pfx", pfxVersion);
    assert.deepEqual(Buffer.from(old.cer!), certificateDer(pfxPair.certificatePem));
    const oldSecret = await secrets.getSecret("mailer-pfx", { version: pfxVersion });
    assert.deepEqual(readPfx(oldSecret.value!).certificates[0]!.raw, certificateDer(pfxPair.certificatePem));

    const versions: string[] = [];
    for await (const properties of certificates.listPropertiesOfCertificateVersions("mailer-pfx")) versions.push(properties.version!);
    assert.deepEqual(versions.sort(), [pfxVersion, nextVersion].sort());
  });

  it("lists certificates and secrets, including certificate-backed and plain secrets", async () => {
    double.putSecret("smtp-password", "hunter2", { contentType: "text/plain" });
    const certificateNames: string[] = [];
    for await (const properties of certificates.listPropertiesOfCertificates()) certificateNames.push(properties.name!);
    assert.deepEqual(certificateNames.sort(), ["mailer-locked", "mailer-pem", "mailer-pfx"]);

    const secretNames = new Map<string, boolean | undefined>();
    for await (const properties of secrets.listPropertiesOfSecrets()) secretNames.set(properties.name, properties.managed);
    assert.deepEqual([...secretNames.keys()].sort(), ["mailer-locked", "mailer-pem", "mailer-pfx", "smtp-password"]);
    assert.equal(secretNames.get("mailer-pfx"), true);
    assert.notEqual(secretNames.get("smtp-password"), true);

    const plain = await secrets.getSecret("smtp-password");
    assert.equal(plain.value, "hunter2");
    assert.equal(plain.properties.contentType, "text/plain");
    assert.equal(plain.properties.managed, undefined);
  });

  it("refuses a disabled secret with 403 SecretDisabled", async () => {
    double.putSecret("old-password", "x", { enabled: false });
    await assert.rejects(secrets.getSecret("old-password"), restError(403, "Forbidden", "disabled secret"));
  });

  it("failNext(1, 403) makes the next vault call fail like a missing permission, then recovers", async () => {
    double.failNext(1, 403);
    await assert.rejects(secrets.getSecret("mailer-pem"), restError(403, "Forbidden", "does not have secrets get permission"));
    const secret = await secrets.getSecret("mailer-pem");
    assert.equal(secret.properties.contentType, "application/x-pem-file");
  });

  it("failNext(1, 429) with Retry-After is retried by the SDK's throttling policy", async () => {
    double.resetCounts();
    double.failNext(1, 429, undefined, { "Retry-After": "0" });
    const certificate = await certificates.getCertificate("mailer-pem");
    assert.deepEqual(Buffer.from(certificate.cer!), certificateDer(pemPair.certificatePem));
    assert.deepEqual(
      double.requests.map((r) => `${r.status} ${r.method} ${r.path}`),
      ["429 GET /certificates/mailer-pem/", "200 GET /certificates/mailer-pem/"],
    );
    assert.equal(double.counts.certificateGets, 2);
    assert.equal(double.counts.tokenRequests, 0, "the cached token is reused");
    assert.equal(double.counts.challenges, 0);
  });

  it("rejects a wrong client secret at the token endpoint (401 invalid_client)", async () => {
    double.resetCounts();
    const wrong = new ClientSecretCredential(double.tenantId, double.clientId, "not-the-secret");
    // identity 4.13 / msal-node 5 surface Entra's invalid_client as AuthenticationRequiredError
    // (no statusCode); the AADSTS code from the response is in the message.
    await assert.rejects(wrong.getToken("https://vault.azure.net/.default"), (error: unknown) => {
      assert.match((error as Error).name, /^Authentication(Required)?Error$/);
      assert.match((error as Error).message, /invalid_client.*AADSTS7000215/s);
      return true;
    });
    assert.deepEqual(double.requests.map((r) => r.status), [401]);
    assert.equal(double.counts.tokenRequests, 1);
  });

  it("the proxy refuses every other destination with 403", async () => {
    const status = await new Promise<number>((resolve, reject) => {
      const proxy = new URL(double.proxyUrl);
      const req = httpRequest({ host: proxy.hostname, port: Number(proxy.port), method: "CONNECT", path: "example.com:443" });
      req.on("connect", (res, socket: Socket) => {
        socket.destroy();
        resolve(res.statusCode ?? 0);
      });
      req.on("error", reject);
      req.end();
    });
    assert.equal(status, 403);
    assert.ok(double.refused.includes("example.com:443"));
  });

  it("HTTPS_PROXY is read when a client is constructed, not per request", async () => {
    // A decoy proxy that records the CONNECT line and refuses it.
    const seen: string[] = [];
    const decoy = createNetServer((socket) => {
      socket.once("data", (data: Buffer) => {
        seen.push(data.toString("latin1").split("\r\n")[0]!);
        socket.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
      });
      socket.on("error", () => socket.destroy());
    });
    await new Promise<void>((resolve) => decoy.listen(0, "127.0.0.1", resolve));
    try {
      process.env.HTTPS_PROXY = `http://127.0.0.1:${(decoy.address() as AddressInfo).port}`;
      const builtWithDecoy = new SecretClient(double.vaultUrl, credential);
      process.env.HTTPS_PROXY = double.proxyUrl;
      await assert.rejects(builtWithDecoy.getSecret("mailer-pem"));
      assert.deepEqual(seen, [`CONNECT ${double.vaultName}.vault.azure.net:443 HTTP/1.1`]);

      const builtWithDouble = new SecretClient(double.vaultUrl, credential);
      assert.equal((await builtWithDouble.getSecret("smtp-password")).value, "hunter2");
      assert.equal(seen.length, 1);
    } finally {
      process.env.HTTPS_PROXY = double.proxyUrl;
      await new Promise<void>((resolve) => decoy.close(() => resolve()));
    }
  });

  it("env is all a child process needs to read the vault through the SDK", async () => {
    double.resetCounts();
    const script = [
      'import { DefaultAzureCredential } from "@azure/identity";',
      'import { SecretClient } from "@azure/keyvault-secrets";',
      "const client = new SecretClient(process.env.KEY_VAULT_URL, new DefaultAzureCredential());",
      'const secret = await client.getSecret("smtp-password");',
      "process.stdout.write(JSON.stringify({ value: secret.value, contentType: secret.properties.contentType }));",
    ].join("\n");
    const childEnv: NodeJS.ProcessEnv = { ...process.env, ...double.env };
    delete childEnv.NODE_TEST_CONTEXT; // otherwise the child talks the test runner's protocol
    const stdout = await new Promise<string>((resolve, reject) => {
      execFile(process.execPath, ["--input-type=module", "-e", script], { env: childEnv, timeout: 30_000 }, (error, out, err) =>
        error ? reject(new Error(`${error.message}\n${err}`)) : resolve(out),
      );
    });
    assert.deepEqual(JSON.parse(stdout), { value: "hunter2", contentType: "text/plain" });
    assert.equal(double.counts.tokenRequests, 1);
    assert.equal(double.counts.challenges, 1);
    assert.equal(double.counts.secretGets, 1);
    assert.deepEqual(double.refused, []);
  });
  describe("keys: signing with a certificate's key that never leaves the vault (CryptographyClient)", () => {
    const pair = issueCertificate({ commonName: "queue-mailer sender (vault-signed)" });
    const signingInput = Buffer.from("eyJhbGciOiJQUzI1NiJ9.eyJzdWIiOiJ4In0");
    const digest = createHash("sha256").update(signingInput).digest();
    const publicKey = new X509Certificate(pair.certificatePem).publicKey;
    let version: string;
    let keyId: string;

    before(async () => {
      version = double.putCertificate("mailer-hsm", { ...pair, exportable: false });
      keyId = (await certificates.getCertificate("mailer-hsm")).keyId!;
    });

    it("serves the public key, signs PS256 and RS256 with the certificate's key, and has no secret at all", async () => {
      assert.equal(keyId, `${double.vaultUrl}/keys/mailer-hsm/${version}`);
      double.resetCounts();
      const client = new CryptographyClient(keyId, credential);
      const ps256 = await client.sign("PS256", digest);
      const rs256 = await client.sign("RS256", digest);
      assert.equal(ps256.keyID, keyId);
      // Verified independently of the double: Node's verify hashes the signing input itself.
      const pss = { key: publicKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 };
      assert.ok(verify("sha256", signingInput, pss, ps256.result), "PS256: RSA-PSS, SHA-256, 32-byte salt");
      assert.ok(verify("sha256", signingInput, { key: publicKey, padding: constants.RSA_PKCS1_PADDING }, rs256.result), "RS256: PKCS#1 v1.5");
      assert.ok(!verify("sha256", signingInput, { key: publicKey, padding: constants.RSA_PKCS1_PADDING }, ps256.result));
      assert.ok(!verify("sha256", Buffer.from("something else"), pss, ps256.result));
      assert.notDeepEqual(Buffer.from((await client.sign("PS256", digest)).result), Buffer.from(ps256.result), "PSS is salted: a fresh signature each time");

      // What the client sent: one key read (then it signs remotely), one POST per sign.
      assert.deepEqual(
        double.requests.filter((r) => r.status === 200).map((r) => `${r.method} ${r.path}`),
        [`GET /keys/mailer-hsm/${version}`, ...Array.from({ length: 3 }, () => `POST /keys/mailer-hsm/${version}/sign`)],
      );
      assert.deepEqual({ keyGets: double.counts.keyGets, signs: double.counts.signs, secretGets: double.counts.secretGets }, { keyGets: 1, signs: 3, secretGets: 0 });
      assert.equal(double.counts.challenges, 1, "the crypto client's own challenge probe");
      assert.deepEqual(double.signRequests.map((s) => `${s.name}/${s.version} ${s.alg}`), [`mailer-hsm/${version} PS256`, `mailer-hsm/${version} RS256`, `mailer-hsm/${version} PS256`]);

      const key = await new KeyClient(double.vaultUrl, credential).getKey("mailer-hsm", { version });
      assert.equal(key.id, keyId);
      assert.equal(key.properties.managed, true);
      assert.equal(key.properties.exportable, false);
      assert.ok(key.keyOperations?.includes("sign"));
      assert.equal(Buffer.from(key.key!.n!).toString("base64url"), publicKey.export({ format: "jwk" }).n, "the certificate's public key");
      assert.equal(key.key!.d, undefined, "never the private part");
      await assert.rejects(secrets.getSecret("mailer-hsm"), restError(404, "SecretNotFound"));
    });

    it("failNext(1, 403, ..., 'signs') fails the next sign like a missing keys sign permission; other requests pass it by", async () => {
      const client = new CryptographyClient(keyId, credential);
      double.failNext(1, 403, undefined, undefined, "signs");
      await certificates.getCertificate("mailer-hsm");
      await assert.rejects(client.sign("PS256", digest), restError(403, "Forbidden", "does not have keys sign permission"));
      const signed = await client.sign("PS256", digest);
      assert.ok(verify("sha256", signingInput, { key: publicKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }, signed.result));
    });

    it("a disabled certificate's key can be read but not used: 403 KeyDisabled", async () => {
      double.setCertificateEnabled("mailer-hsm", false);
      try {
        const client = new CryptographyClient(keyId, credential);
        await assert.rejects(client.sign("PS256", digest), (error: unknown) => {
          restError(403, "Forbidden", "not allowed on a disabled key")(error);
          assert.equal((error as { details?: { error?: { innerError?: { code?: string } } } }).details?.error?.innerError?.code, "KeyDisabled");
          return true;
        });
        assert.equal((await certificates.getCertificate("mailer-hsm")).properties.enabled, false);
      } finally {
        double.setCertificateEnabled("mailer-hsm", true);
      }
    });

    it("answers 404 KeyNotFound for an unknown key and 400 for a digest that is not SHA-256 sized", async () => {
      await assert.rejects(new CryptographyClient(`${double.vaultUrl}/keys/nope/${"0".repeat(32)}`, credential).sign("PS256", digest), restError(404, "KeyNotFound", "nope"));
      await assert.rejects(new CryptographyClient(keyId, credential).sign("PS256", digest.subarray(0, 20)), restError(400, "BadParameter", "digest length"));
    });

    it("a pending certificate has a key id but no cer, x5t or secret id yet", async () => {
      double.putCertificate("mailer-pending", { ...issueCertificate({ commonName: "awaiting its CA" }), pending: true });
      const pending = await certificates.getCertificate("mailer-pending");
      assert.equal(pending.cer, undefined);
      assert.equal(pending.secretId, undefined);
      assert.equal(pending.properties.x509Thumbprint, undefined);
      assert.match(pending.keyId ?? "", /\/keys\/mailer-pending\/[0-9a-f]{32}$/);
      await assert.rejects(secrets.getSecret("mailer-pending"), restError(404, "SecretNotFound"));
    });
  });

  describe("Microsoft Graph: an app registration's credentials (expiry watch)", () => {
    const appId = "6f1d3c2e-0b7a-4a55-9d1e-3f2b8c7a9e10";
    const certificateEnd = wholeSeconds(Date.now() + 12 * 86_400_000);
    const certificateStart = wholeSeconds(Date.now() - 353 * 86_400_000);
    const secretEnd = wholeSeconds(Date.now() - 86_400_000); // already expired
    const httpClient = createDefaultHttpClient();
    let graph: Pipeline;

    before(() => {
      double.putApplication({
        appId,
        displayName: "queue-mailer sender",
        keyCredentials: [
          { keyId: "0b9a7c5e-1d2f-4e3a-8b6c-7d8e9f0a1b2c", displayName: "CN=queue-mailer", endDateTime: certificateEnd, startDateTime: certificateStart },
          { endDateTime: new Date("2030-01-02T03:04:05.678Z") },
        ],
        passwordCredentials: [{ displayName: "bootstrap", hint: "Xy7", endDateTime: secretEnd }],
      });
      graph = createPipelineFromOptions({});
      graph.addPolicy(bearerTokenAuthenticationPolicy({ credential, scopes: "https://graph.microsoft.com/.default" }));
    });

    after(() => double.denyGraph(false));

    it("GET applications(appId='...') returns the credentials with ISO endDateTime", async () => {
      double.resetCounts();
      const select = "$select=id,appId,displayName,keyCredentials,passwordCredentials";
      const { status, body } = await graphGet(graph, httpClient, `${GRAPH}/applications(appId='${appId}')?${select}`);
      assert.equal(status, 200, JSON.stringify(body));
      assert.match(body["@odata.context"], /^https:\/\/graph\.microsoft\.com\/v1\.0\/\$metadata#applications/);
      assert.match(body.id, UUID);
      assert.equal(body.appId, appId);
      assert.equal(body.displayName, "queue-mailer sender");

      assert.equal(body.keyCredentials.length, 2);
      const [certificate, defaulted] = body.keyCredentials;
      assert.equal(certificate.keyId, "0b9a7c5e-1d2f-4e3a-8b6c-7d8e9f0a1b2c");
      assert.equal(certificate.displayName, "CN=queue-mailer");
      assert.equal(certificate.type, "AsymmetricX509Cert");
      assert.equal(certificate.usage, "Verify");
      assert.equal(certificate.key, null);
      assert.equal(typeof certificate.customKeyIdentifier, "string");
      assert.match(certificate.endDateTime, ISO_UTC);
      assert.equal(new Date(certificate.endDateTime).getTime(), certificateEnd.getTime());
      assert.equal(new Date(certificate.startDateTime).getTime(), certificateStart.getTime());
      assert.match(defaulted.keyId, UUID, "keyId defaults to a random UUID");
      assert.equal(defaulted.endDateTime, "2030-01-02T03:04:05.678Z");
      assert.match(defaulted.startDateTime, ISO_UTC);

      assert.deepEqual(body.passwordCredentials, [
        {
          customKeyIdentifier: null,
          displayName: "bootstrap",
          endDateTime: secretEnd.toISOString().replace(".000Z", "Z"),
          hint: "Xy7",
          keyId: body.passwordCredentials[0].keyId,
          secretText: null,
          startDateTime: body.passwordCredentials[0].startDateTime,
        },
      ]);
      assert.match(body.passwordCredentials[0].keyId, UUID);
      assert.ok(new Date(body.passwordCredentials[0].startDateTime) <= secretEnd);

      assert.equal(double.counts.graphRequests, 1);
      assert.equal(double.counts.tokenRequests, 1, "one token for Graph (the vault token is not reused)");
      assert.deepEqual(
        double.requests.map((r) => `${r.method} ${r.host} ${r.status}`),
        ["POST login.microsoftonline.com 200", "GET graph.microsoft.com 200"],
      );
      assert.deepEqual(double.refused, []);
    });

    it("honours $select, a percent-encoded key, and $filter=appId eq '...'", async () => {
      double.resetCounts();
      const selected = await graphGet(graph, httpClient, `${GRAPH}/applications(appId=%27${appId}%27)?%24select=keyCredentials`);
      assert.equal(selected.status, 200);
      assert.deepEqual(Object.keys(selected.body).sort(), ["@odata.context", "id", "keyCredentials"]);
      assert.equal(double.requests[0]?.path, `/v1.0/applications(appId=%27${appId}%27)`, "arrived percent-encoded");
      assert.equal(selected.body.keyCredentials.length, 2);

      const filter = (id: string): string => `${GRAPH}/applications?$filter=${encodeURIComponent(`appId eq '${id}'`)}&$select=appId,passwordCredentials`;
      const found = await graphGet(graph, httpClient, filter(appId));
      assert.equal(found.status, 200);
      assert.equal(found.body.value.length, 1);
      assert.equal(found.body.value[0].appId, appId);
      assert.equal(found.body.value[0].passwordCredentials[0].hint, "Xy7");
      assert.equal(found.body.value[0].keyCredentials, undefined);
      const none = await graphGet(graph, httpClient, filter("00000000-0000-0000-0000-000000000000"));
      assert.equal(none.status, 200);
      assert.deepEqual(none.body.value, []);
      assert.equal(double.counts.graphRequests, 3);
      assert.equal(double.counts.tokenRequests, 0, "the Graph token is cached");
    });

    it("answers 404 for an unknown app and 403 Authorization_RequestDenied under denyGraph(true)", async () => {
      double.resetCounts();
      const unknown = "11111111-2222-3333-4444-555555555555";
      const missing = await graphGet(graph, httpClient, `${GRAPH}/applications(appId='${unknown}')`);
      assert.equal(missing.status, 404);
      assert.equal((missing.body as GraphError).error.code, "Request_ResourceNotFound");
      assert.match((missing.body as GraphError).error.message, new RegExp(`^Resource '${unknown}' does not exist`));

      double.denyGraph(true);
      const denied = await graphGet(graph, httpClient, `${GRAPH}/applications(appId='${appId}')`);
      assert.equal(denied.status, 403);
      assert.deepEqual(
        { code: (denied.body as GraphError).error.code, message: (denied.body as GraphError).error.message },
        { code: "Authorization_RequestDenied", message: "Insufficient privileges to complete the operation." },
      );
      double.denyGraph(false);
      assert.equal((await graphGet(graph, httpClient, `${GRAPH}/applications(appId='${appId}')`)).status, 200);
      assert.equal(double.counts.graphRequests, 3);
    });

    it("accepts a token only on the resource it was issued for; no token is 401 without a challenge", async () => {
      double.resetCounts();
      const withVaultToken = createPipelineFromOptions({});
      withVaultToken.addPolicy(bearerTokenAuthenticationPolicy({ credential, scopes: "https://vault.azure.net/.default" }));
      const vaultTokenOnGraph = await graphGet(withVaultToken, httpClient, `${GRAPH}/applications(appId='${appId}')`);
      assert.equal(vaultTokenOnGraph.status, 401);
      assert.equal((vaultTokenOnGraph.body as GraphError).error.code, "InvalidAuthenticationToken");
      assert.equal((vaultTokenOnGraph.body as GraphError).error.message, "Access token validation failure. Invalid audience.");

      const anonymous = createPipelineFromOptions({});
      const noToken = await graphGet(anonymous, httpClient, `${GRAPH}/applications(appId='${appId}')`);
      assert.equal(noToken.status, 401);
      assert.equal((noToken.body as GraphError).error.code, "InvalidAuthenticationToken");
      assert.equal((noToken.body as GraphError).error.message, "Access token is empty.");
      assert.equal(noToken.wwwAuthenticate, undefined, "Graph sends no Key Vault-style challenge");

      const graphTokenOnVault = await graphGet(graph, httpClient, `${double.vaultUrl}/secrets/smtp-password?api-version=7.5`);
      assert.equal(graphTokenOnVault.status, 401);
      assert.match(graphTokenOnVault.wwwAuthenticate ?? "", /resource="https:\/\/vault\.azure\.net"/);
      assert.equal(double.counts.challenges, 1);
      assert.equal(double.counts.graphRequests, 2);
      assert.equal(double.counts.tokenRequests, 0, "both tokens come from the credential's cache");
    });

    it("the vault still works beside Graph", async () => {
      double.resetCounts();
      assert.equal((await secrets.getSecret("smtp-password")).value, "hunter2");
      const certificate = await certificates.getCertificate("mailer-pem");
      assert.deepEqual(Buffer.from(certificate.cer!), certificateDer(pemPair.certificatePem));
      assert.equal(double.counts.secretGets, 1);
      assert.equal(double.counts.certificateGets, 1);
      assert.equal(double.counts.graphRequests, 0);
      assert.deepEqual(double.refused, []);
    });
  });
});
