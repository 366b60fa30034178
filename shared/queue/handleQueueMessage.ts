// The whole path of one queue message: decode → resolve and validate → send → outcome. Shared by
// the Functions host (functions/sendEmail.ts) and the worker (cli/worker.ts); neither adds logic
// of its own. It never throws for the message's own fault: it returns an Outcome.
import type { ContainerClient } from "@azure/storage-blob";
import type { MessagePolicy, QueuePolicy } from "../config.js";
import { MailerError, toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
import { resolveMessage } from "../message/resolveMessage.js";
import type { TemplateRenderer } from "../message/templates.js";
import { decodeQueueText } from "./decode.js";
import type { CircuitBreaker } from "../send/circuitBreaker.js";
import type { Sender } from "../send/sendEmail.js";
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
  messages: MessagePolicy;
  attachments: () => Promise<ContainerClient>;
  /** Renders messages that name a template; without it such messages fail with TEMPLATE_NOT_FOUND. */
  templates?: TemplateRenderer;
  circuit: CircuitBreaker;
  logger: Logger;
}

export async function handleQueueMessage(text: string, meta: QueueMessageMeta, deps: HandlerDeps): Promise<Outcome> {
  const { sender, logger, policy, circuit } = deps;
  let id = meta.queueMessageId;
  const where = () => ({ id, queueMessageId: meta.queueMessageId, attempt: meta.dequeueCount });
  const wait = (error: MailerError, afterSeconds = Math.ceil(circuit.msUntilProbe() / 1000), freshCopy = meta.dequeueCount >= policy.maxDequeueCount - 1): Outcome => ({
    status: "wait",
    id,
    // A queue message can be hidden for at most 7 days.
    afterSeconds: Math.min(604_800, Math.max(1, afterSeconds)),
    error,
    freshCopy,
  });
  // Set once the circuit let this message through: from then on the attempt must end the circuit's
  // probe, whatever happens (see circuitBreaker.ts).
  let attempted = false;
  try {
    const { message, claimCheckBlob } = await resolveMessage(text, { from: deps.mailFrom, id: meta.queueMessageId }, deps.messages, deps.attachments, deps.templates);
    id = message.id;
    const now = Date.now();
    if (message.expiresAt !== undefined && now >= message.expiresAt.getTime()) {
      // Late is worse than never for this mail (a stale reset link, a past reminder): poisoned,
      // so the producer can see why, and never sent.
      throw new MailerError("MESSAGE_EXPIRED", `message ${JSON.stringify(id)} expired at ${message.expiresAt.toISOString()} and was taken at ${new Date(now).toISOString()}; not sent`, {
        kind: "permanent",
        hint: "Enqueue a new message if it is still wanted; give expiresAt enough room for retries and queue delays.",
      });
    }
    if (message.sendAt !== undefined && now < message.sendAt.getTime()) {
      // Seen early (a producer that set no visibility, or sendAt beyond the queue's 7 days): hidden
      // again for the rest. Always as a fresh copy, so that waiting never counts as an attempt
      // (dequeue count, and the ledger's redelivery check, start over).
      const afterSeconds = Math.ceil((message.sendAt.getTime() - now) / 1000);
      logger.log("info", "message.scheduled", { ...where(), sendAt: message.sendAt.toISOString(), afterSeconds: Math.min(604_800, afterSeconds) });
      return wait(new MailerError("MESSAGE_NOT_DUE", `message is due at ${message.sendAt.toISOString()}`, { kind: "deferred", retryAfterSeconds: afterSeconds }), afterSeconds, true);
    }
    if (!circuit.allowAttempt()) {
      return wait(circuit.lastError ?? new MailerError("CIRCUIT_OPEN", "sending is paused", { kind: "config" }));
    }
    attempted = true;
    const sent = await sender.send(message, meta.dequeueCount > 1);
    circuit.close();
    if (claimCheckBlob !== undefined) {
      // The claim check served its purpose; a failure here only leaves a blob behind.
      await deps.attachments().then((c) => c.deleteBlob(claimCheckBlob)).catch(() => undefined);
    }
    if (sent.status === "duplicate") {
      logger.log("info", "message.duplicate", { ...where(), messageId: sent.messageId, sentAt: sent.sentAt, note: "already sent; acknowledged without sending" });
      return { status: "sent", id, messageId: sent.messageId, response: "already sent", duplicate: true };
    }
    const suppressed = sent.suppressed.map((r) => r.address);
    logger.log("info", "message.sent", { ...where(), messageId: sent.result.messageId, response: sent.result.response, rejected: sent.result.rejected, resentAfterUnknownOutcome: sent.resentAfterUnknownOutcome, ...(suppressed.length > 0 ? { suppressed } : {}) });
    return { status: "sent", id, messageId: sent.result.messageId, response: sent.result.response, duplicate: false, ...(suppressed.length > 0 ? { suppressed } : {}) };
  } catch (thrown) {
    const error = toMailerError(thrown);
    if (error.kind === "config") {
      // Not the message's fault: open the circuit, keep the message.
      circuit.open(error);
      return wait(error);
    }
    if (attempted) {
      // A permanent failure is the message's own (the server judged the message, so the setup
      // works); a transient or deferred one says nothing about the setup: probe again after a
      // backoff.
      if (error.kind === "permanent") circuit.close();
      else circuit.probeFailed(error);
    }
    if (error.kind === "deferred") {
      // The mailbox may not send now (throttled, daily budget spent): wait as long as asked,
      // without using up an attempt and without poisoning, whatever the dequeue count.
      logger.log("info", "message.deferred", { ...where(), afterSeconds: error.retryAfterSeconds, code: error.code });
      return wait(error, error.retryAfterSeconds ?? policy.retryBaseSeconds);
    }
    const lastAttempt = meta.dequeueCount >= policy.maxDequeueCount;
    if (error.kind === "permanent" || lastAttempt) {
      // We poison on the last attempt ourselves so that no message reaches the poison queue
      // without a reason.
      logger.log("error", "message.poisoned", { ...where(), error: error.toJSON() });
      if (id === meta.queueMessageId) id = producerIdOf(text) ?? id;
      return { status: "poison", id, record: poisonRecord(error, meta.dequeueCount, text), error };
    }
    const afterSeconds = retryDelaySeconds(meta.dequeueCount, policy, error.retryAfterSeconds);
    logger.log("warn", "message.retry", { ...where(), afterSeconds, error: error.toJSON() });
    return { status: "retry", id, afterSeconds, error };
  }
}

/**
 * The producer's id of a message that could not be read as a whole (so that `queue-mailer status`
 * finds its poisoning under the id the producer knows), or undefined.
 */
function producerIdOf(text: string): string | undefined {
  try {
    const json: unknown = JSON.parse(decodeQueueText(text));
    const id = typeof json === "object" && json !== null ? (json as { id?: unknown }).id : undefined;
    // eslint-disable-next-line no-control-regex
    return typeof id === "string" && id.length > 0 && id.length <= 256 && !/[\u0000-\u001f\u007f]/.test(id) ? id : undefined;
  } catch {
    return undefined;
  }
}
