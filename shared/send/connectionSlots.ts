// Exchange allows 3 concurrent SMTP connections per mailbox; a fourth gets 432 4.3.2. Every
// instance keeps its own pool, so the cap is held in Table storage: a connection may open only
// while it holds one of `size` leased slots. The lease is renewed while the connection lives and
// released when it closes; a crashed instance's slots free themselves when their lease runs out.
import type { StorageConfig } from "../config.js";
import { lazy } from "../lazy.js";
import { claimSlot, holdLease, type SlotRow } from "../storage/slotTable.js";
import { openTable, tableKey } from "../storage/storageClients.js";

export const CONNECTION_TABLE = "smtpconnections";

export interface ConnectionLease {
  /** Resolves once the slot is free for others (the release is written). */
  release(): Promise<void>;
}

export interface ConnectionSlots {
  /** Waits for a free slot; `signal` gives up waiting (rejects with its reason, nothing held). */
  acquire(signal?: AbortSignal): Promise<ConnectionLease>;
}

export function tableConnectionSlots(
  storage: StorageConfig,
  mailbox: string,
  size: number,
  options: { leaseMs?: number; heartbeatMs?: number } = {},
): ConnectionSlots {
  const leaseMs = options.leaseMs ?? 60_000;
  const heartbeatMs = options.heartbeatMs ?? leaseMs / 3;
  const getTable = lazy(() => openTable(storage, CONNECTION_TABLE));
  const partition = tableKey(mailbox.toLowerCase());
  return {
    async acquire(signal) {
      const client = await getTable();
      let slot: SlotRow;
      for (;;) {
        signal?.throwIfAborted();
        const now = Date.now();
        const result = await claimSlot(client, partition, size, (row) => !row || row.at <= now, (row) => row.at, now + leaseMs);
        if ("claimed" in result) {
          slot = result.claimed;
          break;
        }
        // A slot frees when its lease ends or, usually sooner, when its connection closes.
        await new Promise((resolve) => setTimeout(resolve, Math.max(20, Math.min(250, result.retryAt - Date.now())) + Math.random() * 50));
      }
      const lease = holdLease(client, slot, leaseMs, heartbeatMs);
      // Claimed just as the waiter gave up: hand the slot straight back.
      if (signal?.aborted) {
        void lease.release();
        throw signal.reason;
      }
      return lease;
    },
  };
}
