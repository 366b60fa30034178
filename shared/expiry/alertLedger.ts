// Which alerts were sent, in Azure Table storage, so that a restart or a second instance neither
// repeats nor loses one. Sending is claimed first with an insert that fails if the row exists
// (so two instances cannot both send), and the claim is released if the channel then fails (so
// the next run tries again).
import type { StorageConfig } from "../config.js";
import { openTable, statusOf, tableKey } from "../storage/storageClients.js";

export const ALERT_TABLE = "expiryalerts";

export interface AlertLedger {
  /** True when this caller may send (first claim); false when it was sent already. */
  claim(itemKey: string, alertKey: string, channel: string, record: Record<string, string | number>): Promise<boolean>;
  release(itemKey: string, alertKey: string, channel: string): Promise<void>;
}

export async function tableAlertLedger(storage: StorageConfig): Promise<AlertLedger> {
  const client = await openTable(storage, ALERT_TABLE);
  return {
    async claim(itemKey, alertKey, channel, record) {
      try {
        await client.createEntity({ partitionKey: tableKey(itemKey), rowKey: tableKey(`${alertKey}|${channel}`), ...record, claimedAt: new Date().toISOString() });
        return true;
      } catch (error) {
        if (statusOf(error) === 409) return false;
        throw error;
      }
    },
    async release(itemKey, alertKey, channel) {
      await client.deleteEntity(tableKey(itemKey), tableKey(`${alertKey}|${channel}`)).catch(() => undefined);
    },
  };
}
