// Delivery status: every outcome of a message (sent, duplicate, retry, poisoned, waiting) becomes one
// event, stored in the `deliveryevents` table under the message id (what `queue-mailer status ID`
// reads) and, when EVENTS_QUEUE is set, put on that queue as JSON for producers to consume.
//
// Written from one place only (Mailer.process, where every outcome passes) and never in the way of
// a send: a write is started, not awaited; a failed write is logged as a lost event. `settled()`
// lets a closing process wait for what is in flight.
import { randomBytes } from "node:crypto";
import type { QueueClient } from "@azure/storage-queue";
import type { TableClient } from "@azure/data-tables";
import type { StorageConfig } from "../config.js";
import { lazy } from "../lazy.js";
import type { Logger } from "../log.js";
import { encodeQueueText, openMailQueues } from "../queue/mailQueue.js";
import type { QueueMessageMeta } from "../queue/handleQueueMessage.js";
import type { Outcome } from "../queue/outcome.js";
import { openTable, tableKey } from "../storage/storageClients.js";

export const DELIVERY_EVENTS_TABLE = "deliveryevents";

export type DeliveryEventType = "sent" | "duplicate" | "retry" | "poisoned" | "scheduled" | "deferred" | "bounced";

/** One event, as stored and as put on EVENTS_QUEUE (`type` and `version` let consumers route it). */
export interface DeliveryEvent {
  type: "queue-mailer.delivery";
  version: 1;
  /** The message's id (idempotency key). */
  id: string;
  event: DeliveryEventType;
  /** When the outcome was reached (ISO 8601, UTC). */
  at: string;
  /** The queue's dequeue count of this attempt (0 for a bounce: it came from the mailbox, not the queue). */
  attempt: number;
  queueMessageId: string;
  /** sent, duplicate: the Message-ID header. */
  messageId?: string;
  /** sent: the server's reply. */
  response?: string;
  /** sent: recipients left out because they are on the suppression list (the others got it); bounced: the recipient, when this bounce put it there. */
  suppressed?: string[];
  /** bounced: the recipient the report names (`code` its status, e.g. 5.1.1; `reason` the diagnostic). */
  recipient?: string;
  /** retry, poisoned, scheduled, deferred, bounced: why. */
  code?: string;
  reason?: string;
  /** retry, scheduled, deferred: seconds until the message is visible again. */
  afterSeconds?: number;
}

export function deliveryEventOf(outcome: Outcome, meta: QueueMessageMeta, now = new Date()): DeliveryEvent {
  const base = { type: "queue-mailer.delivery", version: 1, id: outcome.id, at: now.toISOString(), attempt: meta.dequeueCount, queueMessageId: meta.queueMessageId } as const;
  switch (outcome.status) {
    case "sent":
      return { ...base, event: outcome.duplicate ? "duplicate" : "sent", messageId: outcome.messageId, response: outcome.response.slice(0, 1000), ...(outcome.suppressed === undefined ? {} : { suppressed: outcome.suppressed }) };
    case "retry":
      return { ...base, event: "retry", code: outcome.error.code, reason: outcome.error.message.slice(0, 1000), afterSeconds: outcome.afterSeconds };
    case "poison":
      return { ...base, event: "poisoned", code: outcome.error.code, reason: outcome.error.message.slice(0, 1000) };
    case "wait":
      return { ...base, event: outcome.error.code === "MESSAGE_NOT_DUE" ? "scheduled" : "deferred", code: outcome.error.code, reason: outcome.error.message.slice(0, 1000), afterSeconds: outcome.afterSeconds };
  }
}

export interface DeliveryEventRecorder {
  /** Starts the writes and returns at once; never throws. */
  record(event: DeliveryEvent): void;
  /** Resolves once every write started so far has finished (or failed and been logged). */
  settled(): Promise<void>;
}

// Row keys sort by time within a message's partition; the counter and random tail keep two events
// of the same millisecond (one process, or two instances) apart.
let sequence = 0;
function rowKeyFor(at: string): string {
  sequence = (sequence + 1) % 1_000_000;
  return `${at}-${String(sequence).padStart(6, "0")}-${randomBytes(4).toString("hex")}`;
}

export function deliveryEventRecorder(storage: StorageConfig, logger: Logger): DeliveryEventRecorder {
  const table = lazy<TableClient>(() => openTable(storage, DELIVERY_EVENTS_TABLE));
  const eventsQueueName = storage.eventsQueueName;
  // The events queue lives in the mail queue's storage account.
  const queue = lazy<QueueClient>(() => createEventsQueue(storage, eventsQueueName ?? ""));
  const inflight = new Set<Promise<void>>();

  function track(what: "table" | "queue", event: DeliveryEvent, write: () => Promise<unknown>): void {
    const task = write()
      .then(() => undefined, (error: unknown) => {
        logger.log("warn", "events.write_failed", { id: event.id, outcome: event.event, target: what, error: (error as Error).message?.split("\n")[0], note: "the delivery event is lost; the send is not affected" });
      })
      .finally(() => inflight.delete(task));
    inflight.add(task);
  }

  return {
    record(event) {
      // A table property cannot hold a list: `suppressed` is stored as JSON text.
      const row = { partitionKey: tableKey(event.id), rowKey: rowKeyFor(event.at), ...event, ...(event.suppressed === undefined ? {} : { suppressed: JSON.stringify(event.suppressed) }) };
      track("table", event, async () => (await table()).createEntity(row));
      if (eventsQueueName !== undefined) track("queue", event, async () => (await queue()).sendMessage(encodeQueueText(JSON.stringify(event))));
    },
    async settled() {
      await Promise.allSettled([...inflight]);
    },
  };
}

async function createEventsQueue(storage: StorageConfig, name: string): Promise<QueueClient> {
  const { queue } = await openMailQueues({ ...storage, queueName: name, poisonQueueName: `${name}-poison` }, { create: false });
  await queue.createIfNotExists();
  return queue;
}

/** A message's history, oldest first (row keys sort by time). */
export async function readDeliveryEvents(storage: StorageConfig, id: string): Promise<DeliveryEvent[]> {
  const client = await openTable(storage, DELIVERY_EVENTS_TABLE);
  const events: DeliveryEvent[] = [];
  const entities = client.listEntities<DeliveryEvent & { partitionKey: string; rowKey: string }>({ queryOptions: { filter: `PartitionKey eq '${tableKey(id).replace(/'/g, "''")}'` } });
  for await (const entity of entities) {
    const { partitionKey: _p, rowKey: _r, etag: _e, timestamp: _t, ...event } = entity as typeof entity & { etag?: string; timestamp?: string };
    const suppressed = (event as { suppressed?: unknown }).suppressed;
    events.push({ ...(event as DeliveryEvent), ...(typeof suppressed === "string" ? { suppressed: JSON.parse(suppressed) as string[] } : {}) });
  }
  return events.sort((a, b) => a.at.localeCompare(b.at));
}
