// `queue-mailer poison list|requeue`: look at `<MAIL_QUEUE>-poison` and put messages back on the
// mail queue once their cause is fixed. Needs only the storage settings. Listing takes nothing away;
// requeue sends the original text first and deletes the poison entry second (see
// shared/queue/poisonQueue.ts).
import { parseArgs } from "node:util";
import { loadStorageConfig, readSettings } from "../shared/config.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { HOST_MOVED_REASON, listPoison, requeuePoison, type PoisonEntry } from "../shared/queue/poisonQueue.js";
import { runSubcommands, UsageError } from "./subcommands.js";

export const poisonUsage = `Usage:
  queue-mailer poison list [--json] [--limit N]
                                      List <MAIL_QUEUE>-poison: queue id, message id, when and why it
                                      failed. Takes nothing off the queue.
  queue-mailer poison requeue (--id ID ... | --all) [--json]
                                      Put entries back on MAIL_QUEUE exactly as they were first
                                      received, then remove them from the poison queue. --id takes a
                                      poison queue id or a message id (repeatable). An original with
                                      line breaks goes back base64-encoded (same text once decoded).
                                      Exits 1 when an --id matched nothing or an entry was left.

Needs only the storage settings (AzureWebJobsStorage or AzureWebJobsStorage__queueServiceUri, MAIL_QUEUE).
`;


const MESSAGE_WIDTH = 100;

function oneLine(text: string, width: number): string {
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > width ? flat.slice(0, width - 1) + "…" : flat;
}

function failedAt(entry: PoisonEntry): string {
  return entry.record?.failedAt ?? entry.insertedOn.toISOString();
}

export function poisonTable(entries: PoisonEntry[]): string {
  const rows = entries.map((e) => [
    e.queueMessageId,
    e.id ?? "-",
    failedAt(e),
    e.record ? String(e.record.attempts) : "-",
    e.record?.reason.code ?? "-",
    oneLine(e.record?.reason.message ?? HOST_MOVED_REASON, MESSAGE_WIDTH),
  ]);
  const header = ["QUEUED ID", "MESSAGE ID", "FAILED AT", "ATTEMPTS", "CODE", "MESSAGE"];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join("  ").trimEnd();
  return [line(header), ...rows.map(line)].join("\n");
}

/** One entry as `poison list --json` prints it. */
export function poisonEntryJson(entry: PoisonEntry): Record<string, unknown> {
  return {
    queueMessageId: entry.queueMessageId,
    id: entry.id ?? null,
    insertedOn: entry.insertedOn.toISOString(),
    failedAt: failedAt(entry),
    attempts: entry.record?.attempts ?? null,
    code: entry.record?.reason.code ?? null,
    message: entry.record?.reason.message ?? HOST_MOVED_REASON,
    ...(entry.record?.reason.response === undefined ? {} : { response: entry.record.reason.response }),
    movedByHost: entry.record === undefined,
    original: entry.record ? entry.record.original : entry.raw,
  };
}

/** parseArgs' own errors (unknown option, missing value) are usage errors: exit 2 with the usage. */
function asUsage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

async function listSubcommand(args: string[]): Promise<number> {
  const { values } = asUsage(() => parseArgs({ args, options: { json: { type: "boolean" }, limit: { type: "string" } }, strict: true }));
  let limit: number | undefined;
  if (values.limit !== undefined) {
    limit = Number(values.limit);
    if (!/^\d+$/.test(values.limit) || limit < 1) throw new UsageError(`--limit must be a whole number ≥ 1, got "${values.limit}"`);
  }
  const storage = loadStorageConfig(readSettings());
  const { poison } = await openMailQueues(storage, { create: false });
  const entries = await listPoison(poison, limit === undefined ? {} : { limit });
  if (values.json) {
    console.log(JSON.stringify({ queue: storage.poisonQueueName, count: entries.length, entries: entries.map(poisonEntryJson) }, null, 2));
  } else if (entries.length === 0) {
    console.log(`${storage.poisonQueueName}: no entries`);
  } else {
    console.log(poisonTable(entries));
    console.log(`\n${entries.length} entr${entries.length === 1 ? "y" : "ies"} in ${storage.poisonQueueName}${limit !== undefined && entries.length === limit ? ` (--limit ${limit}; there may be more)` : ""}.`);
  }
  return 0;
}

async function requeueSubcommand(args: string[]): Promise<number> {
  const { values } = asUsage(() => parseArgs({ args, options: { id: { type: "string", multiple: true }, all: { type: "boolean" }, json: { type: "boolean" } }, strict: true }));
  const ids = values.id ?? [];
  const all = values.all === true;
  if (ids.length === 0 && !all) throw new UsageError("requeue needs --id ID (repeatable) or --all");
  if (ids.length > 0 && all) throw new UsageError("give either --id or --all, not both");
  const storage = loadStorageConfig(readSettings());
  const queues = await openMailQueues(storage, { create: false });
  const result = await requeuePoison(queues, all ? { all } : { ids });
  if (values.json) {
    console.log(JSON.stringify({ queue: storage.queueName, poisonQueue: storage.poisonQueueName, ...result }, null, 2));
  } else {
    for (const e of result.entries) {
      const note = e.encoding === "base64" ? " (base64-encoded: the original has line breaks, which the Storage SDK cannot send as is)" : "";
      console.log(`requeued ${e.queueMessageId}${e.id === undefined ? "" : ` (id ${e.id})`} as ${e.newQueueMessageId} on ${storage.queueName}${note}`);
    }
    console.log(`${result.requeued} requeued, ${result.skipped} left in ${storage.poisonQueueName}.`);
  }
  for (const r of result.refused) {
    process.stderr.write(`queue-mailer poison requeue: left ${r.queueMessageId}${r.id === undefined ? "" : ` (id ${r.id})`} in ${storage.poisonQueueName}: ${r.reason}\n`);
  }
  for (const id of result.notFound) process.stderr.write(`queue-mailer poison requeue: no entry in ${storage.poisonQueueName} matches "${id}"\n`);
  return result.notFound.length > 0 || result.refused.length > 0 ? 1 : 0;
}

export function poisonCommand(args: string[]): Promise<number> {
  return runSubcommands("poison", poisonUsage, { list: listSubcommand, requeue: requeueSubcommand }, args);
}
