// Exchange counts messages per mailbox per minute (30 for SMTP client submission) and answers
// 432 4.3.2 when it is exceeded. The limit must hold across concurrent invocations and instances,
// so it lives in Table storage: `limit` slots per mailbox, each usable once per window. Taking a
// slot records when it was used; a slot used less than a window ago is not free. So no more than
// `limit` sends can start in any window, on any number of instances.
import type { TableClient } from "@azure/data-tables";
import type { StorageConfig } from "../config.js";
import { claimSlot } from "../storage/slotTable.js";
import { openTable, tableKey } from "../storage/storageClients.js";

export const RATE_TABLE = "sendrate";
/** Instances' clocks differ a little; keep a margin so that skew cannot exceed the cap. */
const CLOCK_MARGIN_MS = 1_000;

export interface RateLimiter {
  acquire(): Promise<void>;
}

export const unlimited: RateLimiter = { acquire: () => Promise.resolve() };

export function tableRateLimiter(
  storage: StorageConfig,
  mailbox: string,
  limit: number,
  options: { windowMs?: number; table?: () => Promise<TableClient> } = {},
): RateLimiter {
  if (limit <= 0) return unlimited;
  const windowMs = (options.windowMs ?? 60_000) + CLOCK_MARGIN_MS;
  let table: Promise<TableClient> | undefined;
  const getTable = options.table ?? (() => (table ??= openTable(storage, RATE_TABLE)));
  const partition = tableKey(mailbox.toLowerCase());
  // Waiters in this process queue up in order instead of all polling the table at once.
  let chain = Promise.resolve();
  return {
    acquire() {
      const turn = chain.then(async () => {
        const client = await getTable();
        for (;;) {
          const now = Date.now();
          const result = await claimSlot(client, partition, limit, (row) => !row || row.at <= now - windowMs, (row) => row.at + windowMs, now);
          if ("claimed" in result) return;
          await new Promise((resolve) => setTimeout(resolve, Math.max(10, result.retryAt - Date.now() + Math.random() * 50)));
        }
      });
      chain = turn.catch(() => undefined);
      return turn;
    },
  };
}
