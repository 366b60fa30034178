// AUTH_METHOD=certificate with CERT_SIGNING=vault: the client assertion is signed INSIDE Key Vault
// (keys API `sign`, through @azure/keyvault-keys' CryptographyClient), so the certificate's key may
// be non-exportable or live in an HSM. The public certificate, for the `x5t#S256`/`x5t` header,
// comes from the certificates API; the certificate's secret (its exportable key) is never read.
// Everything else is the certificate method as it is: the same token request
// (certificateCredential), the same header and claims (clientAssertion.ts), the same following of
// renewed versions (followKeyVaultCertificate). One sign call per assertion, i.e. per token request.
import { createHash, X509Certificate } from "node:crypto";
import { MailerError } from "../errors.js";
import type { Logger } from "../log.js";
import { certificateCredential, type CertificateAuth } from "./certificateCredential.js";
import { followKeyVaultCertificate, keyVaultError, type KeyVaultCertificateOptions } from "./certificateSource.js";
import type { AssertionSigner, AssertionSignerSource } from "./clientAssertion.js";
import type { CredentialSource } from "./credentialSource.js";

export function vaultSigningCredential(auth: CertificateAuth, logger: Logger, options: KeyVaultCertificateOptions = {}): CredentialSource {
  const location = auth.certificate;
  if (location.kind !== "keyVault") {
    // Config already refuses this combination; kept so that the type narrows and nothing signs locally by surprise.
    throw new MailerError("CONFIG_INVALID", "CERT_SIGNING=vault signs inside Key Vault, but the certificate is a local file (CERT_PATH)", {
      kind: "config",
      hint: "Set KEY_VAULT_URL and CERT_NAME, or CERT_SIGNING=local.",
    });
  }
  return certificateCredential(auth, logger, keyVaultSignerSource(location.vaultUrl, location.name, logger, options));
}

/** The current version of certificate `name` as a signer whose key stays in the vault. */
export function keyVaultSignerSource(vaultUrl: string, name: string, logger: Logger, options: KeyVaultCertificateOptions = {}): AssertionSignerSource {
  return followKeyVaultCertificate(
    vaultUrl,
    name,
    logger,
    async (certificate, credential): Promise<AssertionSigner> => {
      const version = certificate.properties.version;
      const keyId = certificate.keyId;
      if (!keyId) {
        throw new MailerError("KEYVAULT_CERT_NO_KEY", `Key Vault certificate "${name}" (version ${version ?? "?"}) has no key to sign with`, {
          kind: "config",
          hint: "Check CERT_NAME: it must name a certificate that Key Vault created or imported together with its key.",
        });
      }
      if (!certificate.cer || certificate.cer.length === 0) {
        // Without the public certificate there is no thumbprint for Entra to find our key by.
        throw new MailerError("KEYVAULT_CERT_PENDING", `Key Vault certificate "${name}" (version ${version ?? "?"}) is not issued yet: it has a key but no certificate`, {
          kind: "config",
          hint: "Finish the issuance (merge the CA-signed certificate into the pending request) or set CERT_NAME to an issued certificate.",
        });
      }
      const x509 = new X509Certificate(Buffer.from(certificate.cer));
      const { CryptographyClient } = await import("@azure/keyvault-keys");
      // Created per certificate version: the key id carries the version, so a renewed certificate
      // signs with its own new key.
      const client = new CryptographyClient(keyId, credential);
      const thumbprintSha256 = createHash("sha256").update(x509.raw).digest("base64url");
      logger.log("info", "certificate.loaded", {
        source: `${vaultUrl.replace(/\/$/, "")}/certificates/${name}/${version ?? "latest"}`,
        signing: "vault",
        keyId,
        thumbprintSha256,
        notAfter: new Date(x509.validTo).toISOString(),
      });
      return {
        thumbprintSha256,
        thumbprintSha1: createHash("sha1").update(x509.raw).digest("base64url"),
        async sign(alg, signingInput) {
          // Key Vault signs a digest, not the message: SHA-256 for both PS256 and RS256.
          const digest = createHash("sha256").update(signingInput).digest();
          try {
            return (await client.sign(alg, digest)).result;
          } catch (error) {
            throw signingError(error, vaultUrl, name, keyId);
          }
        },
      };
    },
    options,
  );
}

/** The SDK's own checks before it calls the vault (key operations, the key's nbf/exp). */
const UNUSABLE_KEY = /is not supported on key|can't be used before|expired at|Unable to support operation/;

function signingError(error: unknown, vaultUrl: string, name: string, keyId: string): MailerError {
  const rest = error as { statusCode?: number; message?: string; details?: { error?: { innerError?: { code?: string }; innererror?: { code?: string } } } };
  const inner = rest.details?.error?.innerError?.code ?? rest.details?.error?.innererror?.code;
  // A disabled key answers 403 like a missing permission; the role hint would send people the wrong way.
  if (rest.statusCode === 403 && (inner === "KeyDisabled" || /disabled key/i.test(rest.message ?? ""))) {
    return new MailerError("KEYVAULT_KEY_DISABLED", `Key Vault ${vaultUrl} refused to sign with the key of certificate "${name}": the key is disabled`, {
      kind: "config",
      response: rest.message,
      hint: "Enable the certificate in Key Vault (its key is disabled with it), or set CERT_NAME to the current certificate.",
      cause: error,
    });
  }
  if (rest.statusCode === undefined && UNUSABLE_KEY.test(rest.message ?? "")) {
    return new MailerError("KEYVAULT_KEY_UNUSABLE", `The key of Key Vault certificate "${name}" cannot sign: ${rest.message ?? ""}`, {
      kind: "config",
      response: rest.message,
      hint: `Renew the certificate, or give its key policy the 'sign' operation (key usage digitalSignature); key ${keyId}.`,
      cause: error,
    });
  }
  return keyVaultError(error, "key", vaultUrl, name, "sign");
}
