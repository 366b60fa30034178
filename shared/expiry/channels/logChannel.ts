// Always on: one structured record per alert, at warning or error level, with the fields an
// Application Insights alert rule can match (event "expiry.alert", status, daysLeft). It does not
// depend on email, so an expired certificate cannot silence it.
import type { Logger } from "../../log.js";
import type { AlertChannel } from "./channel.js";

export function logChannel(logger: Logger): AlertChannel {
  return {
    name: "log",
    async deliver(alerts) {
      for (const { finding, alertKey } of alerts) {
        logger.log(finding.status === "expired" || finding.status === "critical" ? "error" : "warn", "expiry.alert", {
          name: finding.name,
          kind: finding.kind,
          source: finding.source,
          status: finding.status,
          expiresOn: finding.expiresOn?.toISOString(),
          daysLeft: finding.daysLeft,
          inUse: finding.inUse === true,
          alert: alertKey,
          action: finding.action,
        });
      }
    },
  };
}
