// The signing certificate (PEM, encrypted PEM, PKCS#12, chains), where it is read from, and the client
// assertion signed with it. Expected thumbprints are computed here independently of the code under
// test: from Node's own X509Certificate fingerprints and from node-forge's DER encoding.
import { X509Certificate, createHash, createPrivateKey, createPublicKey } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { decodeJwt, decodeProtectedHeader, jwtVerify } from "jose";
import forge from "node-forge";
import { certificateDer, issueCertificate, toPkcs12 } from "../cli/local/devCertificates.js";
import type { CertificateAndKey } from "../cli/local/devCertificates.js";
import { fileCertificateSource } from "../shared/auth/certificateSource.js";
import { ASSERTION_LIFETIME_SECONDS, createClientAssertion } from "../shared/auth/clientAssertion.js";
import { parseCertificateFile, parsePemBundle, parsePkcs12 } from "../shared/auth/signingCertificate.js";
import type { SigningCertificate } from "../shared/auth/signingCertificate.js";
import { rejectionOf, thrownBy } from "./support/harness.js";

const clientId = "00000000-aaaa-bbbb-cccc-000000000001";
const tokenUrl = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token";
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

const ca = issueCertificate({ commonName: "test CA", isCa: true, days: 3650 });
const leaf = issueCertificate({ commonName: "queue-mailer client (leaf)" }, ca);
const client = issueCertificate({ commonName: "queue-mailer client" });
const other = issueCertificate({ commonName: "someone else" });

/** base64url of a colon-separated hex fingerprint, as X509Certificate reports it. */
const fingerprintToBase64url = (fingerprint: string) => Buffer.from(fingerprint.replace(/:/g, ""), "hex").toString("base64url");

function expectedThumbprints(certificatePem: string) {
  const x509 = new X509Certificate(certificatePem);
  const der = certificateDer(certificatePem);
  // Two independent routes to the same DER bytes.
  assert.ok(der.equals(x509.raw));
  return {
    sha256: createHash("sha256").update(x509.raw).digest("base64url"),
    sha1: createHash("sha1").update(x509.raw).digest("base64url"),
    fingerprint256: fingerprintToBase64url(x509.fingerprint256),
    fingerprint1: fingerprintToBase64url(x509.fingerprint),
  };
}

function assertIsCertificate(signing: SigningCertificate, pair: CertificateAndKey, source: string) {
  const expected = expectedThumbprints(pair.certificatePem);
  assert.equal(signing.thumbprintSha256, expected.sha256);
  assert.equal(signing.thumbprintSha256, expected.fingerprint256);
  assert.equal(signing.thumbprintSha1, expected.sha1);
  assert.equal(signing.thumbprintSha1, expected.fingerprint1);
  assert.match(signing.thumbprintSha256, /^[A-Za-z0-9_-]{43}$/);
  assert.match(signing.thumbprintSha1, /^[A-Za-z0-9_-]{27}$/);
  const x509 = new X509Certificate(pair.certificatePem);
  assert.ok(signing.certificate.raw.equals(x509.raw), "the certificate that matches the key");
  assert.equal(signing.notAfter.getTime(), new Date(x509.validTo).getTime());
  assert.equal(signing.source, source);
  assert.equal(signing.privateKey.type, "private");
  // The key is the certificate's key: same public half.
  assert.ok(createPublicKey(signing.privateKey).export({ type: "spki", format: "der" }).equals(x509.publicKey.export({ type: "spki", format: "der" })));
  assert.equal(
    signing.privateKey.export({ type: "pkcs8", format: "pem" }),
    createPrivateKey(pair.privateKeyPem).export({ type: "pkcs8", format: "pem" }),
  );
}

function encryptedPkcs8(pair: CertificateAndKey, passphrase: string): string {
  return createPrivateKey(pair.privateKeyPem).export({ type: "pkcs8", format: "pem", cipher: "aes-256-cbc", passphrase }) as string;
}

/** A PFX with several certificates (and optionally no key), built with node-forge directly. */
function pkcs12With(key: string | null, certificatePems: string[], password: string): Buffer {
  const asn1 = forge.pkcs12.toPkcs12Asn1(
    key === null ? null : forge.pki.privateKeyFromPem(key),
    certificatePems.map((pem) => forge.pki.certificateFromPem(pem)),
    password,
    { algorithm: "3des" },
  );
  return Buffer.from(forge.asn1.toDer(asn1).getBytes(), "binary");
}

describe("signing certificate: PEM", () => {
  it("reads certificate + key with the key first or the certificate first", () => {
    assertIsCertificate(parsePemBundle(client.privateKeyPem + client.certificatePem, "key-first.pem"), client, "key-first.pem");
    assertIsCertificate(parsePemBundle(client.certificatePem + client.privateKeyPem, "cert-first.pem"), client, "cert-first.pem");
  });

  it("tolerates CRLF line endings and text around the blocks", () => {
    const pem = `Bag Attributes\r\n    friendlyName: mailer\r\n${client.certificatePem}\r\nsubject=CN=x\r\n${client.privateKeyPem}`.replace(/\r?\n/g, "\r\n");
    assertIsCertificate(parsePemBundle(pem, "crlf.pem"), client, "crlf.pem");
  });

  it("picks the leaf that matches the key out of a chain, whatever the order", () => {
    assertIsCertificate(parsePemBundle(ca.certificatePem + leaf.certificatePem + leaf.privateKeyPem, "chain.pem"), leaf, "chain.pem");
    assertIsCertificate(parsePemBundle(leaf.privateKeyPem + ca.certificatePem + leaf.certificatePem, "chain.pem"), leaf, "chain.pem");
    assertIsCertificate(parsePemBundle(leaf.certificatePem + ca.certificatePem + leaf.privateKeyPem, "chain.pem"), leaf, "chain.pem");
    // The CA's thumbprint is not the one we sign with.
    const signing = parsePemBundle(ca.certificatePem + leaf.certificatePem + leaf.privateKeyPem, "chain.pem");
    assert.notEqual(signing.thumbprintSha256, expectedThumbprints(ca.certificatePem).sha256);
  });

  it("reads an encrypted PKCS#8 key with the right passphrase", () => {
    const encrypted = encryptedPkcs8(client, "correct horse");
    assert.match(encrypted, /-----BEGIN ENCRYPTED PRIVATE KEY-----/);
    assertIsCertificate(parsePemBundle(client.certificatePem + encrypted, "enc.pem", "correct horse"), client, "enc.pem");
    assertIsCertificate(parseCertificateFile(Buffer.from(encrypted + client.certificatePem), "enc.pem", "correct horse"), client, "enc.pem");
  });

  it("reads a legacy encrypted PKCS#1 key (Proc-Type: 4,ENCRYPTED)", () => {
    const legacy = createPrivateKey(client.privateKeyPem).export({ type: "pkcs1", format: "pem", cipher: "aes-256-cbc", passphrase: "legacy pass" }) as string;
    assert.match(legacy, /Proc-Type: 4,ENCRYPTED/);
    assertIsCertificate(parsePemBundle(legacy + client.certificatePem, "legacy.pem", "legacy pass"), client, "legacy.pem");
    const error = thrownBy(() => parsePemBundle(legacy + client.certificatePem, "legacy.pem"));
    assert.equal(error.code, "CERT_BAD_PASSWORD");
  });

  it("an encrypted key without a passphrase or with a wrong one → CERT_BAD_PASSWORD (config)", () => {
    const encrypted = encryptedPkcs8(client, "correct horse");
    for (const password of [undefined, "wrong horse", ""]) {
      const error = thrownBy(() => parsePemBundle(client.certificatePem + encrypted, "enc.pem", password));
      assert.equal(error.code, "CERT_BAD_PASSWORD", `password ${String(password)}`);
      assert.equal(error.kind, "config");
      assert.match(error.message, /enc\.pem/);
      assert.match(error.hint ?? "", /CERT_PASSWORD/);
      assert.doesNotMatch(error.message, /correct horse|wrong horse/);
    }
    assert.equal(thrownBy(() => parseCertificateFile(Buffer.from(client.certificatePem + encrypted), "enc.pem")).code, "CERT_BAD_PASSWORD");
  });

  it("a passphrase given for an unencrypted key is harmless", () => {
    assertIsCertificate(parsePemBundle(client.certificatePem + client.privateKeyPem, "plain.pem", "unused"), client, "plain.pem");
  });

  it("no private key → CERT_NO_PRIVATE_KEY; no certificate → CERT_NO_CERTIFICATE", () => {
    const noKey = thrownBy(() => parsePemBundle(client.certificatePem, "cert-only.pem"));
    assert.equal(noKey.code, "CERT_NO_PRIVATE_KEY");
    assert.equal(noKey.kind, "config");
    assert.match(noKey.message, /cert-only\.pem/);
    assert.equal(thrownBy(() => parseCertificateFile(Buffer.from(ca.certificatePem + leaf.certificatePem), "chain-only.pem")).code, "CERT_NO_PRIVATE_KEY");

    const noCert = thrownBy(() => parsePemBundle(client.privateKeyPem, "key-only.pem"));
    assert.equal(noCert.code, "CERT_NO_CERTIFICATE");
    assert.equal(noCert.kind, "config");
  });

  it("a key that belongs to another certificate → CERT_KEY_MISMATCH", () => {
    const error = thrownBy(() => parsePemBundle(client.certificatePem + other.privateKeyPem, "mixed.pem"));
    assert.equal(error.code, "CERT_KEY_MISMATCH");
    assert.equal(error.kind, "config");
    assert.match(error.message, /mixed\.pem/);
    // A chain without the key's own certificate.
    assert.equal(thrownBy(() => parsePemBundle(ca.certificatePem + client.certificatePem + leaf.privateKeyPem, "chain.pem")).code, "CERT_KEY_MISMATCH");
  });

  it("errors never carry the key material", () => {
    const error = thrownBy(() => parsePemBundle(client.certificatePem + other.privateKeyPem, "mixed.pem"));
    const keyBody = other.privateKeyPem.split("\n")[1]!;
    for (const text of [error.message, error.hint ?? "", JSON.stringify(error.toJSON())]) {
      assert.doesNotMatch(text, /PRIVATE KEY/);
      assert.ok(!text.includes(keyBody));
    }
  });
});

describe("signing certificate: PKCS#12", () => {
  it("reads a PFX with an empty password (Key Vault's export) and with a password", () => {
    assertIsCertificate(parsePkcs12(toPkcs12(client, ""), "kv.pfx", ""), client, "kv.pfx");
    assertIsCertificate(parsePkcs12(toPkcs12(client, ""), "kv.pfx"), client, "kv.pfx");
    assertIsCertificate(parsePkcs12(toPkcs12(client, "pfx pass"), "local.pfx", "pfx pass"), client, "local.pfx");
  });

  it("parseCertificateFile tells PFX from PEM by content", () => {
    assertIsCertificate(parseCertificateFile(toPkcs12(client, ""), "cert.pfx"), client, "cert.pfx");
    assertIsCertificate(parseCertificateFile(toPkcs12(client, "pfx pass"), "cert.pfx", "pfx pass"), client, "cert.pfx");
    assertIsCertificate(parseCertificateFile(Buffer.from(client.certificatePem + client.privateKeyPem), "cert.pem"), client, "cert.pem");
  });

  it("a wrong PFX password (or none for a protected file) → CERT_BAD_PASSWORD (config)", () => {
    const pfx = toPkcs12(client, "pfx pass");
    for (const password of ["wrong pass", ""]) {
      const error = thrownBy(() => parsePkcs12(pfx, "local.pfx", password));
      assert.equal(error.code, "CERT_BAD_PASSWORD", `password "${password}"`);
      assert.equal(error.kind, "config");
      assert.match(error.hint ?? "", /CERT_PASSWORD/);
      assert.doesNotMatch(error.message, /wrong pass|pfx pass/);
    }
    assert.equal(thrownBy(() => parseCertificateFile(pfx, "local.pfx")).code, "CERT_BAD_PASSWORD");
    assert.equal(thrownBy(() => parsePkcs12(toPkcs12(client, ""), "kv.pfx", "unexpected")).code, "CERT_BAD_PASSWORD");
  });

  it("picks the leaf out of a PFX that carries the chain", () => {
    assertIsCertificate(parsePkcs12(pkcs12With(leaf.privateKeyPem, [ca.certificatePem, leaf.certificatePem], ""), "chain.pfx"), leaf, "chain.pfx");
    assertIsCertificate(parsePkcs12(pkcs12With(leaf.privateKeyPem, [leaf.certificatePem, ca.certificatePem], "p"), "chain.pfx", "p"), leaf, "chain.pfx");
  });

  it("a PFX without a key → CERT_NO_PRIVATE_KEY; with another certificate's key → CERT_KEY_MISMATCH", () => {
    const noKey = thrownBy(() => parsePkcs12(pkcs12With(null, [client.certificatePem], ""), "public.pfx"));
    assert.equal(noKey.code, "CERT_NO_PRIVATE_KEY");
    assert.equal(noKey.kind, "config");
    const mismatch = thrownBy(() => parsePkcs12(pkcs12With(other.privateKeyPem, [client.certificatePem], ""), "mixed.pfx"));
    assert.equal(mismatch.code, "CERT_KEY_MISMATCH");
  });

  it("bytes that are neither PEM nor PKCS#12 → CERT_UNREADABLE_PKCS12", () => {
    const error = thrownBy(() => parseCertificateFile(Buffer.from([0x30, 0x82, 0x00, 0x01, 0xff, 0x00, 0x13]), "junk.bin"));
    assert.equal(error.code, "CERT_UNREADABLE_PKCS12");
    assert.equal(error.kind, "config");
  });
});

describe("fileCertificateSource", () => {
  const dir = mkdtempSync(join(tmpdir(), "queue-mailer-cert-"));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it("a missing file → CERT_FILE_UNREADABLE, kind config, naming the path", async () => {
    const path = join(dir, "missing.pem");
    const error = await rejectionOf(fileCertificateSource(path).load());
    assert.equal(error.code, "CERT_FILE_UNREADABLE");
    assert.equal(error.kind, "config");
    assert.ok(error.message.includes(path));
    assert.match(error.message, /ENOENT/);
    assert.match(error.hint ?? "", /CERT_PATH/);
  });

  it("does not cache a failed load", async () => {
    const path = join(dir, "later.pem");
    const source = fileCertificateSource(path);
    assert.equal((await rejectionOf(source.load())).code, "CERT_FILE_UNREADABLE");
    writeFileSync(path, client.certificatePem + client.privateKeyPem);
    assertIsCertificate(await source.load(), client, path);
  });

  it("a file with a bad password fails the load with the parser's code", async () => {
    const path = join(dir, "protected.pfx");
    writeFileSync(path, toPkcs12(client, "pfx pass"));
    assert.equal((await rejectionOf(fileCertificateSource(path, "nope").load())).code, "CERT_BAD_PASSWORD");
    assertIsCertificate(await fileCertificateSource(path, "pfx pass").load(), client, path);
  });

  it("loads once, and reads the file again after invalidate()", async () => {
    const path = join(dir, "renewed.pem");
    writeFileSync(path, client.privateKeyPem + client.certificatePem);
    const source = fileCertificateSource(path);
    const [first, concurrent] = await Promise.all([source.load(), source.load()]);
    assert.equal(concurrent, first, "concurrent loads share one read");
    assert.equal(await source.load(), first, "the same object on a later load");
    assertIsCertificate(first, client, path);

    // A renewed certificate on disk is not noticed until invalidate().
    writeFileSync(path, other.certificatePem + other.privateKeyPem);
    assert.equal(await source.load(), first);
    source.invalidate();
    const renewed = await source.load();
    assert.notEqual(renewed, first);
    assert.notEqual(renewed.thumbprintSha256, first.thumbprintSha256);
    assertIsCertificate(renewed, other, path);
    assert.equal(await source.load(), renewed);
  });
});

describe("createClientAssertion", () => {
  const signing = parsePemBundle(client.certificatePem + client.privateKeyPem, "client.pem");
  const publicKey = new X509Certificate(client.certificatePem).publicKey;
  const expected = expectedThumbprints(client.certificatePem);

  it("PS256: verifies with the certificate's public key; header typ JWT and x5t#S256 only", async () => {
    const assertion = await createClientAssertion(signing, { clientId, audience: tokenUrl, alg: "PS256" });
    const { payload, protectedHeader } = await jwtVerify(assertion.jwt, publicKey, { algorithms: ["PS256"] });
    assert.equal(protectedHeader.x5t, undefined);
    assert.equal(protectedHeader.kid, undefined, "no kid: Entra selects the key by thumbprint");
    assert.deepEqual(protectedHeader, { alg: "PS256", typ: "JWT", "x5t#S256": expected.sha256 });
    assert.deepEqual(decodeProtectedHeader(assertion.jwt), assertion.header);

    assert.equal(payload.aud, tokenUrl);
    assert.equal(payload.iss, clientId);
    assert.equal(payload.sub, clientId);
    assert.match(String(payload.jti), UUID);
    assert.equal(typeof payload.nbf, "number");
    assert.equal(typeof payload.exp, "number");
    assert.equal(payload.iat, payload.nbf);
    assert.ok(payload.exp! - payload.nbf! <= 600);
    assert.ok(payload.exp! > payload.nbf!);
    assert.ok(Math.abs(payload.nbf! - Date.now() / 1000) < 5, "nbf is now");
    assert.deepEqual(payload, { ...assertion.claims });
    assert.ok(ASSERTION_LIFETIME_SECONDS <= 600);
  });

  it("PS256: does not verify as RS256, nor with another certificate's key", async () => {
    const { jwt } = await createClientAssertion(signing, { clientId, audience: tokenUrl, alg: "PS256" });
    await assert.rejects(jwtVerify(jwt, publicKey, { algorithms: ["RS256"] }));
    await assert.rejects(jwtVerify(jwt, new X509Certificate(other.certificatePem).publicKey, { algorithms: ["PS256"] }));
  });

  it("every assertion has a fresh jti", async () => {
    const assertions = await Promise.all(Array.from({ length: 5 }, () => createClientAssertion(signing, { clientId, audience: tokenUrl, alg: "PS256" })));
    const jtis = assertions.map((a) => String(decodeJwt(a.jwt).jti));
    for (const jti of jtis) assert.match(jti, UUID);
    assert.equal(new Set(jtis).size, jtis.length);
    assert.equal(new Set(assertions.map((a) => a.jwt)).size, assertions.length);
  });

  it("uses the given clock for nbf, iat and exp", async () => {
    const now = new Date("2030-01-02T03:04:05.678Z");
    const { claims, jwt } = await createClientAssertion(signing, { clientId, audience: tokenUrl, alg: "PS256", now });
    const seconds = Math.floor(now.getTime() / 1000);
    assert.equal(claims.nbf, seconds);
    assert.equal(claims.iat, seconds);
    assert.equal(claims.exp, seconds + ASSERTION_LIFETIME_SECONDS);
    assert.deepEqual(decodeJwt(jwt), { ...claims });
    // Not yet valid by the real clock: jwtVerify notices.
    await assert.rejects(jwtVerify(jwt, publicKey, { algorithms: ["PS256"] }));
    await jwtVerify(jwt, publicKey, { algorithms: ["PS256"], currentDate: new Date(now.getTime() + 1000) });
  });

  it("RS256 (legacy): alg RS256 with both x5t (SHA-1) and x5t#S256", async () => {
    const assertion = await createClientAssertion(signing, { clientId, audience: tokenUrl, alg: "RS256" });
    const { payload, protectedHeader } = await jwtVerify(assertion.jwt, publicKey, { algorithms: ["RS256"] });
    assert.deepEqual(protectedHeader, { alg: "RS256", typ: "JWT", "x5t#S256": expected.sha256, x5t: expected.sha1 });
    assert.equal(payload.aud, tokenUrl);
    assert.equal(payload.iss, clientId);
    assert.equal(payload.sub, clientId);
    assert.match(String(payload.jti), UUID);
    assert.equal(payload.iat, payload.nbf);
    assert.ok(payload.exp! - payload.nbf! <= 600);
    await assert.rejects(jwtVerify(assertion.jwt, publicKey, { algorithms: ["PS256"] }));
  });

  it("signs with the key of a PFX-loaded certificate too", async () => {
    const fromPfx = parsePkcs12(toPkcs12(leaf, ""), "leaf.pfx");
    const { jwt } = await createClientAssertion(fromPfx, { clientId, audience: tokenUrl, alg: "PS256" });
    const { protectedHeader } = await jwtVerify(jwt, new X509Certificate(leaf.certificatePem).publicKey, { algorithms: ["PS256"] });
    assert.equal(protectedHeader["x5t#S256"], expectedThumbprints(leaf.certificatePem).sha256);
  });
});
