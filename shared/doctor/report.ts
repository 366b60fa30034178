// The doctor's two outputs: a checklist for people (one line per step, ✓ ✗ ! –, and under each ✗
// or ! the cause and the fix) and JSON for tools ({ ok, checks }). Both pass every text through
// redact(), the last net under the rule that no token, secret, password or key is ever printed.
import { redact } from "../redact.js";
import type { Check, CheckStatus, DoctorReport } from "./check.js";

const SYMBOL: Record<CheckStatus, string> = { pass: "✓", fail: "✗", warn: "!", skip: "–" };
const STEP_WIDTH = 15;

function indented(label: string, text: string): string[] {
  const pad = " ".repeat(4 + label.length);
  return redact(text).split("\n").map((line, i) => (i === 0 ? `    ${label}${line}` : `${pad}${line}`));
}

function checkLines(check: Check): string[] {
  const head = `${SYMBOL[check.status]} ${check.step.padEnd(STEP_WIDTH)} `;
  if (check.status === "pass" || check.status === "skip") return [head + redact(check.message)];
  return [head + (check.code ?? ""), ...indented("cause: ", check.message), ...(check.fix ? indented("fix:   ", check.fix) : [])];
}

export function checklistText(report: DoctorReport, title = "queue-mailer doctor"): string {
  const failed = report.checks.filter((c) => c.status === "fail").length;
  const warned = report.checks.filter((c) => c.status === "warn").length;
  const summary = failed > 0
    ? `${failed} step(s) failed${warned > 0 ? `, ${warned} warning(s)` : ""}: fix the first ✗ first; later steps often follow from it.`
    : warned > 0
      ? `No step failed; ${warned} warning(s).`
      : "Every step passed.";
  return [title, "", ...report.checks.flatMap(checkLines), "", summary].join("\n");
}

export function reportJson(report: DoctorReport): string {
  const checks = report.checks.map((c) => ({ step: c.step, status: c.status, code: c.code, message: redact(c.message), fix: c.fix === null ? null : redact(c.fix) }));
  return JSON.stringify({ ok: report.ok, checks }, null, 2);
}
