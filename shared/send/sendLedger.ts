// Exactly once, as far as SMTP allows: every send is recorded in the `sendledger` table under the
// message id. A redelivered message the ledger shows as sent is acknowledged without sending. A
// send whose outcome is unknown (connection lost after DATA, worker killed) is sent again with
// the same Message-ID, so mail servers and clients can recognise the duplicate.
import { createHash } from "node:crypto";
import type { TableClient } from "@azure/data-tables";
import type { StorageConfig } from "../config.js";
import { openTable, statusOf, tableKey } from "../storage/storageClients.js";

export const SEND_LEDGER_TABLE = "sendledger";

export type LedgerDecision =
  | { state: "go"; attempt: number; previousOutcomeUnknown: boolean }
  | { state: "sent"; messageId: string; sentAt: string }
  /** Another worker started this send within its lease: leave it to them. */
  | { state: "busy" };

export interface SendLedger {
  begin(id: string): Promise<LedgerDecision>;
  complete(id: string, result: { messageId: string; response: string }): Promise<void>;
  /** The send failed; `unknown` when the server may have accepted it anyway. */
  fail(id: string, code: string, unknown: boolean): Promise<void>;
}

interface LedgerEntity {
  partitionKey: string;
  rowKey: string;
  status: "sending" | "sent" | "failed" | "unknown";
  attempts: number;
  startedAt: number;
  messageId?: string;
  response?: string;
  sentAt?: string;
  lastError?: string;
}

const keys = (id: string) => ({ partitionKey: createHash("sha256").update(id).digest("hex").slice(0, 2), rowKey: tableKey(id) });

export function tableSendLedger(storage: StorageConfig, leaseSeconds: number, now: () => number = Date.now): SendLedger {
  let table: Promise<TableClient> | undefined;
  const getTable = () => (table ??= openTable(storage, SEND_LEDGER_TABLE).catch((error: unknown) => {
    table = undefined;
    throw error;
  }));

  return {
    async begin(id) {
      const client = await getTable();
      const { partitionKey, rowKey } = keys(id);
      // Most messages are new: try the insert first (one request), read only on conflict.
      try {
        await client.createEntity<LedgerEntity>({ partitionKey, rowKey, status: "sending", attempts: 1, startedAt: now() });
        return { state: "go", attempt: 1, previousOutcomeUnknown: false };
      } catch (error) {
        if (statusOf(error) !== 409) throw error;
      }
      const existing = (await client.getEntity<LedgerEntity>(partitionKey, rowKey)) as LedgerEntity & { etag: string };
      if (existing.status === "sent") return { state: "sent", messageId: existing.messageId ?? "", sentAt: existing.sentAt ?? "" };
      if (existing.status === "sending" && now() - existing.startedAt < leaseSeconds * 1000) return { state: "busy" };
      try {
        // Conditional on the version we read: of two workers, one wins.
        await client.updateEntity<LedgerEntity>({ ...existing, status: "sending", attempts: existing.attempts + 1, startedAt: now() }, "Replace", { etag: existing.etag });
      } catch (error) {
        if (statusOf(error) === 412 || statusOf(error) === 409) return { state: "busy" };
        throw error;
      }
      // "sending" left behind (a killed worker) or "unknown" (connection lost): the server may
      // have the message already.
      return { state: "go", attempt: existing.attempts + 1, previousOutcomeUnknown: existing.status === "sending" || existing.status === "unknown" };
    },
    async complete(id, result) {
      const client = await getTable();
      await client.updateEntity({ ...keys(id), status: "sent", messageId: result.messageId, response: result.response.slice(0, 1000), sentAt: new Date(now()).toISOString() }, "Merge");
    },
    async fail(id, code, unknown) {
      const client = await getTable();
      await client.updateEntity({ ...keys(id), status: unknown ? "unknown" : "failed", lastError: code }, "Merge").catch(() => undefined);
    },
  };
}
