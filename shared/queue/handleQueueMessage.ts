// The whole path of one queue message: decode → validate → send → outcome. Shared by the Functions
// host (functions/sendEmail.ts) and the worker (cli/worker.ts); neither adds logic of its own.
import type { QueuePolicy } from "../config.js";
import { toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
import { parseMessage } from "../message/validate.js";
import type { Sender } from "../send/sendEmail.js";
import { decodeQueueText } from "./decode.js";
import { poisonRecord, retryDelaySeconds, type Outcome } from "./outcome.js";

export interface QueueMessageMeta {
  /** The queue's id for the message: the default idempotency key. */
  queueMessageId: string;
  /** 1 on first delivery. */
  dequeueCount: number;
}

export interface HandlerDeps {
  sender: Sender;
  mailFrom: string;
  policy: QueuePolicy;
  logger: Logger;
}

export async function handleQueueMessage(text: string, meta: QueueMessageMeta, deps: HandlerDeps): Promise<Outcome> {
  const { sender, logger, policy } = deps;
  let id = meta.queueMessageId;
  try {
    const message = parseMessage(decodeQueueText(text), { from: deps.mailFrom, id: meta.queueMessageId });
    id = message.id;
    const result = await sender.sendEmail(message);
    logger.log("info", "message.sent", { id, queueMessageId: meta.queueMessageId, attempt: meta.dequeueCount, messageId: result.messageId, response: result.response, rejected: result.rejected });
    return { status: "sent", id, messageId: result.messageId, response: result.response };
  } catch (thrown) {
    const error = toMailerError(thrown);
    const lastAttempt = meta.dequeueCount >= policy.maxDequeueCount;
    if (error.kind === "permanent" || lastAttempt) {
      // We poison on the last attempt ourselves so that no message reaches the poison queue
      // without a reason.
      logger.log("error", "message.poisoned", { id, queueMessageId: meta.queueMessageId, attempt: meta.dequeueCount, error: error.toJSON() });
      return { status: "poison", record: poisonRecord(error, meta.dequeueCount, text), error };
    }
    const afterSeconds = retryDelaySeconds(meta.dequeueCount, policy, error.retryAfterSeconds);
    logger.log("warn", "message.retry", { id, queueMessageId: meta.queueMessageId, attempt: meta.dequeueCount, afterSeconds, error: error.toJSON() });
    return { status: "retry", afterSeconds, error };
  }
}
