// A server that throttles a mailbox (Graph's 429, or 503/504 with Retry-After) counts per app and
// mailbox, not per connection or per instance: every request any instance makes for that mailbox
// before Retry-After has passed is another throttled request and prolongs the throttle. So the
// pause is one row per mailbox in Table storage that every instance reads before it sends.
//
// The row only ever moves later: `pauseUntil` writes with If-Match on the version it read, so of
// two instances throttled at once the later Retry-After wins and an earlier one never shortens it.
//
// Cost of the read cache: each process keeps what it read for `cacheMs` (1 s by default), so a busy
// worker reads the row about once a second rather than once per message. The price is that a pause
// set by another instance may be missed for up to that long: each other instance may send for up
// to one more second (a few more requests, which the server throttles again and which then wait
// like the first). The instance that was throttled knows at once (it updates its cache).
import type { StorageConfig } from "../config.js";
import { MailerError } from "../errors.js";
import { lazy } from "../lazy.js";
import { instanceId } from "../storage/slotTable.js";
import { openTable, statusOf, tableKey } from "../storage/storageClients.js";

export const MAILBOX_PAUSE_TABLE = "mailboxpause";
const ROW_KEY = "pause";
/** Conflicting writers re-read and try again; this many conflicts in a row means something is wrong. */
const MAX_WRITE_ATTEMPTS = 10;

export interface MailboxPause {
  /** Milliseconds until the mailbox may send again; 0 when it is not paused. */
  pausedForMs(): Promise<number>;
  /**
   * Pause the mailbox until `until` on every instance, unless it is paused longer already.
   * Resolves true when this call moved the pause later. `code` (e.g. GRAPH_THROTTLED) is kept in
   * the row, for people looking at the table.
   */
  pauseUntil(until: Date, code: string): Promise<boolean>;
}

interface PauseEntity {
  partitionKey: string;
  rowKey: string;
  /** Milliseconds since the epoch, on the clock of the instance that was throttled. */
  until: number;
  code: string;
  pausedAt: number;
  holder: string;
  etag?: string;
}

export const notPaused: MailboxPause = { pausedForMs: () => Promise.resolve(0), pauseUntil: () => Promise.resolve(false) };

export function tableMailboxPause(storage: StorageConfig, mailbox: string, options: { cacheMs?: number; now?: () => number } = {}): MailboxPause {
  const cacheMs = options.cacheMs ?? 1_000;
  const now = options.now ?? Date.now;
  const getTable = lazy(() => openTable(storage, MAILBOX_PAUSE_TABLE));
  const partitionKey = tableKey(mailbox.toLowerCase());
  let cached: { until: number; readAt: number } | undefined;
  // What this process was told itself: honoured even if writing it to the table failed.
  let ownUntil = 0;
  // Concurrent sends in this process share one read.
  let reading: Promise<number> | undefined;

  async function readRow(): Promise<PauseEntity | undefined> {
    const client = await getTable();
    try {
      return await client.getEntity<PauseEntity>(partitionKey, ROW_KEY);
    } catch (error) {
      if (statusOf(error) === 404) return undefined;
      throw error;
    }
  }

  return {
    async pausedForMs() {
      if (cached && now() - cached.readAt < cacheMs) return Math.max(0, cached.until - now(), ownUntil - now());
      reading ??= readRow()
        .then((row) => {
          cached = { until: row?.until ?? 0, readAt: now() };
          return cached.until;
        })
        .finally(() => (reading = undefined));
      const until = await reading;
      return Math.max(0, until - now(), ownUntil - now());
    },

    async pauseUntil(until, code) {
      const target = until.getTime();
      ownUntil = Math.max(ownUntil, target);
      const client = await getTable();
      for (let attempt = 1; attempt <= MAX_WRITE_ATTEMPTS; attempt++) {
        const row = await readRow();
        if (row && row.until >= target) {
          cached = { until: row.until, readAt: now() };
          return false;
        }
        const next: PauseEntity = { partitionKey, rowKey: ROW_KEY, until: target, code, pausedAt: now(), holder: instanceId };
        try {
          if (row) await client.updateEntity(next, "Replace", { etag: row.etag ?? "*" });
          else await client.createEntity(next);
          cached = { until: target, readAt: now() };
          return true;
        } catch (error) {
          // Another instance wrote in between: read what it wrote and compare again.
          if (statusOf(error) === 409 || statusOf(error) === 412) continue;
          throw error;
        }
      }
      throw new MailerError("MAILBOX_PAUSE_CONTENDED", `could not record the pause of ${mailbox}: ${MAX_WRITE_ATTEMPTS} conflicting writes in a row`, { kind: "transient" });
    },
  };
}
