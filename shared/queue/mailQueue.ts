// The mail queue and its poison queue, from a connection string (Azurite, shared key) or a queue
// service URI with the managed identity, as the Functions host resolves `AzureWebJobsStorage`.
import { QueueServiceClient, type QueueClient } from "@azure/storage-queue";
import type { StorageConfig } from "../config.js";
import { azureCredential } from "../auth/azureCredential.js";
import type { PoisonRecord } from "./outcome.js";

export interface MailQueues {
  queue: QueueClient;
  poison: QueueClient;
}

export async function openMailQueues(storage: StorageConfig, { create = true }: { create?: boolean } = {}): Promise<MailQueues> {
  const service = storage.connectionString
    ? QueueServiceClient.fromConnectionString(storage.connectionString)
    : new QueueServiceClient(storage.queueServiceUri ?? "", await azureCredential());
  const queues = { queue: service.getQueueClient(storage.queueName), poison: service.getQueueClient(storage.poisonQueueName) };
  if (create) await Promise.all([queues.queue.createIfNotExists(), queues.poison.createIfNotExists()]);
  return queues;
}

export function encodeQueueText(json: string): string {
  return Buffer.from(json, "utf8").toString("base64");
}

/** Poison entries are JSON, base64-encoded like everything the SDKs write. */
export async function writePoisonRecord(poison: QueueClient, record: PoisonRecord): Promise<void> {
  // A poison entry must stay for people to look at: no expiry (-1).
  await poison.sendMessage(encodeQueueText(JSON.stringify(record)), { messageTimeToLive: -1 });
}

/**
 * Put the same text back as a new message, hidden for `visibilitySeconds`. Used when a message must
 * wait through an outage that is not its fault: a fresh copy starts with a fresh dequeue count, so
 * the wait never makes it run out of attempts. Send first, then the caller deletes the original.
 */
export async function requeueCopy(queue: QueueClient, text: string, visibilitySeconds: number): Promise<void> {
  await queue.sendMessage(text, { visibilityTimeout: Math.max(0, Math.round(visibilitySeconds)), messageTimeToLive: -1 });
}
