// What `queue-mailer doctor` reports: one check per step, in the order the sender meets them. The
// JSON form ({ ok, checks: [{ step, status, code, message, fix }] }) is a contract other tools read:
// keep the field names, the step names and the statuses.
import { toMailerError } from "../errors.js";
import { adviceFor, type FixContext } from "./fixes.js";

/** The setup steps, in order; the names are stable (JSON output, `circuit.open` log records). */
export const DOCTOR_STEPS = ["settings", "storage", "keyvault", "credential", "token", "token-contents", "transport", "send-test", "dns-spf", "dns-dkim", "dns-dmarc"] as const;
export type DoctorStep = (typeof DOCTOR_STEPS)[number];

export type CheckStatus = "pass" | "fail" | "warn" | "skip";

export interface Check {
  step: DoctorStep;
  status: CheckStatus;
  /** Our stable error code where one applies (the sender's codes, or the doctor's own). */
  code: string | null;
  /** What was found: for a pass what was proven, otherwise the cause. Never a secret. */
  message: string;
  /** What to do, with the user's own ids filled in where known; null for a pass or a skip. */
  fix: string | null;
}

export interface DoctorReport {
  ok: boolean;
  checks: Check[];
}

export const pass = (step: DoctorStep, message: string): Check => ({ step, status: "pass", code: null, message, fix: null });
export const skip = (step: DoctorStep, message: string): Check => ({ step, status: "skip", code: null, message, fix: null });
export const warn = (step: DoctorStep, code: string, message: string, fix: string): Check => ({ step, status: "warn", code, message, fix });
export const fail = (step: DoctorStep, code: string, message: string, fix: string): Check => ({ step, status: "fail", code, message, fix });

/**
 * A failure thrown by the code the sender runs, as a check of `step`: the code is the error's, the
 * fix comes from the one code → fix table (shared/doctor/fixes.ts) that the circuit breaker's log
 * line uses too, filled in with what the doctor knows.
 */
export function failed(step: DoctorStep, error: unknown, context: FixContext): Check {
  const failure = toMailerError(error);
  const response = failure.response && !failure.message.includes(failure.response) ? ` (server: ${failure.response})` : "";
  return fail(step, failure.code, `${failure.message}${response}`, adviceFor(failure, context).fix);
}
