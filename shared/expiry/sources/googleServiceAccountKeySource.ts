// The Google service account key the sender signs with (GOOGLE_KEY_PATH or GOOGLE_KEY_NAME).
// A user-managed key normally never expires; Google advises rotating it, and 90 days is the usual
// policy. So the item's expiresOn is the key's rotation date, creation + 90 days (or Google's own
// expiry when an organisation policy sets an earlier one): the watch warns at EXPIRY_WARN_DAYS
// before it, and past 90 days the key shows as expired, i.e. overdue for rotation, although Google
// still accepts it. The name carries the creation date and the age.
//
// The key JSON has no creation date. Where the age comes from, best first:
// 1. The certificate Google publishes for the key (client_x509_cert_url in the key,
//    https://www.googleapis.com/robot/v1/metadata/x509/<client_email>, public, no credential):
//    its notBefore is the key's creation time and notAfter its validBeforeTime. It also tells
//    whether Google still knows the key at all (a deleted key is no longer listed).
// 2. If Google cannot be reached: the Key Vault secret version's creation date (when the JSON was
//    stored, which may be later than the key's creation), or the file's modification time (weak:
//    copying or redeploying the file resets it). Both can only make a key look younger, and the
//    name says which was used.
import { X509Certificate, createPublicKey } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import type { TokenCredential } from "@azure/identity";
import { azureCredential } from "../../auth/azureCredential.js";
import { parseServiceAccountKey, type GoogleKeyLocation, type ServiceAccountKey } from "../../auth/googleServiceAccountCredential.js";
import { toMailerError } from "../../errors.js";
import { registerSecret } from "../../redact.js";
import { errorFinding, type ExpiryFinding, type ExpiryItem } from "../finding.js";
import type { ExpirySource } from "./source.js";

export const GOOGLE_KEY_ROTATION_DAYS = 90;
const DAY_MS = 86_400_000;
/** Google's validBeforeTime for a key that never expires is 9999-12-31. */
const NO_REAL_EXPIRY_AFTER = Date.UTC(9000, 0, 1);

const ROTATE =
  "Rotate the key: create a new JSON key for the service account (IAM & Admin > Service accounts > Keys > Add key), put it in place (the file in GOOGLE_KEY_PATH, or a new version of the Key Vault secret named by GOOGLE_KEY_NAME), check that mail still goes out, then delete the old key in the Cloud console.";

type Published = { kind: "published"; createdOn: Date; validBefore: Date } | { kind: "not-listed" } | { kind: "mismatch" } | { kind: "unavailable"; reason: string };

/** Google's published certificate for this key, or why it is not there. */
async function publishedCertificate(key: ServiceAccountKey): Promise<Published> {
  if (!key.x509CertUrl) return { kind: "unavailable", reason: "the key has no client_x509_cert_url" };
  let response: Response;
  let body: string;
  try {
    response = await fetch(key.x509CertUrl, { signal: AbortSignal.timeout(10_000), headers: { accept: "application/json" } });
    body = await response.text();
  } catch (error) {
    const cause = (error as { cause?: { code?: string } }).cause;
    return { kind: "unavailable", reason: `${key.x509CertUrl} unreachable: ${(error as Error).name === "TimeoutError" ? "timed out" : (cause?.code ?? (error as Error).message)}` };
  }
  // 404: Google knows no such service account (deleted), so it knows none of its keys either.
  if (response.status === 404) return { kind: "not-listed" };
  if (!response.ok) return { kind: "unavailable", reason: `${key.x509CertUrl} answered ${response.status}` };
  let certificates: Record<string, unknown>;
  try {
    certificates = JSON.parse(body) as Record<string, unknown>;
  } catch {
    return { kind: "unavailable", reason: `${key.x509CertUrl} did not answer JSON` };
  }
  const pem = certificates[key.privateKeyId];
  if (typeof pem !== "string") return { kind: "not-listed" };
  let certificate: X509Certificate;
  try {
    certificate = new X509Certificate(pem);
  } catch {
    return { kind: "unavailable", reason: `the certificate for key ${key.privateKeyId} cannot be read` };
  }
  const ours = createPublicKey(key.privateKey).export({ format: "jwk" });
  const theirs = certificate.publicKey.export({ format: "jwk" });
  if (ours.n !== theirs.n || ours.e !== theirs.e) return { kind: "mismatch" };
  return { kind: "published", createdOn: new Date(certificate.validFrom), validBefore: new Date(certificate.validTo) };
}

/** The key's JSON and the date of where it is stored (the fallback for its age). */
async function readKey(location: GoogleKeyLocation, credential: TokenCredential | undefined): Promise<{ text: string; storedOn: Date | undefined; storedWhere: string; source: string }> {
  if (location.kind === "file") {
    const [text, info] = await Promise.all([readFile(location.path, "utf8"), stat(location.path)]);
    return { text, storedOn: info.mtime, storedWhere: "the file's modification time", source: location.path };
  }
  const { SecretClient } = await import("@azure/keyvault-secrets");
  const secret = await new SecretClient(location.vaultUrl, credential ?? (await azureCredential())).getSecret(location.name);
  const text = secret.value ?? "";
  registerSecret(text);
  return { text, storedOn: secret.properties.createdOn, storedWhere: "the Key Vault secret version's date", source: `${location.vaultUrl.replace(/\/$/, "")}/secrets/${location.name}` };
}

function readError(location: GoogleKeyLocation, error: unknown): { detail: string; action: string } {
  const status = (error as { statusCode?: number }).statusCode;
  if (location.kind === "keyVault" && (status === 401 || status === 403)) {
    return { detail: `Key Vault refused to read the secret (${status})`, action: "Give the watch's identity the 'Key Vault Secrets User' role on the vault: the key's id and service account are inside the secret's value." };
  }
  if (location.kind === "keyVault") return { detail: `${status ?? "network"}: ${(error as Error).message.split("\n")[0]}`, action: "Check KEY_VAULT_URL and GOOGLE_KEY_NAME." };
  const failure = toMailerError(error);
  return { detail: `${failure.code === "UNEXPECTED" ? ((error as NodeJS.ErrnoException).code ?? "error") : failure.code}: ${failure.message}`, action: "Fix GOOGLE_KEY_PATH so the key file can be read." };
}

export function googleServiceAccountKeySource(location: GoogleKeyLocation, options: { credential?: TokenCredential } = {}): ExpirySource {
  const setting = location.kind === "file" ? "GOOGLE_KEY_PATH" : "GOOGLE_KEY_NAME";
  const where = location.kind === "file" ? location.path : `${location.vaultUrl.replace(/\/$/, "")}/secrets/${location.name}`;
  const failed = (detail: string, action: string): { items: ExpiryItem[]; errors: ExpiryFinding[] } => ({
    items: [],
    errors: [errorFinding(`google-key:${where}`, `Google service account key (${setting})`, "secret", where, detail, action)],
  });
  return {
    name: "google-service-account-key",
    async list() {
      let stored: Awaited<ReturnType<typeof readKey>>;
      try {
        stored = await readKey(location, options.credential);
      } catch (error) {
        const { detail, action } = readError(location, error);
        return failed(detail, action);
      }
      let key: ServiceAccountKey;
      try {
        key = parseServiceAccountKey(stored.text, location);
      } catch (error) {
        const failure = toMailerError(error);
        return failed(`${failure.code}: ${failure.message}`, failure.hint ?? "Replace the key.");
      }
      const id = `google-key:${key.clientEmail}:${key.privateKeyId}`;
      const label = `Google key ${key.privateKeyId.slice(0, 8)} of ${key.clientEmail}`;
      const published = await publishedCertificate(key);
      if (published.kind === "not-listed") {
        return failed(`Google no longer lists key ${key.privateKeyId} of ${key.clientEmail}: it was deleted or disabled (or the service account was), so token requests fail with "Invalid JWT Signature."`, ROTATE);
      }
      if (published.kind === "mismatch") {
        return failed(`the private key in ${setting} does not match the certificate Google publishes for key id ${key.privateKeyId}`, "Replace the key JSON with the file Google issued, unchanged.");
      }
      const unpublished = published.kind === "unavailable" ? published.reason : undefined;
      const createdOn = published.kind === "published" ? published.createdOn : stored.storedOn;
      if (!createdOn) return failed(`the key's creation date is unknown (${unpublished}; ${stored.storedWhere} is not available)`, "Let the watch reach www.googleapis.com, or rotate the key now to start a known 90-day period.");
      const ageDays = Math.floor((Date.now() - createdOn.getTime()) / DAY_MS);
      const basis = unpublished === undefined ? "" : `; age from ${stored.storedWhere} (${unpublished}), the key may be older`;
      const rotateBy = createdOn.getTime() + GOOGLE_KEY_ROTATION_DAYS * DAY_MS;
      const realExpiry = published.kind === "published" && published.validBefore.getTime() < NO_REAL_EXPIRY_AFTER ? published.validBefore.getTime() : Infinity;
      return {
        items: [
          {
            // The key id is in the key: a rotated key is a new item, so the old one's alerts stop.
            key: id,
            name: `${label} (created ${createdOn.toISOString().slice(0, 10)}, ${ageDays} days old; rotate every ${GOOGLE_KEY_ROTATION_DAYS} days${basis})`,
            kind: "google-key",
            source: stored.source,
            expiresOn: new Date(Math.min(rotateBy, realExpiry)),
            // Past its 90 days the key still works: that is a warning to rotate, not an outage.
            ...(rotateBy <= realExpiry ? { rotationDue: true } : {}),
            enabled: true,
            inUse: true,
          },
        ],
        errors: [],
      };
    },
  };
}
