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
