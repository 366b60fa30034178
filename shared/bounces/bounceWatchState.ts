// What the bounce watch keeps between passes and between instances, in the `bouncewatch` table of
// the app's storage account (the Storage Table Data Contributor role it has already covers it):
//
//   PartitionKey "lease:<mailbox>",      RowKey "slot-0000"   one pass per mailbox at a time
//   PartitionKey "checkpoint:<mailbox>", RowKey <folder>      the highest UID examined, with UIDVALIDITY
//
// The lease is a one-slot table lease (shared/storage/slotTable.ts claimSlot, as the refresh token's
// redeem lease): taken with a conditional write, renewed while the pass runs, ended when it is over,
// and run out by itself if its holder dies. It keeps two instances (scale-out, a deployment slot,
// `queue-mailer bounces` while the timer runs) from reading and moving the same reports at once;
// exactly once does not rest on it alone, since recording a bounce is idempotent.
//
// The checkpoint is why mail that is not a bounce, a malformed report and a report for a message we
// never sent are each read and logged once although they stay in the folder: the next pass starts
// after the highest UID the last one finished with. IMAP gives every message that arrives (or is
// moved back in) a higher UID, and a new UIDVALIDITY starts over from the first message.
import type { TableClient } from "@azure/data-tables";
import type { StorageConfig } from "../config.js";
import { lazy } from "../lazy.js";
import { claimSlot, instanceId, type SlotRow } from "../storage/slotTable.js";
import { openTable, statusOf, tableKey } from "../storage/storageClients.js";

export const BOUNCE_WATCH_TABLE = "bouncewatch";

export interface Checkpoint {
  uidValidity: string;
  /** Every message up to this UID has been examined. */
  lastUid: number;
}

export interface PassLease {
  /** Ends the lease (awaited, so that the next pass may start at once); idempotent, never throws. */
  release(): Promise<void>;
}

export interface BounceWatchState {
  /**
   * The pass lease of this mailbox, waiting up to `waitMs` while another instance holds it;
   * undefined when it is still held then.
   */
  acquire(waitMs: number): Promise<PassLease | undefined>;
  checkpoint(folder: string): Promise<Checkpoint | undefined>;
  saveCheckpoint(folder: string, checkpoint: Checkpoint): Promise<void>;
}

export interface BounceWatchStateOptions {
  /** How long a lease lasts without renewal (default 60 s); renewed every third of it. */
  leaseMs?: number;
}

interface CheckpointEntity {
  partitionKey: string;
  rowKey: string;
  uidValidity: string;
  lastUid: number;
  at: string;
  holder: string;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** `mailbox`: which mailbox the passes read (IMAP host and user), lower-cased into the keys. */
export function tableBounceWatchState(storage: StorageConfig, mailbox: { host: string; user: string }, options: BounceWatchStateOptions = {}): BounceWatchState {
  const leaseMs = options.leaseMs ?? 60_000;
  const getTable = lazy(() => openTable(storage, BOUNCE_WATCH_TABLE));
  const key = tableKey(`${mailbox.user}@${mailbox.host}`.toLowerCase());
  const leasePartition = `lease:${key}`;
  const checkpointPartition = `checkpoint:${key}`;

  async function tryClaim(table: TableClient): Promise<{ claimed: SlotRow } | { retryAt: number }> {
    const now = Date.now();
    return claimSlot(table, leasePartition, 1, (row) => !row || row.at <= now, (row) => row.at, now + leaseMs);
  }

  function hold(table: TableClient, claimed: SlotRow): PassLease {
    let row = claimed;
    let writes: Promise<unknown> = Promise.resolve();
    // One write after the other, each with the etag the previous one got: a renewal and the end
    // never race. A lost row (the lease ran out and another instance took it) is left alone.
    const write = (at: number) => {
      writes = writes.then(() =>
        table.updateEntity({ ...row, at }, "Replace", { etag: row.etag ?? "*" }).then(
          (response) => (row = { ...row, at, ...(response.etag ? { etag: response.etag } : {}) }),
          () => undefined,
        ),
      );
      return writes;
    };
    const heartbeat = setInterval(() => void write(Date.now() + leaseMs), leaseMs / 3);
    heartbeat.unref();
    let released: Promise<void> | undefined;
    return {
      release() {
        released ??= (async () => {
          clearInterval(heartbeat);
          await write(0);
        })();
        return released;
      },
    };
  }

  return {
    async acquire(waitMs) {
      const table = await getTable();
      const deadline = Date.now() + waitMs;
      for (;;) {
        const result = await tryClaim(table);
        if ("claimed" in result) return hold(table, result.claimed);
        if (Date.now() >= deadline) return undefined;
        await sleep(Math.max(100, Math.min(1_000, result.retryAt - Date.now(), deadline - Date.now())));
      }
    },

    async checkpoint(folder) {
      try {
        const row = await (await getTable()).getEntity<CheckpointEntity>(checkpointPartition, tableKey(folder));
        return { uidValidity: String(row.uidValidity), lastUid: Number(row.lastUid) };
      } catch (error) {
        if (statusOf(error) === 404) return undefined;
        throw error;
      }
    },

    async saveCheckpoint(folder, checkpoint) {
      const entity: CheckpointEntity = { partitionKey: checkpointPartition, rowKey: tableKey(folder), uidValidity: checkpoint.uidValidity, lastUid: checkpoint.lastUid, at: new Date().toISOString(), holder: instanceId };
      await (await getTable()).upsertEntity(entity, "Replace");
    },
  };
}
