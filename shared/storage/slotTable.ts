// Shared limits across instances (the Functions host scales out, so process memory is not
// enough): N rows in one table partition are N slots, and a slot is taken with a conditional write
// (insert, or replace If-Match the version read), so two instances can never take the same slot.
import { randomUUID } from "node:crypto";
import type { TableClient } from "@azure/data-tables";
import { statusOf } from "./storageClients.js";

export interface SlotRow {
  partitionKey: string;
  rowKey: string;
  /** Milliseconds since the epoch; meaning depends on the user (last use, or lease end). */
  at: number;
  holder: string;
  etag?: string;
}

export const instanceId = randomUUID();

/**
 * Try once to take a free slot. Returns the claimed row (with its new etag), or the earliest time
 * (ms) at which a slot frees up when none is free now.
 */
export async function claimSlot(
  table: TableClient,
  partitionKey: string,
  size: number,
  isFree: (row: SlotRow | undefined) => boolean,
  freeAt: (row: SlotRow) => number,
  at: number,
): Promise<{ claimed: SlotRow } | { retryAt: number }> {
  const rows = new Map<string, SlotRow>();
  for await (const row of table.listEntities<SlotRow>({ queryOptions: { filter: `PartitionKey eq '${partitionKey.replace(/'/g, "''")}'` } })) {
    rows.set(row.rowKey, row as SlotRow);
  }
  // Start at a random slot so that instances do not all race for slot 0.
  const offset = Math.floor(Math.random() * size);
  for (let k = 0; k < size; k++) {
    const rowKey = `slot-${String((k + offset) % size).padStart(4, "0")}`;
    const row = rows.get(rowKey);
    if (!isFree(row)) continue;
    const next: SlotRow = { partitionKey, rowKey, at, holder: instanceId };
    try {
      const response = row
        ? await table.updateEntity(next, "Replace", { etag: row.etag ?? "*" })
        : await table.createEntity(next);
      return { claimed: { ...next, ...(response.etag ? { etag: response.etag } : {}) } };
    } catch (error) {
      if (statusOf(error) === 409 || statusOf(error) === 412) continue; // another instance was faster
      throw error;
    }
  }
  const busy = [...rows.values()].map(freeAt);
  return { retryAt: busy.length < size ? Date.now() : Math.min(...busy) };
}

/**
 * Keep a claimed lease row alive until `release()`: renewed every `leaseMs / 3` to end `leaseMs`
 * later, then ended (at 0) on release. The writes run one after another, each with the etag the
 * previous one got, so a renewal and the release never race. A lost row (clock jump, manual edit)
 * is left alone: the lease runs out by itself.
 */
export function holdLease(table: TableClient, claimed: SlotRow, leaseMs: number, heartbeatMs = leaseMs / 3): { release(): Promise<void> } {
  let row = claimed;
  let released = false;
  let writes: Promise<unknown> = Promise.resolve();
  const write = (at: number) => {
    writes = writes.then(() =>
      table.updateEntity({ ...row, at }, "Replace", { etag: row.etag ?? "*" }).then(
        (r) => (row = { ...row, ...(r.etag ? { etag: r.etag } : {}) }),
        () => undefined,
      ),
    );
  };
  const heartbeat = setInterval(() => write(Date.now() + leaseMs), heartbeatMs);
  heartbeat.unref();
  return {
    /** Resolves once the release is written (or failed: the lease then runs out by itself). */
    release() {
      if (!released) {
        released = true;
        clearInterval(heartbeat);
        write(0);
      }
      return writes.then(() => undefined);
    },
  };
}
