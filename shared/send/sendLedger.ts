// Exactly once, as far as SMTP allows: every accepted send is recorded in the `sendledger` table
// under the message id. A redelivered message the ledger shows as sent is acknowledged without
// sending. A redelivered message with no record, or whose last attempt lost its connection, may
// have been delivered already (the worker died after DATA, the reply never came): it is sent again
// with the same Message-ID, so mail servers and clients can recognise the duplicate.
//
// Cost: a first delivery reads nothing (nothing can be recorded for a message nobody took before);
// the "sent" records of concurrent sends are written together in one table transaction (group
// commit), so the ledger adds a small fraction of a storage request per message.
//
// Bounces name our Message-ID, not the id: the Message-ID is a hash of the id (messageIdFor), so it
// cannot be turned back. Each "sent" record therefore has a second row in the same partition and
// the same transaction (no extra request), keyed by the Message-ID's local part and holding the id:
// findSentByMessageId reads it with one point read. Its row key starts with "mid:", which no
// tableKey(id) can (tableKey escapes ':').
import type { TransactionAction } from "@azure/data-tables";
import type { StorageConfig } from "../config.js";
import { lazy } from "../lazy.js";
import { openTable, statusOf, tableKey } from "../storage/storageClients.js";

export const SEND_LEDGER_TABLE = "sendledger";
/** One partition, so that concurrent records can share a transaction (at most 100 actions). */
const PARTITION = "sent";
/** Records per transaction: each may bring its Message-ID row, and a transaction holds 100 actions. */
const MAX_BATCH = 50;
const FLUSH_AFTER_MS = 10;

export type LedgerDecision =
  | { state: "go"; previousOutcomeUnknown: boolean }
  | { state: "sent"; messageId: string; sentAt: string };

export interface SendLedger {
  /** `redelivery`: the queue has handed this message out before (dequeue count above 1). */
  begin(id: string, redelivery: boolean): Promise<LedgerDecision>;
  /** `suppressed`: recipients dropped from this message because they are on the suppression list. */
  complete(id: string, result: { messageId: string; response: string; suppressed?: readonly string[] }): Promise<void>;
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
  /** Recipients left out because they were suppressed, comma-separated. */
  suppressed?: string;
}

/** The Message-ID row: which id a Message-ID was sent for. */
interface MessageIdEntity {
  partitionKey: string;
  rowKey: string;
  id: string;
  messageId: string;
  sentAt: string;
}

/** `<qm.abc@contoso.com>` → `mid:qm.abc`. The domain is left out: servers may change its case. */
function messageIdRowKey(messageId: string): string | undefined {
  const inner = messageId.trim().replace(/^<(.*)>$/, "$1");
  const at = inner.lastIndexOf("@");
  const local = at > 0 ? inner.slice(0, at) : inner;
  return local === "" ? undefined : `mid:${tableKey(local)}`;
}

export function tableSendLedger(storage: StorageConfig, now: () => number = Date.now): SendLedger {
  const getTable = lazy(() => openTable(storage, SEND_LEDGER_TABLE));

  // Group commit: records wait up to FLUSH_AFTER_MS for company, then go in one transaction.
  let pending: Array<{ entity: LedgerEntity; index?: MessageIdEntity; done: (error?: unknown) => void }> = [];
  let timer: NodeJS.Timeout | undefined;
  async function flush(): Promise<void> {
    timer = undefined;
    const batch = pending.splice(0, MAX_BATCH);
    if (pending.length > 0) timer = setTimeout(() => void flush(), 0);
    if (batch.length === 0) return;
    // A transaction may not touch the same row twice: keep the last record per row.
    const byRow = new Map<string, LedgerEntity | MessageIdEntity>();
    for (const item of batch) {
      byRow.set(item.entity.rowKey, item.entity);
      if (item.index) byRow.set(item.index.rowKey, item.index);
    }
    try {
      const client = await getTable();
      const actions: TransactionAction[] = [...byRow.values()].map((entity) => ["upsert", { ...entity }, "Merge"]);
      await client.submitTransaction(actions);
      for (const item of batch) item.done();
    } catch (error) {
      for (const item of batch) item.done(error);
    }
  }
  function write(entity: LedgerEntity, index?: MessageIdEntity): Promise<void> {
    return new Promise((resolve, reject) => {
      pending.push({ entity, ...(index === undefined ? {} : { index }), done: (error) => (error === undefined ? resolve() : reject(error)) });
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
      const sentAt = new Date(now()).toISOString();
      const suppressed = result.suppressed !== undefined && result.suppressed.length > 0 ? { suppressed: result.suppressed.join(", ").slice(0, 30_000) } : {};
      const indexKey = messageIdRowKey(result.messageId);
      const index = indexKey === undefined ? undefined : { partitionKey: PARTITION, rowKey: indexKey, id, messageId: result.messageId, sentAt };
      return write({ partitionKey: PARTITION, rowKey: tableKey(id), status: "sent", messageId: result.messageId, response: result.response.slice(0, 1000), sentAt, ...suppressed }, index);
    },
    async fail(id, code, unknown) {
      await write({ partitionKey: PARTITION, rowKey: tableKey(id), status: unknown ? "unknown" : "failed", lastError: code }).catch(() => undefined);
    },
  };
}

/**
 * Which of our sends a Message-ID belongs to (a bounce names the original's Message-ID): one point
 * read. Undefined when the ledger has no such send: not ours, sent before this index existed, or
 * sent with SEND_LEDGER=false.
 */
export function sentMessageIndex(storage: StorageConfig): { find(messageId: string): Promise<{ id: string; messageId: string; sentAt: string } | undefined> } {
  const getTable = lazy(() => openTable(storage, SEND_LEDGER_TABLE));
  return {
    async find(messageId) {
      const rowKey = messageIdRowKey(messageId);
      if (rowKey === undefined) return undefined;
      try {
        const row = await (await getTable()).getEntity<MessageIdEntity>(PARTITION, rowKey);
        return { id: row.id, messageId: row.messageId, sentAt: row.sentAt };
      } catch (error) {
        if (statusOf(error) === 404) return undefined;
        throw error;
      }
    },
  };
}
