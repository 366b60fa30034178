// One run of the expiry watch: list every source, evaluate each item against the thresholds, and
// deliver the alerts that are due through each channel once (claimed in the ledger).
import type { ExpiryConfig } from "../config.js";
import { toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
import { dueAlertKey, evaluate, type ExpiryFinding } from "./finding.js";
import type { AlertLedger } from "./alertLedger.js";
import type { Alert, AlertChannel } from "./channels/channel.js";
import type { ExpirySource } from "./sources/source.js";
import { appRegistrationSource } from "./sources/appRegistrationSource.js";
import { certificateFileSource } from "./sources/certificateFileSource.js";
import { keyVaultSource } from "./sources/keyVaultSource.js";
import { googleServiceAccountKeySource } from "./sources/googleServiceAccountKeySource.js";
import { refreshTokenSource } from "./sources/refreshTokenSource.js";
import { unwatchedClientSecretSource } from "./sources/unwatchedClientSecretSource.js";

export function expirySourcesFor(config: ExpiryConfig): ExpirySource[] {
  const sources: ExpirySource[] = [];
  if (config.keyVault) {
    const { vaultUrl, certName, secretNames } = config.keyVault;
    sources.push(keyVaultSource(vaultUrl, { watchNames: config.watchNames, ...(certName ? { certName } : {}), ...(secretNames ? { secretNames } : {}) }));
  }
  if (config.certificateFile) sources.push(certificateFileSource(config.certificateFile.path, config.certificateFile.password));
  if (config.appRegistration) sources.push(appRegistrationSource(config.appRegistration.clientId));
  if (config.googleKey) sources.push(googleServiceAccountKeySource(config.googleKey));
  if (config.refreshToken) sources.push(refreshTokenSource(config.refreshToken.location, config.refreshToken.tokenUrl ? { tokenUrl: config.refreshToken.tokenUrl } : {}));
  if (config.unwatchedClientSecret) sources.push(unwatchedClientSecretSource(config.unwatchedClientSecret.setting));
  return sources;
}

/** Read-only: what `queue-mailer expiry` prints. */
export async function collectFindings(sources: ExpirySource[], config: Pick<ExpiryConfig, "warnDays" | "criticalDays">, now: Date): Promise<ExpiryFinding[]> {
  const results = await Promise.all(sources.map((s) => s.list()));
  return results.flatMap(({ items, errors, notices = [] }) => [...items.map((item) => evaluate(item, now, config)), ...errors, ...notices]);
}

export interface ExpiryRunResult {
  findings: ExpiryFinding[];
  /** Per channel: alerts delivered now, and the error if the channel failed. */
  channels: Record<string, { delivered: Alert[]; error?: string }>;
}

export async function runExpiryWatch(options: {
  config: ExpiryConfig;
  sources: ExpirySource[];
  channels: AlertChannel[];
  ledger: AlertLedger;
  logger: Logger;
  now?: Date;
}): Promise<ExpiryRunResult> {
  const { config, ledger, logger } = options;
  const now = options.now ?? new Date();
  const findings = await collectFindings(options.sources, config, now);
  for (const finding of findings.filter((f) => f.status === "error")) {
    logger.log("warn", "expiry.check_failed", { name: finding.name, source: finding.source, detail: finding.detail, action: finding.action });
  }
  for (const finding of findings.filter((f) => f.status === "unchecked")) {
    logger.log("info", "expiry.not_checked", { name: finding.name, source: finding.source, detail: finding.detail, action: finding.action });
  }
  const due: Alert[] = findings.flatMap((finding) => {
    const alertKey = dueAlertKey(finding, now, config);
    return alertKey ? [{ finding, alertKey }] : [];
  });

  const result: ExpiryRunResult = { findings, channels: {} };
  // Channels run one after another and each on its own: a failure is recorded and released, and
  // the next channel still runs.
  for (const channel of options.channels) {
    const claimed: Alert[] = [];
    try {
      for (const alert of due) {
        const record = { name: alert.finding.name, kind: alert.finding.kind, daysLeft: alert.finding.daysLeft ?? "", expiresOn: alert.finding.expiresOn?.toISOString() ?? "" };
        if (await ledger.claim(alert.finding.key, alert.alertKey, channel.name, record)) claimed.push(alert);
      }
      if (claimed.length > 0) await channel.deliver(claimed);
      result.channels[channel.name] = { delivered: claimed };
    } catch (error) {
      await Promise.all(claimed.map((a) => ledger.release(a.finding.key, a.alertKey, channel.name)));
      const failure = toMailerError(error);
      logger.log("error", "expiry.channel_failed", { channel: channel.name, alerts: claimed.length, error: failure.toJSON() });
      result.channels[channel.name] = { delivered: [], error: `${failure.code}: ${failure.message}` };
    }
  }
  logger.log("info", "expiry.run", {
    findings: findings.length,
    due: due.length,
    delivered: Object.fromEntries(Object.entries(result.channels).map(([name, r]) => [name, r.error ? `failed: ${r.error}` : r.delivered.length])),
  });
  return result;
}
