// Step 4: the credential itself. A certificate: in its validity window and not within
// EXPIRY_CRITICAL_DAYS of its end, an RSA key of at least 2048 bits (Entra's minimum) whose private
// key matches it. A secret or password: present, and not obviously the wrong thing (a client
// secret's ID instead of its value). A Google key: a well-formed service account key.
import { createPublicKey } from "node:crypto";
import { fail, failed, pass, skip, warn, type Check } from "./check.js";
import type { CertificateMaterial, MaterialOutcome } from "./credentialMaterial.js";
import type { FixContext } from "./fixes.js";

const DAY_MS = 86_400_000;
const GUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export interface ExpiryThresholds {
  criticalDays: number;
  /** The earliest warning (the largest of EXPIRY_WARN_DAYS). */
  warnDays: number;
}

function certificateCheck(certificate: CertificateMaterial, thresholds: ExpiryThresholds, now: Date): Check {
  const { x509 } = certificate;
  const notAfter = new Date(x509.validTo);
  const notBefore = new Date(x509.validFrom);
  const daysLeft = Math.floor((notAfter.getTime() - now.getTime()) / DAY_MS);
  const publicKey = x509.publicKey;
  const bits = publicKey.asymmetricKeyDetails?.modulusLength;
  const described = `${x509.subject.replace(/\n/g, ", ")} (${certificate.location}), thumbprint ${certificate.thumbprintSha1Hex}, expires ${notAfter.toISOString().slice(0, 10)}`;
  const renew = `Renew the certificate (Key Vault: az keyvault certificate create with the same policy, or your CA), upload the new public part to the app registration (Certificates & secrets) BEFORE switching, then point CERT_NAME/CERT_PATH at it; \`queue-mailer expiry\` tracks the dates.`;
  if (publicKey.asymmetricKeyType !== "rsa") {
    return fail("credential", "CERT_KEY_NOT_RSA", `${described}: its key is ${String(publicKey.asymmetricKeyType)}, but the assertion is signed PS256/RS256`, "Use a certificate with an RSA key (2048 bits or more).");
  }
  if (bits !== undefined && bits < 2048) {
    return fail("credential", "CERT_KEY_TOO_SMALL", `${described}: RSA ${bits} bits`, "Entra ID requires RSA keys of at least 2048 bits: issue a new certificate with a 2048-bit (or larger) key and upload it to the app registration.");
  }
  if (certificate.privateKey) {
    // The sources pick the certificate that belongs to the key; checked here again because this is
    // the promise the doctor makes, whatever the source does.
    const matches = createPublicKey(certificate.privateKey).export({ type: "spki", format: "der" }).equals(publicKey.export({ type: "spki", format: "der" }));
    if (!matches) return fail("credential", "CERT_KEY_MISMATCH", `${described}: the private key does not belong to this certificate`, "Export the certificate together with its own private key.");
  }
  if (notAfter.getTime() <= now.getTime()) {
    return fail("credential", "CERT_EXPIRED", `${described}: expired ${-daysLeft} day(s) ago`, renew);
  }
  if (notBefore.getTime() > now.getTime()) {
    return fail("credential", "CERT_NOT_YET_VALID", `${described}: valid only from ${notBefore.toISOString()}`, "Use a certificate that is valid now, or check this machine's clock.");
  }
  const keyText = certificate.privateKey ? "private key matches" : "key held in Key Vault";
  if (daysLeft <= thresholds.criticalDays) {
    return fail("credential", "CERT_EXPIRING", `${described}: ${daysLeft} day(s) left, within EXPIRY_CRITICAL_DAYS (${thresholds.criticalDays})`, renew);
  }
  if (daysLeft <= thresholds.warnDays) {
    return warn("credential", "CERT_EXPIRING_SOON", `${described}: ${daysLeft} day(s) left; RSA ${bits ?? "?"}, ${keyText}`, renew);
  }
  return pass("credential", `certificate ${described}, ${daysLeft} days left; RSA ${bits ?? "?"}, ${keyText}`);
}

export function credentialStep(outcome: MaterialOutcome, thresholds: ExpiryThresholds, context: FixContext, now = new Date()): Check {
  if (outcome.vaultError) return skip("credential", "not checked: Key Vault could not be read (step keyvault)");
  if (outcome.materialError) return failed("credential", outcome.materialError, context);
  const material = outcome.material;
  if (!material) return skip("credential", "nothing to check");
  switch (material.method) {
    case "certificate":
      return certificateCheck(material.certificate, thresholds, now);
    case "secret":
    case "password": {
      const described: string[] = [];
      for (const secret of material.secrets) {
        const from = secret.source === secret.setting ? secret.setting : `${secret.setting} → ${secret.source}`;
        if (secret.value.trim() === "") {
          return fail("credential", "SECRET_EMPTY", `the ${secret.what} (${from}) is empty`, `Put the ${secret.what} in ${secret.setting}${secret.setting.endsWith("_NAME") ? "'s Key Vault secret" : ""}.`);
        }
        if (secret.what === "client secret" && GUID.test(secret.value.trim())) {
          return warn("credential", "SECRET_LOOKS_LIKE_ID", `the client secret (${from}) is a GUID: that is the secret's "Secret ID", not its Value`, "Put the client secret's Value (shown once, when it is created, under Certificates & secrets) in it; the Secret ID is refused with AADSTS7000215.");
        }
        if (secret.expiresOn) {
          const daysLeft = Math.floor((secret.expiresOn.getTime() - now.getTime()) / DAY_MS);
          if (daysLeft < 0) return fail("credential", "SECRET_EXPIRED", `the Key Vault secret holding the ${secret.what} (${from}) expired ${secret.expiresOn.toISOString().slice(0, 10)}`, `Store the current ${secret.what} as a new version of the secret (az keyvault secret set … --expires <date>).`);
          if (daysLeft <= thresholds.criticalDays) return fail("credential", "SECRET_EXPIRING", `the Key Vault secret holding the ${secret.what} (${from}) expires in ${daysLeft} day(s)`, `Rotate the ${secret.what} and store it as a new version of the secret before ${secret.expiresOn.toISOString().slice(0, 10)}.`);
        }
        described.push(`${secret.what} present (${from}${secret.version ? `, version ${secret.version}` : ""})`);
      }
      return pass("credential", described.join("; "));
    }
    case "google-service-account": {
      const key = material.key;
      return pass("credential", `service account key well-formed: ${key.clientEmail}, client id ${key.clientId ?? "?"}, key id ${key.privateKeyId} (${key.source})`);
    }
    case "refresh-token": {
      const { stored } = material;
      const who = stored.user ? ` for ${stored.user}` : "";
      if (!stored.rotatedAt) return pass("credential", `refresh token present${who} (${stored.setting} ${stored.where})`);
      // Microsoft ends a refresh token after 90 days unused; every redemption renews it.
      const idleDays = Math.floor((now.getTime() - stored.rotatedAt.getTime()) / DAY_MS);
      const text = `refresh token present${who} (${stored.setting} ${stored.where}), last rotated ${stored.rotatedAt.toISOString().slice(0, 10)} (${idleDays} days ago)`;
      if (idleDays >= 90 - thresholds.warnDays) {
        return warn("credential", "REFRESH_TOKEN_IDLE", text, "Microsoft revokes a refresh token unused for 90 days: let the sender send (each redemption renews it), or run `queue-mailer authorize` again before then.");
      }
      return pass("credential", text);
    }
  }
}
