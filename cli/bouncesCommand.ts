// `queue-mailer bounces [--json]`: one bounce watch pass now, as the `bounceWatch` timer runs it
// (shared/bounces/bounceWatch.ts), printing what it found and what it suppressed. Waits a while
// for a pass another instance is running (the timer), since an operator asked for this one.
import { parseArgs } from "node:util";
import { createBounceWatch, type BouncePassResult, type ReportOutcome } from "../shared/bounces/bounceWatch.js";
import { loadBounceConfig, readSettings } from "../shared/config.js";
import { ConfigError, MailerError } from "../shared/errors.js";
import { jsonLineLogger, type LogLevel } from "../shared/log.js";
import { UsageError } from "./subcommands.js";

export const bouncesUsage = `Usage:
  queue-mailer bounces [--json] [--log-level debug|info|warn|error]
                                      Read the sending mailbox (IMAP_HOST, BOUNCE_FOLDER) once now:
                                      bounce reports for our messages are recorded on the
                                      suppression list and moved to BOUNCE_DONE_FOLDER; other mail
                                      is left alone. Exits 0 when the pass finished, 1 when it
                                      failed (the error code is printed), 2 for bad arguments or
                                      settings (also BOUNCES_ENABLED=false).
`;

/** How long the command waits for a pass another instance is running. */
const LEASE_WAIT_MS = 60_000;


function recipientsText(report: ReportOutcome): string {
  return report.recipients
    .map((r) => {
      const state = r.newlySuppressed ? "suppressed now" : r.suppressed ? (r.duplicate ? "suppressed (recorded before)" : "already suppressed") : r.softBounces !== undefined ? `soft bounce ${r.softBounces}, not suppressed` : "not suppressed";
      return `${r.address} ${r.status} ${r.kind}${report.outcome === "recorded" ? `: ${state}` : ""}`;
    })
    .join("; ");
}

export function bounceReportText(result: BouncePassResult): string {
  const lines = [`${result.mailbox} at ${result.server}, folder ${result.folder}: ${result.examined} new message${result.examined === 1 ? "" : "s"} examined.`];
  for (const report of result.reports) {
    const which = `UID ${report.uid} ${report.format}`;
    lines.push(
      report.outcome === "recorded"
        ? `  bounce   ${which} for message ${report.id}: ${recipientsText(report)} (moved to ${report.movedTo})`
        : `  unmatched ${which} for ${report.originalMessageId ?? "no Message-ID"}, not a message we sent: ${recipientsText(report)} (nothing recorded, left in ${result.folder})`,
    );
  }
  for (const bad of result.malformed) lines.push(`  malformed UID ${bad.uid}${bad.reportMessageId ? ` ${bad.reportMessageId}` : ""}: ${bad.code}: ${bad.reason} (left in ${result.folder})`);
  if (result.notBounces > 0) lines.push(`  ${result.notBounces} message${result.notBounces === 1 ? " is" : "s are"} not a bounce report (left alone).`);
  lines.push(result.suppressed.length > 0 ? `Suppressed now: ${result.suppressed.join(", ")}.` : "Nobody was added to the suppression list.");
  if (result.more) lines.push("More messages are waiting: run it again (or let the timer do it).");
  return lines.join("\n");
}

export async function bouncesCommand(args: string[]): Promise<number> {
  if (args.includes("--help") || args.includes("-h")) {
    process.stdout.write(bouncesUsage);
    return 0;
  }
  let json = false;
  try {
    let values: { json?: boolean; "log-level"?: string };
    try {
      ({ values } = parseArgs({ args, options: { json: { type: "boolean" }, "log-level": { type: "string" } }, strict: true }));
    } catch (error) {
      throw new UsageError((error as Error).message);
    }
    json = values.json === true;
    const level = values["log-level"] ?? "warn";
    if (!["debug", "info", "warn", "error"].includes(level)) throw new UsageError(`--log-level must be debug, info, warn or error, got "${level}"`);
    const config = loadBounceConfig(readSettings());
    if (!config.enabled) {
      process.stderr.write("queue-mailer bounces: the bounce watch is off (BOUNCES_ENABLED=false); nothing was read.\n");
      return 2;
    }
    // Log lines (bounce.recorded, bounce.unmatched, …) on stderr; the report on stdout.
    const logger = jsonLineLogger((line) => process.stderr.write(line + "\n"), level as LogLevel);
    const result = await createBounceWatch(config).run(logger, { leaseWaitMs: LEASE_WAIT_MS });
    if (result.skipped !== undefined) {
      throw new MailerError("BOUNCES_BUSY", `${result.skipped}, and still after ${LEASE_WAIT_MS / 1000} s`, {
        kind: "transient",
        hint: "Another instance's pass (the bounceWatch timer, or another `queue-mailer bounces`) holds the mailbox's lease (table bouncewatch); try again in a minute. A holder that died lets go within 60 s.",
      });
    }
    console.log(json ? JSON.stringify({ ok: true, ...result }, null, 2) : bounceReportText(result));
    return 0;
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(`queue-mailer bounces: ${error.message}\n\n${bouncesUsage}`);
      return 2;
    }
    const failure = error instanceof MailerError ? error : new MailerError("BOUNCES_UNEXPECTED", (error as Error).message, { kind: "transient" });
    if (json) console.log(JSON.stringify({ ok: false, error: failure.toJSON() }, null, 2));
    process.stderr.write(`queue-mailer bounces: ${failure.code}: ${failure.message}\n${failure.hint ? `hint: ${failure.hint}\n` : ""}`);
    return failure instanceof ConfigError ? 2 : 1;
  }
}
