// Exactly once, as far as SMTP allows: every accepted send is recorded in the `sendledger` table
// under the message id. A redelivered message the ledger shows as sent is acknowledged without
// sending. A redelivered message with no record, or whose last attempt lost its connection, may
// have been delivered already (the worker died after DATA, the reply never came): it is sent again
// with the same Message-ID, so mail servers and clients can recognise the duplicate.
//
// Cost: a first delivery reads nothing (nothing can be recorded for a message nobody took before);
// the "sent" records of concurrent sends are written together in one table transaction (group
// commit), so the ledger adds a small fraction of a storage request per message.
import type { TransactionAction } from "@azure/data-tables";
import type { StorageConfig } from "../config.js";
import { lazy } from "../lazy.js";
import { openTable, statusOf, tableKey } from "../storage/storageClients.js";

export const SEND_LEDGER_TABLE = "sendledger";
/** One partition, so that concurrent records can share a transaction (at most 100 actions). */
const PARTITION = "sent";
const MAX_BATCH = 100;
const FLUSH_AFTER_MS = 10;

export type LedgerDecision =
  | { state: "go"; previousOutcomeUnknown: boolean }
  | { state: "sent"; messageId: string; sentAt: string };

export interface SendLedger {
  /** `redelivery`: the queue has handed this message out before (dequeue count above 1). */
  begin(id: string, redelivery: boolean): Promise<LedgerDecision>;
  complete(id: string, result: { messageId: string; response: string }): Promise<void>;
  /** The send failed; `unknown` when the server may have accepted it anyway. */
  fail(id: string, code: string, unknown: boolean): Promise<void>;
}

interface LedgerEntity {
  partitionKey: string;
  rowKey: string;
  status: "sent" | "failed" | "unknown";
  messageId?: string;
  response?: string;
  sentAt?: string;
  lastError?: string;
}

export function tableSendLedger(storage: StorageConfig, now: () => number = Date.now): SendLedger {
  const getTable = lazy(() => openTable(storage, SEND_LEDGER_TABLE));

  // Group commit: records wait up to FLUSH_AFTER_MS for company, then go in one transaction.
  let pending: Array<{ entity: LedgerEntity; done: (error?: unknown) => void }> = [];
  let timer: NodeJS.Timeout | undefined;
  async function flush(): Promise<void> {
    timer = undefined;
    const batch = pending.splice(0, MAX_BATCH);
    if (pending.length > 0) timer = setTimeout(() => void flush(), 0);
    if (batch.length === 0) return;
    // A transaction may not touch the same row twice: keep the last record per row.
    const byRow = new Map(batch.map((item) => [item.entity.rowKey, item.entity]));
    try {
      const client = await getTable();
      const actions: TransactionAction[] = [...byRow.values()].map((entity) => ["upsert", { ...entity }, "Merge"]);
      await client.submitTransaction(actions);
      for (const item of batch) item.done();
    } catch (error) {
      for (const item of batch) item.done(error);
    }
  }
  function write(entity: LedgerEntity): Promise<void> {
    return new Promise((resolve, reject) => {
      pending.push({ entity, done: (error) => (error === undefined ? resolve() : reject(error)) });
      if (pending.length >= MAX_BATCH) void flush();
      else timer ??= setTimeout(() => void flush(), FLUSH_AFTER_MS);
    });
  }

  return {
    async begin(id, redelivery) {
      if (!redelivery) return { state: "go", previousOutcomeUnknown: false };
      const client = await getTable();
      let existing: LedgerEntity | undefined;
      try {
        existing = await client.getEntity<LedgerEntity>(PARTITION, tableKey(id));
      } catch (error) {
        if (statusOf(error) !== 404) throw error;
      }
      if (existing?.status === "sent") return { state: "sent", messageId: existing.messageId ?? "", sentAt: existing.sentAt ?? "" };
      // No record of a message taken before means its last attempt ended without a word (a killed
      // worker); "unknown" means the connection was lost mid-send. Either may have been delivered.
      return { state: "go", previousOutcomeUnknown: existing === undefined || existing.status === "unknown" };
    },
    complete(id, result) {
      return write({ partitionKey: PARTITION, rowKey: tableKey(id), status: "sent", messageId: result.messageId, response: result.response.slice(0, 1000), sentAt: new Date(now()).toISOString() });
    },
    async fail(id, code, unknown) {
      await write({ partitionKey: PARTITION, rowKey: tableKey(id), status: unknown ? "unknown" : "failed", lastError: code }).catch(() => undefined);
    },
  };
}
