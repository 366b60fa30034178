// Azure Functions timer for the bounce watch. Thin on purpose: all logic is in shared/bounces/.
import { app, type InvocationContext, type Timer } from "@azure/functions";
import { processWideBounceWatch } from "../shared/bounces/bounceWatch.js";
import { bounceSchedule, readSettings } from "../shared/config.js";
import { MailerError } from "../shared/errors.js";
import { invocationLogger } from "./invocationLogger.js";

export async function bounceWatch(_timer: Timer, context: InvocationContext): Promise<void> {
  const logger = invocationLogger(context);
  let watch;
  try {
    watch = processWideBounceWatch(readSettings());
  } catch (error) {
    // Invalid settings: the same `bounces.failed` line as a failed pass, so one alert rule sees both.
    if (error instanceof MailerError) logger.log("error", "bounces.failed", { error: error.toJSON() });
    throw error;
  }
  if (!watch.config.enabled) {
    logger.log("info", "bounces.disabled", { note: "BOUNCES_ENABLED=false" });
    return;
  }
  // A failed pass is logged (`bounces.failed`) and fails the invocation, so it shows among the
  // function's failures too; nothing is lost, the next run reads the same messages.
  await watch.run(logger);
}

// BOUNCES_ENABLED=false: no timer at all, so an app without IMAP access is not woken every five
// minutes for nothing (a settings change restarts the host, which registers again).
if (readSettings()["BOUNCES_ENABLED"]?.trim().toLowerCase() !== "false") {
  app.timer("bounceWatch", {
    // NCRONTAB, UTC; read at registration because the host needs it before the first run.
    schedule: bounceSchedule(readSettings()),
    handler: bounceWatch,
  });
}
