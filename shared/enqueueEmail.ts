// For producers: validate a message with the same rules as the sender, then put it on the queue.
// A message that would be poisoned is refused here instead, before it reaches the queue. A queue
// message cannot exceed 64 KiB, so a larger one is stored as a blob in the attachments container
// and the queue gets a claim check (`{ "claimCheck": "<blob name>" }`) instead.
import { randomUUID } from "node:crypto";
import type { QueueClient } from "@azure/storage-queue";
import type { ContainerClient } from "@azure/storage-blob";
import { MessageError, validateMessage } from "./message/validate.js";
import type { ProducerMessageInput } from "./message/schema.js";
import { encodeQueueText } from "./queue/mailQueue.js";

/** Azure Storage's limit on a queue message, counted on the (base64) text we send. */
export const MAX_QUEUE_MESSAGE_BYTES = 64 * 1024;

export interface EnqueueTarget {
  queue: QueueClient;
  /** Needed only for messages over the queue's size limit. */
  attachments?: ContainerClient;
}

export interface EnqueueResult {
  queueMessageId: string;
  id: string;
  /** Set when the message travelled as a claim check. */
  claimCheck?: string;
}

/** The longest a queue message can stay invisible (Azure Queue Storage): 7 days. */
const MAX_VISIBILITY_SECONDS = 7 * 24 * 60 * 60;

/**
 * A scheduled message rides the queue's initial visibility: nobody sees it before sendAt (up to 7
 * days; a later one is seen early and hidden again by the sender). It never expires from the
 * queue: the default time-to-live (7 days) would not outlast the visibility, and an expiring
 * message must be poisoned with MESSAGE_EXPIRED, not vanish.
 */
function scheduling(sendAt: Date | undefined, now = Date.now()): { visibilityTimeout: number; messageTimeToLive: number } | undefined {
  if (sendAt === undefined || sendAt.getTime() <= now) return undefined;
  return { visibilityTimeout: Math.min(MAX_VISIBILITY_SECONDS, Math.ceil((sendAt.getTime() - now) / 1000)), messageTimeToLive: -1 };
}

export async function enqueueEmail(target: QueueClient | EnqueueTarget, message: ProducerMessageInput): Promise<EnqueueResult> {
  const { queue, attachments } = "sendMessage" in target ? { queue: target, attachments: undefined } : target;
  // Give every message an id up front, so a retried enqueue is recognisable as the same email.
  const withId: ProducerMessageInput = { ...message, id: message.id ?? randomUUID() };
  const id = withId.id ?? "";
  // From defaults at send time; any syntactically valid placeholder lets validation run now.
  const validated = validateMessage(withId, { from: withId.from ?? "sender@example.com", id });
  const json = JSON.stringify(withId);
  const jsonBytes = Buffer.byteLength(json);
  let text: string;
  let claimCheck: string | undefined;
  // The base64 queue text is 4/3 of the JSON: decide from that number rather than by encoding a
  // large message (a 20 MB attachment would be a 36 MB string made only to be measured).
  if (4 * Math.ceil(jsonBytes / 3) > MAX_QUEUE_MESSAGE_BYTES) {
    if (!attachments) {
      throw new MessageError("MESSAGE_TOO_LARGE", `message is ${jsonBytes} bytes; a queue message holds at most 64 KiB, and no attachments container was given for a claim check`);
    }
    claimCheck = `claim-checks/${new Date().toISOString().slice(0, 10)}/${randomUUID()}.json`;
    await attachments.createIfNotExists();
    await attachments.getBlockBlobClient(claimCheck).upload(json, jsonBytes, { blobHTTPHeaders: { blobContentType: "application/json" } });
    text = encodeQueueText(JSON.stringify({ claimCheck }));
  } else {
    text = encodeQueueText(json);
  }
  const response = await queue.sendMessage(text, scheduling(validated.sendAt));
  return { queueMessageId: response.messageId, id, ...(claimCheck === undefined ? {} : { claimCheck }) };
}
