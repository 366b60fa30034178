// An email to EXPIRY_ALERT_TO, enqueued on the mail queue like any message (so it gets the same
// validation, retries and ledger). One email per run, listing every due alert.
import type { QueueClient } from "@azure/storage-queue";
import { enqueueEmail } from "../../enqueueEmail.js";
import { alertSummary, findingsHtml, findingsTable } from "../report.js";
import type { AlertChannel } from "./channel.js";

export function emailChannel(queue: QueueClient, to: string[]): AlertChannel {
  return {
    name: "email",
    async deliver(alerts) {
      const findings = alerts.map((a) => a.finding);
      const actions = [...new Set(findings.map((f) => `- ${f.name}: ${f.action}`))].join("\n");
      await enqueueEmail(queue, {
        to,
        subject: `[queue-mailer] Credentials expiring: ${alertSummary(findings)}`.slice(0, 900),
        text: `These credentials are expired or expire soon. When one that the sender uses expires, email stops.\n\n${findingsTable(findings)}\n\nWhat to do:\n${actions}\n`,
        html: `<p>These credentials are expired or expire soon. When one that the sender uses expires, email stops.</p>${findingsHtml(findings)}`,
      });
    },
  };
}
