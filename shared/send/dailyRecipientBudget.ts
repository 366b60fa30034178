// Exchange Online allows a mailbox 10,000 recipients in any 24 hours; past that it refuses every
// message from the mailbox for up to a day (550 5.4.5 / "sending quota exceeded"), which is far
// worse than waiting. So recipients are counted across instances, before the send, and a message
// that would go over waits in the queue until the window has room.
//
// Shape: one row per mailbox holding the counts of a sliding 24 h window in 10-minute buckets (at
// most 145 small numbers in one property). Keeping the whole window in ONE row makes a reservation
// a single read and a single If-Match write: two instances can never both take the last room, not
// even across a bucket boundary (counts in separate rows could each be read before the other's
// write). A bucket is counted until its END plus 24 h, so the count errs towards too many by at
// most one bucket for at most 10 minutes, never towards too few.
//
// Cost: within a process, reservations and releases that arrive together share one read and one
// write (the next batch waits for the current one), so a busy worker makes about one read and one
// write per batch, not per message; across instances a conflicting write (412) is re-read and
// retried.
//
// A reservation is made BEFORE the send so that concurrent instances cannot overshoot. It is given
// back (`release`) only when the send certainly did not happen. An unknown outcome (the connection
// dropped after the message was handed over) stays counted: if the server took it, Exchange counted
// it too, and under-counting risks the day-long block above while over-counting costs a few
// recipients of room for one day.
import type { StorageConfig } from "../config.js";
import { MailerError } from "../errors.js";
import { lazy } from "../lazy.js";
import { openTable, statusOf, tableKey } from "../storage/storageClients.js";

export const DAILY_RECIPIENT_TABLE = "dailyrecipients";
const ROW_KEY = "window";
const DAY_MS = 24 * 60 * 60_000;
const BUCKET_MS = 10 * 60_000;
/** Conflicting writers re-read and try again; this many conflicts for one batch means something is wrong. */
const MAX_WRITE_ATTEMPTS = 50;

export type BudgetReservation =
  | { ok: true; release(): Promise<void> }
  /** No room: `retryAfterSeconds` until enough of the oldest counts leave the window. */
  | { ok: false; retryAfterSeconds: number; used: number; freesAt: Date };

export interface DailyRecipientBudget {
  /** Recipients allowed per window; 0 means not counted. */
  readonly limit: number;
  /**
   * Take room for `count` recipients. Throws a permanent DAILY_RECIPIENT_LIMIT_EXCEEDED_BY_MESSAGE
   * when `count` is above the limit: such a message could never go, waiting would only hide it.
   */
  reserve(count: number): Promise<BudgetReservation>;
}

interface BudgetEntity {
  partitionKey: string;
  rowKey: string;
  /** JSON object: bucket start (ms since the epoch) → recipients counted in that bucket. */
  buckets: string;
  etag?: string;
}

type Operation =
  | { kind: "reserve"; count: number; done: (result: { ok: true; bucket: number } | { ok: false; freesAt: number; used: number }) => void; fail: (error: unknown) => void }
  | { kind: "release"; bucket: number; count: number; done: () => void; fail: (error: unknown) => void };

const nothingToRelease = { ok: true as const, release: () => Promise.resolve() };

export const uncounted: DailyRecipientBudget = { limit: 0, reserve: () => Promise.resolve(nothingToRelease) };

export function tableDailyRecipientBudget(
  storage: StorageConfig,
  mailbox: string,
  limit: number,
  options: { now?: () => number; windowMs?: number; bucketMs?: number } = {},
): DailyRecipientBudget {
  if (limit <= 0) return uncounted;
  const now = options.now ?? Date.now;
  const windowMs = options.windowMs ?? DAY_MS;
  const bucketMs = options.bucketMs ?? BUCKET_MS;
  const getTable = lazy(() => openTable(storage, DAILY_RECIPIENT_TABLE));
  const partitionKey = tableKey(mailbox.toLowerCase());

  let pending: Operation[] = [];
  let running = false;

  function submit(operation: Operation): void {
    pending.push(operation);
    if (running) return;
    running = true;
    void (async () => {
      while (pending.length > 0) {
        const batch = pending;
        pending = [];
        await apply(batch).catch((error: unknown) => {
          for (const op of batch) op.fail(error);
        });
      }
      // Same tick as the last emptiness check: a submit after this starts a new loop.
      running = false;
    })();
  }

  async function apply(batch: Operation[]): Promise<void> {
    const client = await getTable();
    // Releases first: the room they give back is usable by the reservations in the same batch.
    const ordered = [...batch.filter((op) => op.kind === "release"), ...batch.filter((op) => op.kind === "reserve")];
    for (let attempt = 1; attempt <= MAX_WRITE_ATTEMPTS; attempt++) {
      let row: BudgetEntity | undefined;
      try {
        row = await client.getEntity<BudgetEntity>(partitionKey, ROW_KEY);
      } catch (error) {
        if (statusOf(error) !== 404) throw error;
      }
      const at = now();
      const buckets = new Map<number, number>();
      for (const [start, count] of Object.entries(JSON.parse(row?.buckets ?? "{}") as Record<string, number>)) {
        // A bucket leaves the window once its last possible send is a window old.
        if (Number(start) + bucketMs + windowMs > at && count > 0) buckets.set(Number(start), count);
      }
      let used = [...buckets.values()].reduce((sum, count) => sum + count, 0);
      const current = Math.floor(at / bucketMs) * bucketMs;
      // Only a change is written; buckets that left the window are dropped with the next one.
      let changed = false;
      const results: Array<() => void> = [];
      for (const op of ordered) {
        if (op.kind === "release") {
          const counted = buckets.get(op.bucket);
          if (counted !== undefined) {
            const given = Math.min(counted, op.count);
            buckets.set(op.bucket, counted - given);
            used -= given;
            changed = true;
          }
          results.push(() => op.done());
        } else if (used + op.count <= limit) {
          buckets.set(current, (buckets.get(current) ?? 0) + op.count);
          used += op.count;
          changed = true;
          results.push(() => op.done({ ok: true, bucket: current }));
        } else {
          const freesAt = whenRoomFor(buckets, used + op.count - limit);
          const usedNow = used;
          results.push(() => op.done({ ok: false, freesAt, used: usedNow }));
        }
      }
      if (changed) {
        const next: BudgetEntity = {
          partitionKey,
          rowKey: ROW_KEY,
          buckets: JSON.stringify(Object.fromEntries([...buckets].filter(([, count]) => count > 0))),
        };
        try {
          if (row) await client.updateEntity(next, "Replace", { etag: row.etag ?? "*" });
          else await client.createEntity(next);
        } catch (error) {
          // Another instance counted in between: read its count and decide again.
          if (statusOf(error) === 409 || statusOf(error) === 412) {
            await new Promise((resolve) => setTimeout(resolve, Math.random() * 20 * Math.min(attempt, 5)));
            continue;
          }
          throw error;
        }
      }
      for (const settle of results) settle();
      return;
    }
    throw new MailerError("DAILY_RECIPIENT_BUDGET_CONTENDED", `could not count recipients for ${mailbox}: ${MAX_WRITE_ATTEMPTS} conflicting writes in a row`, { kind: "transient" });
  }

  /** When the oldest buckets that together free `needed` recipients have left the window. */
  function whenRoomFor(buckets: Map<number, number>, needed: number): number {
    let freed = 0;
    for (const [start, count] of [...buckets].sort(([a], [b]) => a - b)) {
      freed += count;
      if (freed >= needed) return start + bucketMs + windowMs;
    }
    // Unreachable while count <= limit (the room needed is at most what is counted); be safe.
    return now() + windowMs;
  }

  return {
    limit,
    async reserve(count) {
      if (count > limit) {
        throw new MailerError("DAILY_RECIPIENT_LIMIT_EXCEEDED_BY_MESSAGE", `the message has ${count} recipients but the mailbox may send to ${limit} in 24 hours (DAILY_RECIPIENT_LIMIT)`, {
          kind: "permanent",
          hint: "Split the message into several with fewer recipients (To, Cc and Bcc all count), or raise DAILY_RECIPIENT_LIMIT if the mailbox's real limit is higher (Exchange Online: 10,000).",
        });
      }
      const outcome = await new Promise<{ ok: true; bucket: number } | { ok: false; freesAt: number; used: number }>((done, fail) => submit({ kind: "reserve", count, done, fail }));
      if (!outcome.ok) {
        return { ok: false, retryAfterSeconds: Math.max(1, Math.ceil((outcome.freesAt - now()) / 1000)), used: outcome.used, freesAt: new Date(outcome.freesAt) };
      }
      let released = false;
      return {
        ok: true,
        release() {
          if (released) return Promise.resolve();
          released = true;
          return new Promise<void>((done, fail) => submit({ kind: "release", bucket: outcome.bucket, count, done, fail }));
        },
      };
    },
  };
}
