// Development and test certificates: a local CA, server certificates it signs (for the SMTP sink's
// STARTTLS and the Key Vault test double), and a self-signed client certificate for the assertion.
// node-forge writes X.509 and PKCS#12, which Node's crypto cannot; key generation uses Node's
// native RSA so this stays fast.
import { generateKeyPairSync, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import forge from "node-forge";

export interface CertificateAndKey {
  /** PEM "CERTIFICATE" block. */
  certificatePem: string;
  /** PEM PKCS#8 "PRIVATE KEY" block. */
  privateKeyPem: string;
}

export interface IssueOptions {
  commonName: string;
  /** DNS names and IP addresses for subjectAltName. */
  hosts?: string[];
  /** Validity in days from notBefore; may be negative for an already expired certificate. */
  days?: number;
  notBefore?: Date;
  isCa?: boolean;
}

function newRsaKeyPair(): { publicKey: forge.pki.rsa.PublicKey; privateKey: forge.pki.rsa.PrivateKey; privateKeyPem: string } {
  const { publicKey, privateKey } = generateKeyPairSync("rsa", {
    modulusLength: 2048,
    publicKeyEncoding: { type: "spki", format: "pem" },
    privateKeyEncoding: { type: "pkcs8", format: "pem" },
  });
  return {
    publicKey: forge.pki.publicKeyFromPem(publicKey) as forge.pki.rsa.PublicKey,
    privateKey: forge.pki.privateKeyFromPem(privateKey) as forge.pki.rsa.PrivateKey,
    privateKeyPem: privateKey,
  };
}

function isIpAddress(host: string): boolean {
  return /^\d{1,3}(\.\d{1,3}){3}$/.test(host) || host.includes(":");
}

/**
 * Issue a certificate. Without `issuer` it is self-signed.
 */
export function issueCertificate(options: IssueOptions, issuer?: CertificateAndKey): CertificateAndKey {
  const keys = newRsaKeyPair();
  const cert = forge.pki.createCertificate();
  cert.publicKey = keys.publicKey;
  // Positive serial: a leading 0x00..0x7f byte keeps the DER INTEGER positive.
  cert.serialNumber = "01" + randomBytes(15).toString("hex");
  const notBefore = options.notBefore ?? new Date(Date.now() - 60_000);
  const days = options.days ?? 365;
  cert.validity.notBefore = notBefore;
  cert.validity.notAfter = new Date(notBefore.getTime() + days * 86_400_000);
  const subject = [{ name: "commonName", value: options.commonName }];
  cert.setSubject(subject);

  const extensions: object[] = [
    { name: "basicConstraints", cA: options.isCa === true, critical: true },
    options.isCa
      ? { name: "keyUsage", keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true }
      : { name: "keyUsage", digitalSignature: true, keyEncipherment: true, critical: true },
    { name: "subjectKeyIdentifier" },
  ];
  if (!options.isCa) {
    extensions.push({ name: "extKeyUsage", serverAuth: true, clientAuth: true });
  }
  if (options.hosts && options.hosts.length > 0) {
    extensions.push({
      name: "subjectAltName",
      altNames: options.hosts.map((host) => (isIpAddress(host) ? { type: 7, ip: host } : { type: 2, value: host })),
    });
  }
  cert.setExtensions(extensions);

  if (issuer) {
    const issuerCert = forge.pki.certificateFromPem(issuer.certificatePem);
    cert.setIssuer(issuerCert.subject.attributes);
    cert.sign(forge.pki.privateKeyFromPem(issuer.privateKeyPem) as forge.pki.rsa.PrivateKey, forge.md.sha256.create());
  } else {
    cert.setIssuer(subject);
    cert.sign(keys.privateKey, forge.md.sha256.create());
  }
  return { certificatePem: forge.pki.certificateToPem(cert), privateKeyPem: keys.privateKeyPem };
}

export function createCertificateAuthority(commonName = "queue-mailer local CA"): CertificateAndKey {
  return issueCertificate({ commonName, isCa: true, days: 3650 });
}

/** PKCS#12 (PFX) bytes holding the certificate and key, as Key Vault and Windows export them. */
export function toPkcs12(pair: CertificateAndKey, password = ""): Buffer {
  const key = forge.pki.privateKeyFromPem(pair.privateKeyPem);
  const cert = forge.pki.certificateFromPem(pair.certificatePem);
  const asn1 = forge.pkcs12.toPkcs12Asn1(key, [cert], password, { algorithm: "3des" });
  return Buffer.from(forge.asn1.toDer(asn1).getBytes(), "binary");
}

/** DER bytes of a PEM certificate. */
export function certificateDer(certificatePem: string): Buffer {
  const cert = forge.pki.certificateFromPem(certificatePem);
  return Buffer.from(forge.asn1.toDer(forge.pki.certificateToAsn1(cert)).getBytes(), "binary");
}

/**
 * A CA kept in a folder so that a process started later can trust it through NODE_EXTRA_CA_CERTS
 * (Node reads that variable only at start). Created once, reused afterwards.
 */
export function ensureCertificateAuthority(dir: string): CertificateAndKey & { caPath: string } {
  const caPath = join(dir, "ca.pem");
  const keyPath = join(dir, "ca-key.pem");
  if (existsSync(caPath) && existsSync(keyPath)) {
    return { certificatePem: readFileSync(caPath, "utf8"), privateKeyPem: readFileSync(keyPath, "utf8"), caPath };
  }
  mkdirSync(dir, { recursive: true });
  const ca = createCertificateAuthority();
  writeFileSync(keyPath, ca.privateKeyPem, { mode: 0o600 });
  writeFileSync(caPath, ca.certificatePem);
  return { ...ca, caPath };
}
