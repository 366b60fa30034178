// An incoming webhook (Teams or Slack): both accept a JSON body with a "text" field, rendered as
// markdown. Independent of the mail path, so it still works when the sending certificate expired.
import { MailerError } from "../../errors.js";
import { alertSummary, daysText, expiresText, sortFindings } from "../report.js";
import type { AlertChannel } from "./channel.js";

export function webhookChannel(url: string, timeoutMs = 10_000): AlertChannel {
  return {
    name: "webhook",
    async deliver(alerts) {
      const findings = sortFindings(alerts.map((a) => a.finding));
      const lines = findings.map((f) => `- **${f.name}** (${f.kind}): ${f.status}, expires ${expiresText(f)}${f.daysLeft === undefined ? "" : `, ${daysText(f)} days left`}. ${f.action}`);
      const text = `**queue-mailer: credentials expiring** — ${alertSummary(findings)}\n\n${lines.join("\n")}`;
      let response: Response;
      try {
        response = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ text }), signal: AbortSignal.timeout(timeoutMs) });
      } catch (error) {
        throw new MailerError("WEBHOOK_UNREACHABLE", `expiry webhook unreachable: ${(error as Error).message}`, { kind: "transient", cause: error });
      }
      if (!response.ok) {
        const body = (await response.text().catch(() => "")).slice(0, 300);
        throw new MailerError("WEBHOOK_REJECTED", `expiry webhook answered ${response.status}`, { kind: "transient", response: `${response.status} ${body}` });
      }
    },
  };
}
