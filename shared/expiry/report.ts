// Findings for people: a plain-text table (CLI, email, webhook) and an HTML table (email).
import type { ExpiryFinding } from "./finding.js";

const order: Record<ExpiryFinding["status"], number> = { expired: 0, critical: 1, error: 2, warning: 3, unchecked: 4, ok: 5, disabled: 6, "never-expires": 7 };

export function sortFindings(findings: ExpiryFinding[]): ExpiryFinding[] {
  return [...findings].sort((a, b) => order[a.status] - order[b.status] || (a.daysLeft ?? Infinity) - (b.daysLeft ?? Infinity) || a.name.localeCompare(b.name));
}

export function expiresText(f: ExpiryFinding): string {
  if (f.status === "error" || f.status === "unchecked") return "?";
  return f.expiresOn ? f.expiresOn.toISOString().slice(0, 10) : "never expires";
}

export function daysText(f: ExpiryFinding): string {
  return f.daysLeft === undefined ? "" : String(f.daysLeft);
}

function statusText(f: ExpiryFinding): string {
  return f.status === "error" || f.status === "unchecked" ? `${f.status}: ${f.detail ?? ""}` : f.status;
}

export function findingsTable(findings: ExpiryFinding[]): string {
  const rows = sortFindings(findings).map((f) => [f.name + (f.inUse ? " (in use)" : ""), f.kind, expiresText(f), daysText(f), statusText(f)]);
  const header = ["NAME", "KIND", "EXPIRES", "DAYS LEFT", "STATUS"];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join("  ").trimEnd();
  return [line(header), ...rows.map(line)].join("\n");
}

const escape = (s: string) => s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c] ?? c);

export function findingsHtml(findings: ExpiryFinding[]): string {
  const rows = sortFindings(findings)
    .map((f) => `<tr><td>${escape(f.name)}</td><td>${f.kind}</td><td>${expiresText(f)}</td><td>${daysText(f)}</td><td>${escape(statusText(f))}</td><td>${escape(f.action)}</td></tr>`)
    .join("");
  return `<table border="1" cellpadding="4" cellspacing="0"><tr><th>Name</th><th>Kind</th><th>Expires</th><th>Days left</th><th>Status</th><th>What to do</th></tr>${rows}</table>`;
}

/** "2 expired, 1 expiring soon" and the worst names, for subjects and webhook titles. */
export function alertSummary(findings: ExpiryFinding[]): string {
  const expired = findings.filter((f) => f.status === "expired").length;
  const soon = findings.length - expired;
  const parts = [expired ? `${expired} expired` : "", soon ? `${soon} expiring soon` : ""].filter(Boolean).join(", ");
  const names = sortFindings(findings).slice(0, 3).map((f) => `${f.name} (${f.status === "expired" ? "expired" : `${f.daysLeft} days`})`).join(", ");
  return `${parts}: ${names}${findings.length > 3 ? ", …" : ""}`;
}
