// `queue-mailer suppression list|add|remove`: the addresses the sender leaves out (the `suppressions`
// table, shared/bounces/suppressionList.ts). Bounces fill it; operators look at it, add an address
// that must not get mail, and remove one that works again. Needs only the storage settings.
import { parseArgs } from "node:util";
import { loadStorageConfig, readSettings } from "../shared/config.js";
import { silentLogger } from "../shared/log.js";
import { normalizeAddress, SUPPRESSIONS_TABLE, tableSuppressionList, type Suppression, type SuppressionList } from "../shared/bounces/suppressionList.js";
import { runSubcommands, UsageError } from "./subcommands.js";

export const suppressionUsage = `Usage:
  queue-mailer suppression list [--json]
                                      Addresses the sender leaves out, with source (bounce or
                                      manual), since when, status and reason.
  queue-mailer suppression add ADDRESS [--reason TEXT]
                                      Stop sending to ADDRESS (a message with no other recipient is
                                      poisoned with RECIPIENT_SUPPRESSED).
  queue-mailer suppression remove ADDRESS
                                      Send to ADDRESS again; its earlier soft bounces stop counting.
                                      Exits 1 when it was not on the list.

Needs only the storage settings (AzureWebJobsStorage, or AzureWebJobsStorage__queueServiceUri and
AzureWebJobsStorage__tableServiceUri with an identity).
`;


const REASON_WIDTH = 80;

function oneLine(text: string, width: number): string {
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > width ? flat.slice(0, width - 1) + "…" : flat;
}

export function suppressionTable(entries: Suppression[]): string {
  const rows = entries.map((e) => [e.address, e.source, e.at, e.status ?? "-", e.id ?? "-", oneLine(e.reason, REASON_WIDTH)]);
  const header = ["ADDRESS", "SOURCE", "SINCE", "STATUS", "MESSAGE ID", "REASON"];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join("  ").trimEnd();
  return [line(header), ...rows.map(line)].join("\n");
}

/** parseArgs' own errors (unknown option, missing value) are usage errors: exit 2 with the usage. */
function asUsage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

function openList(): SuppressionList {
  return tableSuppressionList(loadStorageConfig(readSettings()), silentLogger);
}

function oneAddress(positionals: string[], sub: string): string {
  const [address, ...extra] = positionals;
  if (address === undefined || extra.length > 0) throw new UsageError(`${sub} takes one ADDRESS`);
  if (!/^[^\s@<>]+@[^\s@<>]+$/.test(address.trim().replace(/^<(.*)>$/, "$1"))) throw new UsageError(`"${address}" is not an email address (give the bare address, e.g. ada@example.com)`);
  return address;
}

async function listSubcommand(args: string[]): Promise<number> {
  const { values } = asUsage(() => parseArgs({ args, options: { json: { type: "boolean" } }, strict: true }));
  const entries = await openList().list();
  if (values.json) {
    console.log(JSON.stringify({ table: SUPPRESSIONS_TABLE, count: entries.length, entries }, null, 2));
  } else if (entries.length === 0) {
    console.log("The suppression list is empty: every address gets mail.");
  } else {
    console.log(suppressionTable(entries));
    console.log(`\n${entries.length} suppressed address${entries.length === 1 ? "" : "es"}.`);
  }
  return 0;
}

async function addSubcommand(args: string[]): Promise<number> {
  const { values, positionals } = asUsage(() => parseArgs({ args, options: { reason: { type: "string" } }, allowPositionals: true, strict: true }));
  const address = oneAddress(positionals, "add");
  const entry = await openList().add(address, values.reason?.trim() || "added by hand");
  console.log(`suppressed ${entry.address}: ${entry.reason}`);
  return 0;
}

async function removeSubcommand(args: string[]): Promise<number> {
  const { positionals } = asUsage(() => parseArgs({ args, options: {}, allowPositionals: true, strict: true }));
  const address = oneAddress(positionals, "remove");
  if (await openList().remove(address)) {
    console.log(`removed ${normalizeAddress(address)} from the suppression list: it gets mail again`);
    return 0;
  }
  console.log(`${normalizeAddress(address)} is not on the suppression list`);
  return 1;
}

export function suppressionCommand(args: string[]): Promise<number> {
  return runSubcommands("suppression", suppressionUsage, { list: listSubcommand, add: addSubcommand, remove: removeSubcommand }, args);
}
