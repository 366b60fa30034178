// Exchange counts messages per mailbox per minute (30 for SMTP client submission) and answers
// 432 4.3.2 when it is exceeded. The limit must hold across concurrent invocations and instances,
// so it lives in Table storage: `limit` slots per mailbox, each usable once per window. A slot is
// held while its send is in progress and then stamped with the time the send *finished*; it is
// free again a window after that. The server sees a send arrive before it finishes, so no more
// than `limit` sends can arrive in any window, however long they queue for a connection and on
// any number of instances.
import type { StorageConfig } from "../config.js";
import { lazy } from "../lazy.js";
import { claimSlot } from "../storage/slotTable.js";
import { openTable, tableKey } from "../storage/storageClients.js";

export const RATE_TABLE = "sendrate";
/**
 * Instances' clocks differ a little and a claim takes a moment before the send starts: the window
 * is stretched by 1/60 (one second a minute) so that neither can push a window over the cap.
 */
const MARGIN = 1 / 60;

export interface RatePermit {
  /** The send is over (accepted or not): the slot's window starts now. */
  release(): void;
}

export interface RateLimiter {
  acquire(): Promise<RatePermit>;
}

/** A held slot that is never released (a crashed instance) frees itself after this long. */
const HOLD_MS = 5 * 60_000;
const noPermit: RatePermit = { release() {} };

export const unlimited: RateLimiter = { acquire: () => Promise.resolve(noPermit) };

export function tableRateLimiter(
  storage: StorageConfig,
  mailbox: string,
  limit: number,
  options: { windowMs?: number } = {},
): RateLimiter {
  if (limit <= 0) return unlimited;
  const windowMs = Math.ceil((options.windowMs ?? 60_000) * (1 + MARGIN));
  const getTable = lazy(() => openTable(storage, RATE_TABLE));
  const partition = tableKey(mailbox.toLowerCase());
  // Waiters in this process queue up in order instead of all polling the table at once.
  let chain = Promise.resolve();
  return {
    acquire() {
      const turn = chain.then(async (): Promise<RatePermit> => {
        const client = await getTable();
        for (;;) {
          const now = Date.now();
          // While held, `at` is the far end of the hold, so the slot is not free.
          const result = await claimSlot(client, partition, limit, (row) => !row || row.at <= now - windowMs, (row) => row.at + windowMs, now + HOLD_MS);
          if ("claimed" in result) {
            const slot = result.claimed;
            return {
              release() {
                void client.updateEntity({ ...slot, at: Date.now() }, "Replace", { etag: slot.etag ?? "*" }).catch(() => undefined);
              },
            };
          }
          await new Promise((resolve) => setTimeout(resolve, Math.max(10, Math.min(1_000, result.retryAt - Date.now()) + Math.random() * 50)));
        }
      });
      chain = turn.then(() => undefined, () => undefined);
      return turn;
    },
  };
}
