// The poison queue (`<MAIL_QUEUE>-poison`) for people: list what is in it, and put messages back on
// the mail queue once their cause is fixed (`queue-mailer poison list|requeue`).
//
// Two kinds of entries live there:
//   - ours: a PoisonRecord (JSON, base64 on the queue; see writePoisonRecord) whose `original` is the
//     queue text exactly as it was received;
//   - the host's: when the Functions host gives up on a message without our handler having poisoned
//     it (e.g. the handler crashed on every attempt), it moves the message text itself, with no reason.
//
// Reading must not take anything away. Peek is free of side effects but sees at most the first 32
// visible entries, so:
//   - up to 32 entries (or a limit ≤ 32): peekMessages, nothing else;
//   - more: receive in batches of 32 with a short visibility timeout (so each batch hides what was
//     seen and the next receive returns the next ones), then make every received entry visible
//     again at once (updateMessage with visibilityTimeout 0, content left as it is). Should the
//     process die before that, the entries reappear by themselves after LIST_VISIBILITY_SECONDS.
//     The price: while a listing runs, those entries are briefly invisible to other readers, and
//     each listing adds 1 to every entry's dequeue count (nothing consumes the poison queue, so
//     nothing keys on that count).
// Requeueing always receives (it needs pop receipts to delete, and receiving hides an entry from a
// concurrent requeue, so two operators cannot requeue the same entry twice). For each selected
// entry it sends first and deletes second: if the delete fails the message is on the mail queue and
// still in the poison queue (a duplicate, recognisable by its id), never lost.
//
// Line breaks: @azure/storage-queue cannot send a text with LF or CR unchanged (its XML serializer,
// @azure/core-xml stringifyXML, deletes every "\n" of the request body, message text included, and a
// CR does not survive XML end-of-line handling). Such an original (pretty-printed raw JSON from
// Storage Explorer or `az storage message put`) is requeued base64-encoded instead, which the handler
// decodes back to exactly the original text; an original the handler would not decode back exactly
// (not a JSON object) is left in the poison queue and reported, never sent altered.
import type { DequeuedMessageItem, PeekedMessageItem, QueueClient } from "@azure/storage-queue";
import { MailerError } from "../errors.js";
import { decodeQueueText } from "./decode.js";
import { encodeQueueText, type MailQueues } from "./mailQueue.js";
import type { PoisonRecord } from "./outcome.js";

/** How the reason of an entry the Functions host moved itself is shown. */
export const HOST_MOVED_REASON = "(no reason: moved by the host)";

/** Seconds a listed entry stays hidden at most (when the listing dies before restoring it). */
export const LIST_VISIBILITY_SECONDS = 30;
/** Seconds an entry looked at by requeue stays hidden at most. */
export const REQUEUE_VISIBILITY_SECONDS = 60;

const PEEK_MAX = 32;
const RESTORE_CONCURRENCY = 16;

export interface PoisonEntry {
  /** The poison queue's id for the entry (not the id the message had on the mail queue). */
  queueMessageId: string;
  /** When the entry was put on the poison queue. */
  insertedOn: Date;
  /** Our record; undefined for an entry the Functions host moved there itself. */
  record: PoisonRecord | undefined;
  /** The entry's text as it is on the poison queue. */
  raw: string;
  /** The message's `id` field, when the original text is JSON (raw or base64) and has one. */
  id?: string;
}

export interface RequeuedEntry {
  /** The poison entry's id (now deleted). */
  queueMessageId: string;
  /** The message's `id` field, when it has one. */
  id?: string;
  /** The id the message got on the mail queue. */
  newQueueMessageId: string;
  /** "as-is": the original text unchanged; "base64": the original base64-encoded (it has line breaks, see above). */
  encoding: "as-is" | "base64";
}

export interface RefusedEntry {
  queueMessageId: string;
  id?: string;
  reason: string;
}

export interface RequeueResult {
  /** Entries put back on the mail queue and removed from the poison queue. */
  requeued: number;
  /** Entries looked at and left in the poison queue: not selected, or selected but refused. */
  skipped: number;
  /** What was requeued, in order. */
  entries: RequeuedEntry[];
  /** Selected entries left in the poison queue because they cannot be requeued unchanged. */
  refused: RefusedEntry[];
  /** Requested ids that matched no entry. */
  notFound: string[];
}

/** The text requeue puts back: the original exactly as received, or for an entry the host moved, its own text. */
export function requeueText(entry: PoisonEntry): string {
  return entry.record ? entry.record.original : entry.raw;
}

const lineBreak = /[\r\n]/;

/**
 * What requeue sends for an entry: its text as is; base64-encoded when it has line breaks (which
 * the Storage SDK cannot send) and the handler decodes that back to exactly the same text; else
 * nothing (refused, with the reason).
 */
export function requeuePayload(entry: PoisonEntry): { text: string; encoding: "as-is" | "base64" } | { refused: string } {
  const text = requeueText(entry);
  if (!lineBreak.test(text)) return { text, encoding: "as-is" };
  const encoded = encodeQueueText(text);
  if (decodeQueueText(encoded) === text) return { text: encoded, encoding: "base64" };
  return { refused: "the text has line breaks, which the Storage SDK cannot send unchanged, and it is not a JSON object the handler would decode from base64" };
}

/** The reason as one line for people: "CODE: message", or HOST_MOVED_REASON. */
export function reasonText(entry: PoisonEntry): string {
  return entry.record ? `${entry.record.reason.code}: ${entry.record.reason.message}` : HOST_MOVED_REASON;
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(decodeQueueText(text)) as unknown;
  } catch {
    return undefined;
  }
}

function isPoisonRecord(value: unknown): value is PoisonRecord {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return false;
  const v = value as Record<string, unknown>;
  const reason = v["reason"] as Record<string, unknown> | null | undefined;
  return (
    typeof reason === "object" && reason !== null &&
    typeof reason["code"] === "string" && typeof reason["message"] === "string" &&
    (reason["response"] === undefined || typeof reason["response"] === "string") &&
    typeof v["attempts"] === "number" &&
    typeof v["failedAt"] === "string" &&
    typeof v["original"] === "string"
  );
}

function messageIdField(text: string): string | undefined {
  const parsed = parseJson(text);
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) return undefined;
  const id = (parsed as Record<string, unknown>)["id"];
  return typeof id === "string" ? id : undefined;
}

/** Reads one poison queue item; never throws for its content. */
export function poisonEntryOf(item: Pick<PeekedMessageItem, "messageId" | "insertedOn" | "messageText">): PoisonEntry {
  const parsed = parseJson(item.messageText);
  const record = isPoisonRecord(parsed) ? parsed : undefined;
  const id = messageIdField(record ? record.original : item.messageText);
  return {
    queueMessageId: item.messageId,
    insertedOn: item.insertedOn,
    record,
    raw: item.messageText,
    ...(id === undefined ? {} : { id }),
  };
}

function isQueueNotFound(error: unknown): boolean {
  const e = error as { statusCode?: number; code?: string } | null;
  return e?.statusCode === 404 && e.code === "QueueNotFound";
}

/** Make received entries visible again; an entry whose receipt went stale comes back by itself. */
async function restoreVisibility(queue: QueueClient, items: Iterable<DequeuedMessageItem>): Promise<void> {
  const pending = [...items];
  const workers = Array.from({ length: Math.min(RESTORE_CONCURRENCY, pending.length) }, async () => {
    for (let item = pending.shift(); item; item = pending.shift()) {
      // No message text: the content stays exactly as it is.
      await queue.updateMessage(item.messageId, item.popReceipt, undefined, 0).catch(() => undefined);
    }
  });
  await Promise.all(workers);
}

/**
 * Receives every visible entry in batches, calling `visit` for each new one; entries still held
 * when it returns (or throws) are made visible again. `visit` returns true when it took the entry
 * (deleted it), false to leave it.
 */
async function scan(
  queue: QueueClient,
  visibilityTimeout: number,
  visit: (item: DequeuedMessageItem) => Promise<boolean>,
  limit = Infinity,
): Promise<void> {
  const held = new Map<string, DequeuedMessageItem>();
  const seen = new Set<string>();
  try {
    while (seen.size < limit) {
      const { receivedMessageItems } = await queue.receiveMessages({ numberOfMessages: Math.min(PEEK_MAX, limit - seen.size), visibilityTimeout });
      if (receivedMessageItems.length === 0) break;
      let fresh = 0;
      for (const item of receivedMessageItems) {
        if (seen.has(item.messageId)) {
          // Its visibility ran out while we went on: keep the newest receipt, do not visit it twice.
          if (held.has(item.messageId)) held.set(item.messageId, item);
          continue;
        }
        seen.add(item.messageId);
        fresh += 1;
        held.set(item.messageId, item);
        if (await visit(item)) held.delete(item.messageId);
      }
      // Only entries seen before came back: we have gone all the way round.
      if (fresh === 0) break;
    }
  } finally {
    await restoreVisibility(queue, held.values());
  }
}

/** The entries of the poison queue, oldest first, without taking any away. A missing queue is empty. */
export async function listPoison(poison: QueueClient, { limit }: { limit?: number } = {}): Promise<PoisonEntry[]> {
  const max = limit ?? Infinity;
  if (max <= 0) return [];
  try {
    const { peekedMessageItems } = await poison.peekMessages({ numberOfMessages: Math.min(PEEK_MAX, max) });
    if (peekedMessageItems.length < PEEK_MAX || max <= PEEK_MAX) return sortEntries(peekedMessageItems.map(poisonEntryOf));
    const entries: PoisonEntry[] = [];
    await scan(poison, LIST_VISIBILITY_SECONDS, async (item) => {
      entries.push(poisonEntryOf(item));
      return false;
    }, max);
    return sortEntries(entries);
  } catch (error) {
    if (isQueueNotFound(error)) return [];
    throw error;
  }
}

function sortEntries(entries: PoisonEntry[]): PoisonEntry[] {
  return entries.sort((a, b) => a.insertedOn.getTime() - b.insertedOn.getTime());
}

/**
 * Puts poison entries back on the mail queue and removes them from the poison queue. `ids` match
 * an entry's poison queue id or the message's `id` field (every entry with that id); `all` takes
 * every entry. The mail queue gets `record.original` unchanged (raw JSON stays raw, base64 stays
 * base64); an entry the host moved is requeued as its own text. A text with line breaks goes back
 * base64-encoded, or is refused (see requeuePayload). Entries not taken are visible again on return.
 */
export async function requeuePoison(queues: MailQueues, { ids, all }: { ids?: string[]; all?: boolean }): Promise<RequeueResult> {
  const wanted = new Set(ids ?? []);
  if (!all && wanted.size === 0) {
    throw new MailerError("POISON_NOTHING_SELECTED", "requeue needs ids or all", { kind: "config", hint: "Pass --id (poison queue id or message id, repeatable) or --all." });
  }
  const matched = new Set<string>();
  const result: RequeueResult = { requeued: 0, skipped: 0, entries: [], refused: [], notFound: [] };
  try {
    await scan(queues.poison, REQUEUE_VISIBILITY_SECONDS, async (item) => {
      const entry = poisonEntryOf(item);
      const keys = [entry.queueMessageId, entry.id].filter((k): k is string => k !== undefined && wanted.has(k));
      if (!all && keys.length === 0) {
        result.skipped += 1;
        return false;
      }
      for (const key of keys) matched.add(key);
      const payload = requeuePayload(entry);
      if ("refused" in payload) {
        result.skipped += 1;
        result.refused.push({ queueMessageId: entry.queueMessageId, ...(entry.id === undefined ? {} : { id: entry.id }), reason: payload.refused });
        return false;
      }
      // Send first, delete second: a failure in between leaves a duplicate, never a loss.
      let sent: { messageId: string };
      try {
        sent = await queues.queue.sendMessage(payload.text);
      } catch (error) {
        // The entry is still held, and is made visible again: nothing was lost.
        throw new MailerError(
          "POISON_REQUEUE_FAILED",
          `could not put poison entry ${entry.queueMessageId} back on ${queues.queue.name}: ${(error as Error).message}`,
          { kind: "transient", hint: "The entry is still in the poison queue; fix the cause and requeue again.", cause: error },
        );
      }
      try {
        await queues.poison.deleteMessage(item.messageId, item.popReceipt);
      } catch (error) {
        throw new MailerError(
          "POISON_DELETE_FAILED",
          `poison entry ${entry.queueMessageId} was requeued as ${sent.messageId} but could not be removed from ${queues.poison.name}: ${(error as Error).message}`,
          { kind: "transient", hint: `Delete the poison entry ${entry.queueMessageId} before requeueing again, or the message is sent twice.`, cause: error },
        );
      }
      result.requeued += 1;
      result.entries.push({ queueMessageId: entry.queueMessageId, ...(entry.id === undefined ? {} : { id: entry.id }), newQueueMessageId: sent.messageId, encoding: payload.encoding });
      return true;
    });
  } catch (error) {
    if (!isQueueNotFound(error)) throw error;
  }
  result.notFound = [...wanted].filter((id) => !matched.has(id));
  return result;
}
