// What the expiry watch knows about one credential, and what it concludes. Sources produce
// ExpiryItems; evaluate() turns them into findings with a status, days left and what to do.
import type { ExpiryConfig } from "../config.js";

export type ExpiryItemKind = "certificate" | "secret" | "certificate-file" | "app-certificate" | "app-secret" | "google-key" | "refresh-token";
/** "unchecked": the credential is in use but its end date is out of this watch's sight (detail says why). */
export type ExpiryStatus = "ok" | "warning" | "critical" | "expired" | "disabled" | "never-expires" | "error" | "unchecked";

export interface ExpiryItem {
  /**
   * Identifies this credential *and version*: a renewed certificate gets a new key, so the old
   * version's alerts stop by themselves.
   */
  key: string;
  name: string;
  kind: ExpiryItemKind;
  /** Where it lives: vault URL, file path, "app registration <client id>". */
  source: string;
  expiresOn?: Date;
  enabled: boolean;
  /** The credential the sender signs with right now. */
  inUse?: boolean;
  /**
   * `expiresOn` is a rotation date (Google's 90-day advice), not the end of validity: past it the
   * item stays a warning instead of "expired".
   */
  rotationDue?: boolean;
}

export interface ExpiryFinding extends ExpiryItem {
  status: ExpiryStatus;
  /** Whole days until expiry, rounded; negative once expired. */
  daysLeft?: number;
  /** For status "error" and "unchecked": what could not be checked and why. */
  detail?: string;
  action: string;
}

const DAY_MS = 86_400_000;

const actions: Record<ExpiryItemKind, string> = {
  certificate: "Renew the certificate in Key Vault (or let its issuance policy auto-renew), then upload the new public part (.cer) to the app registration.",
  secret: "Rotate the secret in Key Vault and in whatever issued it.",
  "certificate-file": "Replace the file in CERT_PATH with a renewed certificate and upload its public part (.cer) to the app registration.",
  "app-certificate": "Upload a renewed certificate to the app registration (Certificates & secrets) before this one expires, then remove the old one.",
  "app-secret": "Create a new client secret in the app registration, update the setting that uses it, then delete the old one.",
  "google-key": "Create a new key for the service account (IAM & Admin > Service accounts > Keys), put its JSON in GOOGLE_KEY_PATH or the GOOGLE_KEY_NAME secret, then delete the old key.",
  "refresh-token": "The delegated grant ends when its refresh token goes unused this long. Send one message (the sender redeems and rotates the token, which starts the period again), or sign the user in again with `queue-mailer authorize`.",
};

export function daysLeft(expiresOn: Date, now: Date): number {
  return Math.round((expiresOn.getTime() - now.getTime()) / DAY_MS);
}

export function evaluate(item: ExpiryItem, now: Date, config: Pick<ExpiryConfig, "warnDays" | "criticalDays">): ExpiryFinding {
  const action = actions[item.kind];
  if (!item.enabled) return { ...item, status: "disabled", action: "Disabled: nothing uses it. Delete it when it is no longer needed." };
  if (!item.expiresOn) return { ...item, status: "never-expires", action: "No expiry date is set." };
  const left = daysLeft(item.expiresOn, now);
  const warnFrom = Math.max(...config.warnDays, config.criticalDays);
  const past = item.expiresOn.getTime() <= now.getTime();
  const status: ExpiryStatus =
    past && item.rotationDue ? "warning" : past ? "expired" : left <= config.criticalDays && !item.rotationDue ? "critical" : left <= warnFrom ? "warning" : "ok";
  return { ...item, status, daysLeft: left, action };
}

/** A check that could not be made is a finding too, so that it is seen rather than crashing the run. */
export function errorFinding(key: string, name: string, kind: ExpiryItemKind, source: string, detail: string, action: string): ExpiryFinding {
  return { key, name, kind, source, enabled: true, status: "error", detail, action };
}

/**
 * Which alert is due for a finding, if any: daily once expired or critical (one key per UTC day),
 * otherwise once per warning threshold crossed (the smallest threshold reached, so a first run at
 * 20 days warns once for "30", not for every threshold above).
 */
export function dueAlertKey(finding: ExpiryFinding, now: Date, config: Pick<ExpiryConfig, "warnDays">): string | undefined {
  if (finding.status === "expired" || finding.status === "critical") return `daily-${now.toISOString().slice(0, 10)}`;
  if (finding.status !== "warning" || finding.daysLeft === undefined) return undefined;
  const left = finding.daysLeft;
  const crossed = config.warnDays.filter((t) => left <= t);
  return crossed.length === 0 ? undefined : `threshold-${Math.min(...crossed)}`;
}
