// `queue-mailer worker`: the same handler as the Functions host, polled outside it (local runs,
// tests, benchmarks, containers). It applies the host's rules: a taken message is hidden for
// LEASE_SECONDS and the lease is renewed while it is sent; it is deleted only after the server
// accepted it, hidden again for the backoff on a transient failure, and poisoned with a reason when
// it is the message's fault or its last attempt. While the circuit is open (our setup is broken) it
// takes no messages and probes the setup with backoff instead.
import type { DequeuedMessageItem } from "@azure/storage-queue";
import type { MailerError } from "../shared/errors.js";
import type { Logger } from "../shared/log.js";
import type { Mailer } from "../shared/mailer.js";
import { requeueCopy } from "../shared/queue/mailQueue.js";
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
  duplicates: number;
  poisoned: number;
  retried: number;
  waited: number;
  /** Set when a drain stopped because the setup is broken. */
  circuitOpen?: MailerError;
}

export async function runWorker(options: WorkerOptions): Promise<WorkerSummary> {
  const { mailer, logger, signal } = options;
  const { queue } = await mailer.queues();
  const { batchSize, leaseSeconds } = mailer.config.queue;
  const summary: WorkerSummary = { sent: 0, duplicates: 0, poisoned: 0, retried: 0, waited: 0 };
  const inflight = new Set<Promise<void>>();
  const maxPoll = options.maxPollIntervalMs ?? 2_000;
  let idlePoll = 25;

  async function settle(message: DequeuedMessageItem): Promise<void> {
    let popReceipt = message.popReceipt;
    // Keep the message hidden while it is being sent; a crashed worker's lease simply expires.
    // Each renewal changes the pop receipt, so the one in flight when the send ends is awaited
    // before the message is deleted or updated with the receipt it returns.
    let renewing: Promise<void> = Promise.resolve();
    const renew = setInterval(() => {
      renewing = queue.updateMessage(message.messageId, popReceipt, undefined, leaseSeconds).then(
        (r) => void (popReceipt = r.popReceipt ?? popReceipt),
        (error: unknown) => logger.log("warn", "worker.lease_renewal_failed", { queueMessageId: message.messageId, error: (error as Error).message }),
      );
    }, (leaseSeconds * 1000) / 2);
    let outcome: Outcome;
    try {
      outcome = await mailer.process(message.messageText, { queueMessageId: message.messageId, dequeueCount: message.dequeueCount });
    } finally {
      clearInterval(renew);
      await renewing;
    }
    switch (outcome.status) {
      case "retry":
        summary.retried += 1;
        // Hide it for the backoff; the queue brings it back with a higher dequeue count.
        await queue.updateMessage(message.messageId, popReceipt, undefined, outcome.afterSeconds);
        break;
      case "wait":
        summary.waited += 1;
        if (outcome.freshCopy) {
          // Near its last attempt through no fault of its own: continue as a fresh copy.
          await requeueCopy(queue, message.messageText, outcome.afterSeconds);
          await queue.deleteMessage(message.messageId, popReceipt);
        } else {
          await queue.updateMessage(message.messageId, popReceipt, undefined, outcome.afterSeconds);
        }
        break;
      case "sent":
        if (outcome.duplicate) summary.duplicates += 1;
        else summary.sent += 1;
        await queue.deleteMessage(message.messageId, popReceipt);
        break;
      case "poison":
        summary.poisoned += 1;
        await queue.deleteMessage(message.messageId, popReceipt);
        break;
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

  logger.log("info", "worker.started", { queue: mailer.config.storage.queueName, batchSize, leaseSeconds, drain: options.drain === true, memory: memory() });
  while (!signal?.aborted) {
    if (mailer.circuit.isOpen) {
      // Take nothing while our setup is broken; the messages keep their attempts.
      await Promise.allSettled(inflight);
      const wait = mailer.circuit.msUntilProbe();
      if (wait > 0) {
        await sleep(wait, signal);
        continue;
      }
      if (await mailer.probe()) continue;
      if (options.drain) {
        summary.circuitOpen = mailer.circuit.lastError;
        break;
      }
      continue;
    }
    // Like the host's batchSize + newBatchThreshold: up to two batches in flight, the next one
    // fetched while the current one is being sent, so a slow receive never leaves the pool idle.
    if (inflight.size >= batchSize) {
      await Promise.race(inflight);
      continue;
    }
    const received = await queue.receiveMessages({ numberOfMessages: Math.min(32, batchSize), visibilityTimeout: leaseSeconds });
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
  logger.log("info", "worker.stopped", { sent: summary.sent, duplicates: summary.duplicates, poisoned: summary.poisoned, retried: summary.retried, waited: summary.waited, circuitOpen: summary.circuitOpen?.code, memory: memory() });
  return summary;
}

/** Resident memory now and at its peak, for operators and the benchmark. */
function memory(): { rssBytes: number; peakRssBytes: number } {
  return { rssBytes: process.memoryUsage.rss(), peakRssBytes: process.resourceUsage().maxRSS * 1024 };
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
