// Azure Functions timer for the expiry watch. Thin on purpose: all logic is in shared/expiry/.
import { app, type InvocationContext, type Timer } from "@azure/functions";
import { expirySchedule, loadExpiryConfig, loadStorageConfig, readSettings } from "../shared/config.js";
import { runConfiguredExpiryWatch } from "../shared/expiry/expiryWatch.js";
import { invocationLogger } from "./invocationLogger.js";

export async function expiryWatch(_timer: Timer, context: InvocationContext): Promise<void> {
  const settings = readSettings();
  await runConfiguredExpiryWatch({ config: loadExpiryConfig(settings), storage: loadStorageConfig(settings), logger: invocationLogger(context) });
}

app.timer("expiryWatch", {
  // NCRONTAB, UTC; read at registration because the host needs it before the first run.
  schedule: expirySchedule(readSettings()),
  handler: expiryWatch,
});
