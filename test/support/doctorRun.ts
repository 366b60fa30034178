// Running `runDoctor` in a test and asserting on its checklist, shared by the doctor test files.
// Every text a run produced (checklist, JSON report, log lines) is collected in `outputs`, so a
// file can assert at the end that none of them carries a token or secret.
import assert from "node:assert/strict";
import type { Check, DoctorReport, DoctorStep } from "../../shared/doctor/check.js";
import { checklistText, reportJson } from "../../shared/doctor/report.js";
import { runDoctor, type DoctorOptions } from "../../shared/doctor/runDoctor.js";
import { capturingLogger, within, type CapturedLogger } from "./harness.js";

/** Any JWT (access tokens, client assertions): none may appear in any output. */
export const JWT = /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+/;

export interface DoctorRun {
  report: DoctorReport;
  text: string;
  json: string;
  logger: CapturedLogger;
  check(step: DoctorStep): Check;
}

/** A `doctor(env, options)` that records what each run printed and logged in `outputs`. */
export function doctorRunner(outputs: string[]): (env: Record<string, string>, options?: DoctorOptions) => Promise<DoctorRun> {
  return async (env, options = {}) => {
    const logger = capturingLogger();
    const report = await within(runDoctor(env, { logger, ...options }), 60_000, "the doctor to finish");
    const text = checklistText(report);
    const json = reportJson(report);
    outputs.push(text, json, ...logger.lines);
    return {
      report,
      text,
      json,
      logger,
      check(step) {
        const found = report.checks.find((c) => c.step === step);
        assert.ok(found, `no check for step ${step}:\n${text}`);
        return found;
      },
    };
  };
}

/** The step failed with `code`, and every step before it that ran is not failed. */
export function assertFails(run: DoctorRun, step: DoctorStep, code: string): Check {
  const check = run.check(step);
  assert.deepEqual({ step: check.step, status: check.status, code: check.code }, { step, status: "fail", code }, run.text);
  assert.equal(run.report.ok, false);
  const first = run.report.checks.find((c) => c.status === "fail");
  assert.equal(first?.step, step, `the first failing step is ${step}:\n${run.text}`);
  return check;
}
