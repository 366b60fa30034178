// A certificate and its private key, parsed from the forms they come in: PEM (certificate and key
// in either order, key optionally encrypted) and PKCS#12 (Key Vault's default export, .pfx files).
// Node's crypto reads PEM but not PKCS#12, so node-forge unpacks PFX into PEM first.
import { X509Certificate, createHash, createPrivateKey, createPublicKey, type KeyObject } from "node:crypto";
import forge from "node-forge";
import { MailerError } from "../errors.js";

export interface SigningCertificate {
  certificate: X509Certificate;
  privateKey: KeyObject;
  /** base64url SHA-256 of the certificate DER: the `x5t#S256` header Entra matches. */
  thumbprintSha256: string;
  /** base64url SHA-1 of the DER: the legacy `x5t` header. */
  thumbprintSha1: string;
  notAfter: Date;
  /** Where it came from, for logs: a file path or a Key Vault id with version. */
  source: string;
}

function certificateError(code: string, message: string, hint: string): MailerError {
  return new MailerError(code, message, { kind: "config", hint });
}

/** Pick the certificate that belongs to the key (a PEM or PFX may carry the chain too). */
function build(certificatesPem: string[], privateKey: KeyObject, source: string): SigningCertificate {
  const publicDer = createPublicKey(privateKey).export({ type: "spki", format: "der" });
  const match = certificatesPem
    .map((pem) => new X509Certificate(pem))
    .find((cert) => cert.publicKey.export({ type: "spki", format: "der" }).equals(publicDer));
  if (!match) {
    throw certificateError("CERT_KEY_MISMATCH", `${source}: no certificate in it matches its private key`, "Export the certificate together with its own private key.");
  }
  return {
    certificate: match,
    privateKey,
    thumbprintSha256: createHash("sha256").update(match.raw).digest("base64url"),
    thumbprintSha1: createHash("sha1").update(match.raw).digest("base64url"),
    notAfter: new Date(match.validTo),
    source,
  };
}

export function parsePemBundle(pem: string, source: string, password?: string): SigningCertificate {
  const certificates = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  const keyBlock = pem.match(/-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----[\s\S]+?-----END (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----/)?.[0];
  if (certificates.length === 0) {
    throw certificateError("CERT_NO_CERTIFICATE", `${source}: no "BEGIN CERTIFICATE" block found`, "The PEM must contain the certificate and its private key.");
  }
  if (!keyBlock) {
    throw certificateError("CERT_NO_PRIVATE_KEY", `${source}: no private key block found`, "The PEM must contain the private key too (BEGIN PRIVATE KEY); a Key Vault certificate must be exportable.");
  }
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(password === undefined ? { key: keyBlock } : { key: keyBlock, passphrase: password });
  } catch (error) {
    const encrypted = /ENCRYPTED|Proc-Type: 4,ENCRYPTED/.test(keyBlock);
    throw certificateError(
      encrypted ? "CERT_BAD_PASSWORD" : "CERT_UNREADABLE_KEY",
      `${source}: the private key cannot be read${encrypted ? " (it is encrypted)" : ""}: ${(error as Error).message}`,
      encrypted ? "Set CERT_PASSWORD to the key's passphrase." : "Check that the file holds an RSA private key in PEM form.",
    );
  }
  return build(certificates, privateKey, source);
}

export function parsePkcs12(pfx: Buffer, source: string, password = ""): SigningCertificate {
  let p12: forge.pkcs12.Pkcs12Pfx;
  try {
    const asn1 = forge.asn1.fromDer(forge.util.createBuffer(pfx.toString("binary")));
    p12 = forge.pkcs12.pkcs12FromAsn1(asn1, false, password);
  } catch (error) {
    const message = (error as Error).message;
    const badPassword = /password|MAC/i.test(message);
    throw certificateError(
      badPassword ? "CERT_BAD_PASSWORD" : "CERT_UNREADABLE_PKCS12",
      `${source}: cannot open the PKCS#12 file: ${message}`,
      badPassword ? "Set CERT_PASSWORD to the .pfx password (Key Vault exports use an empty password)." : "Check that it is a .pfx/.p12 file.",
    );
  }
  const keyBags = [
    ...(p12.getBags({ bagType: forge.pki.oids.pkcs8ShroudedKeyBag })[forge.pki.oids.pkcs8ShroudedKeyBag] ?? []),
    ...(p12.getBags({ bagType: forge.pki.oids.keyBag })[forge.pki.oids.keyBag] ?? []),
  ];
  const certBags = p12.getBags({ bagType: forge.pki.oids.certBag })[forge.pki.oids.certBag] ?? [];
  const key = keyBags.find((bag) => bag.key)?.key;
  if (!key) throw certificateError("CERT_NO_PRIVATE_KEY", `${source}: the PKCS#12 holds no private key`, "Export the certificate with its private key.");
  const certificates = certBags.flatMap((bag) => (bag.cert ? [forge.pki.certificateToPem(bag.cert)] : []));
  const privateKey = createPrivateKey(forge.pki.privateKeyInfoToPem(forge.pki.wrapRsaPrivateKey(forge.pki.privateKeyToAsn1(key))));
  return build(certificates, privateKey, source);
}

/** Decide by content: PEM text, or binary/base64 PKCS#12. */
export function parseCertificateFile(bytes: Buffer, source: string, password?: string): SigningCertificate {
  const text = bytes.toString("utf8");
  if (text.includes("-----BEGIN")) return parsePemBundle(text, source, password);
  return parsePkcs12(bytes, source, password ?? "");
}
