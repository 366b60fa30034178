// `queue-mailer doctor [--json] [--send-test ADDRESS] [--dns]`: the setup checklist (see
// shared/doctor/runDoctor.ts). Exit 0 when no step failed, 1 when one did, 2 for unusable arguments.
import { parseArgs } from "node:util";
import { readSettings, type Env } from "../shared/config.js";
import { ConfigError } from "../shared/errors.js";
import { fail, skip, DOCTOR_STEPS, type DoctorReport } from "../shared/doctor/check.js";
import { checklistText, reportJson } from "../shared/doctor/report.js";
import { runDoctor } from "../shared/doctor/runDoctor.js";
import { parseMailbox } from "../shared/message/address.js";

export const doctorUsage = "queue-mailer doctor [--json] [--send-test ADDRESS] [--dns]";

export async function doctorCommand(args: string[], settings: () => Env = () => readSettings()): Promise<number> {
  let values: { json?: boolean; "send-test"?: string; dns?: boolean };
  try {
    ({ values } = parseArgs({ args, options: { json: { type: "boolean" }, "send-test": { type: "string" }, dns: { type: "boolean" } }, strict: true, allowPositionals: false }));
  } catch (error) {
    process.stderr.write(`queue-mailer doctor: ${(error as Error).message}\nUsage: ${doctorUsage}\n`);
    return 2;
  }
  const sendTest = values["send-test"];
  if (sendTest !== undefined && !parseMailbox(sendTest).ok) {
    process.stderr.write(`queue-mailer doctor: --send-test needs one email address, got "${sendTest}"\nUsage: ${doctorUsage}\n`);
    return 2;
  }
  let report: DoctorReport;
  try {
    report = await runDoctor(settings(), { ...(sendTest === undefined ? {} : { sendTest }), dns: values.dns === true });
  } catch (error) {
    // Only an unreadable local.settings.json gets here: every other setting is a check.
    if (!(error instanceof ConfigError)) throw error;
    const steps = DOCTOR_STEPS.filter((s) => !s.startsWith("dns-") || values.dns === true).slice(1);
    report = { ok: false, checks: [fail("settings", error.code, error.message, "Fix or remove local.settings.json."), ...steps.map((step) => skip(step, "not checked: the settings cannot be read (step settings)"))] };
  }
  process.stdout.write(`${values.json ? reportJson(report) : checklistText(report)}\n`);
  return report.ok ? 0 : 1;
}
