// The expiry watch as deployed: sources from the settings, the ledger in Table storage, and the
// channels that are configured (log always; email and webhook when set). Shared by the timer
// function and by tests; `queue-mailer expiry` uses collectFindings alone and stores nothing.
import type { ExpiryConfig, StorageConfig } from "../config.js";
import type { Logger } from "../log.js";
import { openMailQueues } from "../queue/mailQueue.js";
import { tableAlertLedger } from "./alertLedger.js";
import type { AlertChannel } from "./channels/channel.js";
import { emailChannel } from "./channels/emailChannel.js";
import { logChannel } from "./channels/logChannel.js";
import { webhookChannel } from "./channels/webhookChannel.js";
import { expirySourcesFor, runExpiryWatch, type ExpiryRunResult } from "./runExpiryWatch.js";

export async function runConfiguredExpiryWatch(options: { config: ExpiryConfig; storage: StorageConfig; logger: Logger; now?: Date }): Promise<ExpiryRunResult> {
  const { config, storage, logger } = options;
  const channels: AlertChannel[] = [logChannel(logger)];
  if (config.webhookUrl) channels.push(webhookChannel(config.webhookUrl));
  if (config.alertTo.length > 0) channels.push(emailChannel((await openMailQueues(storage)).queue, config.alertTo));
  return runExpiryWatch({
    config,
    sources: expirySourcesFor(config),
    channels,
    ledger: await tableAlertLedger(storage),
    logger,
    ...(options.now ? { now: options.now } : {}),
  });
}
