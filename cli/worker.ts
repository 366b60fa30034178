// `queue-mailer worker`: the same handler as the Functions host, polled outside it (local runs,
// tests, benchmarks, containers). It applies the host's rules: a taken message is hidden for
// LEASE_SECONDS, deleted only after the server accepted it, hidden again for the backoff on a
// transient failure, and poisoned with a reason when it is the message's fault or its last attempt.
import type { DequeuedMessageItem } from "@azure/storage-queue";
import type { Logger } from "../shared/log.js";
import type { Mailer } from "../shared/mailer.js";
import type { Outcome } from "../shared/queue/outcome.js";

export interface WorkerOptions {
  mailer: Mailer;
  logger: Logger;
  /** Exit once no message is visible and nothing is in flight. */
  drain?: boolean;
  signal?: AbortSignal;
  onOutcome?: (outcome: Outcome, message: DequeuedMessageItem) => void;
  /** Longest pause between empty polls. */
  maxPollIntervalMs?: number;
}

export interface WorkerSummary {
  sent: number;
  poisoned: number;
  retried: number;
}

export async function runWorker(options: WorkerOptions): Promise<WorkerSummary> {
  const { mailer, logger, signal } = options;
  const { queue } = await mailer.queues();
  const { batchSize, leaseSeconds } = mailer.config.queue;
  const summary: WorkerSummary = { sent: 0, poisoned: 0, retried: 0 };
  const inflight = new Set<Promise<void>>();
  const maxPoll = options.maxPollIntervalMs ?? 2_000;
  let idlePoll = 25;

  async function settle(message: DequeuedMessageItem): Promise<void> {
    const outcome = await mailer.process(message.messageText, { queueMessageId: message.messageId, dequeueCount: message.dequeueCount });
    if (outcome.status === "retry") {
      summary.retried += 1;
      // Hide it for the backoff; the queue brings it back with a higher dequeue count.
      await queue.updateMessage(message.messageId, message.popReceipt, undefined, outcome.afterSeconds);
    } else {
      if (outcome.status === "sent") summary.sent += 1;
      else summary.poisoned += 1;
      await queue.deleteMessage(message.messageId, message.popReceipt);
    }
    options.onOutcome?.(outcome, message);
  }

  function track(message: DequeuedMessageItem): void {
    const task = settle(message)
      .catch((error: unknown) => {
        // A queue call failed (not the send): the lease expires and the message comes back.
        logger.log("error", "worker.settle_failed", { queueMessageId: message.messageId, error: (error as Error).message });
      })
      .finally(() => inflight.delete(task));
    inflight.add(task);
  }

  logger.log("info", "worker.started", { queue: mailer.config.storage.queueName, batchSize, leaseSeconds, drain: options.drain === true });
  while (!signal?.aborted) {
    const capacity = batchSize - inflight.size;
    if (capacity <= 0) {
      await Promise.race(inflight);
      continue;
    }
    const received = await queue.receiveMessages({ numberOfMessages: Math.min(32, capacity), visibilityTimeout: leaseSeconds });
    for (const message of received.receivedMessageItems) track(message);
    if (received.receivedMessageItems.length > 0) {
      idlePoll = 25;
      continue;
    }
    if (inflight.size === 0 && options.drain) break;
    // Nothing visible: wait for a send to finish (it may free capacity or end a drain) or a while.
    await Promise.race([...inflight, sleep(idlePoll, signal)]);
    idlePoll = Math.min(maxPoll, idlePoll * 2);
  }
  await Promise.allSettled(inflight);
  logger.log("info", "worker.stopped", { ...summary });
  return summary;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}
