// For producers: validate a message with the same rules as the sender, then put it on the queue.
// A message that would be poisoned is refused here instead, before it reaches the queue.
import { randomUUID } from "node:crypto";
import type { QueueClient } from "@azure/storage-queue";
import { validateMessage } from "./message/validate.js";
import type { EmailMessageInput } from "./message/schema.js";
import { encodeQueueText } from "./queue/mailQueue.js";

export interface EnqueueResult {
  queueMessageId: string;
  id: string;
}

export async function enqueueEmail(queue: QueueClient, message: EmailMessageInput): Promise<EnqueueResult> {
  // Give every message an id up front, so a retried enqueue is recognisable as the same email.
  const withId: EmailMessageInput = { ...message, id: message.id ?? randomUUID() };
  // From defaults at send time; any syntactically valid placeholder lets validation run now.
  validateMessage(withId, { from: withId.from ?? "sender@example.com", id: withId.id ?? "" });
  const response = await queue.sendMessage(encodeQueueText(JSON.stringify(withId)));
  return { queueMessageId: response.messageId, id: withId.id ?? "" };
}
