// Scheduled and expiring mail (issue 14): `sendAt` arrives after, never before, whether the queue's
// initial visibility held it (enqueueEmail, `enqueue --send-at`) or the sender saw it early and hid
// it again without using an attempt; `expiresAt` in the past is poisoned with MESSAGE_EXPIRED and
// never sent. One local stack; each test has its own queue.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { DequeuedMessageItem } from "@azure/storage-queue";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import { runWorker } from "../cli/worker.js";
import { loadSendConfig, loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { createMailer } from "../shared/mailer.js";
import { encodeQueueText, openMailQueues } from "../shared/queue/mailQueue.js";
import type { Outcome } from "../shared/queue/outcome.js";
import { messageIdFor } from "../shared/transport/mailOptions.js";
import { spawnCli } from "./support/cli.js";
import { capturingLogger, drain, readPoison, useLocalStack, within } from "./support/harness.js";

describe("sendAt and expiresAt", () => {
  const local = useLocalStack("qm-scheduling-");
  const envFor = (queue: string, extra: Record<string, string> = {}) => ({ ...local.stack.env, MAIL_QUEUE: queue, ...extra });
  const copiesOf = (id: string) => local.stack.smtp.messages.filter((m) => m.headers["message-id"]?.[0] === messageIdFor(id, LOCAL_MAILBOX));

  /**
   * Runs the real worker (not draining: a hidden message would end a drain) until `id` was sent
   * or `ms` passed; returns every outcome with the dequeue count it was taken with.
   */
  async function workUntilSent(env: Record<string, string>, id: string, ms: number) {
    const logger = capturingLogger();
    const mailer = createMailer(loadSendConfig(env), logger);
    const stop = new AbortController();
    const outcomes: Array<{ outcome: Outcome; message: DequeuedMessageItem }> = [];
    const timer = setTimeout(() => stop.abort(), ms);
    try {
      await runWorker({
        mailer,
        logger,
        signal: stop.signal,
        maxPollIntervalMs: 100,
        onOutcome: (outcome, message) => {
          outcomes.push({ outcome, message });
          if (outcome.status === "sent" && outcome.id === id) stop.abort();
        },
      });
    } finally {
      clearTimeout(timer);
      await mailer.close();
    }
    return { outcomes, logger, mailer };
  }

  it("enqueueEmail with sendAt 3 s ahead: arrives after sendAt, not before", { timeout: 30_000 }, async () => {
    const env = envFor("sched-visibility");
    const queues = await openMailQueues(loadStorageConfig(env));
    const sendAt = new Date(Date.now() + 3_000);
    await enqueueEmail(queues.queue, { id: "sched-1", to: "later@example.test", subject: "Later", text: "x", sendAt: sendAt.toISOString() });
    // The queue itself holds it back: nothing is visible to a worker now.
    const peek = await queues.queue.peekMessages({ numberOfMessages: 1 });
    assert.equal(peek.peekedMessageItems.length, 0, "hidden by the queue's initial visibility");
    const { outcomes } = await workUntilSent(env, "sched-1", 15_000);
    const copies = copiesOf("sched-1");
    assert.equal(copies.length, 1, "delivered once");
    assert.ok((copies[0]?.receivedAt.getTime() ?? 0) >= sendAt.getTime(), `arrived ${copies[0]?.receivedAt.toISOString()}, sendAt ${sendAt.toISOString()}`);
    assert.deepEqual(outcomes.map((o) => o.outcome.status), ["sent"], "taken once, when due");
  });

  it("a message seen early is hidden again for the rest and not counted as an attempt", { timeout: 30_000 }, async () => {
    // Had the early look used an attempt, the send would come with dequeue count 2 and the ledger
    // would treat it as a redelivery that may have been delivered.
    const env = envFor("sched-early");
    const queues = await openMailQueues(loadStorageConfig(env));
    const sendAt = new Date(Date.now() + 3_000);
    // A producer that set no visibility: the message is visible at once.
    await queues.queue.sendMessage(encodeQueueText(JSON.stringify({ id: "sched-2", to: "early@example.test", subject: "Early", text: "x", sendAt: sendAt.toISOString() })));
    const { outcomes, logger, mailer } = await workUntilSent(env, "sched-2", 15_000);
    const copies = copiesOf("sched-2");
    assert.equal(copies.length, 1, "delivered once");
    assert.ok((copies[0]?.receivedAt.getTime() ?? 0) >= sendAt.getTime(), `arrived ${copies[0]?.receivedAt.toISOString()}, sendAt ${sendAt.toISOString()}`);
    assert.deepEqual(outcomes.map((o) => o.outcome.status), ["wait", "sent"], "seen early once, then sent when due");
    const early = outcomes[0]?.outcome;
    assert.ok(early?.status === "wait" && early.error.code === "MESSAGE_NOT_DUE" && early.afterSeconds >= 2 && early.afterSeconds <= 3, JSON.stringify(early));
    assert.equal(outcomes[1]?.message.dequeueCount, 1, "the send is the message's first attempt");
    assert.equal(logger.lines.filter((l) => l.includes("message.resend_unknown_outcome")).length, 0, "not treated as a redelivery");
    assert.deepEqual(await readPoison(mailer), []);
    assert.equal((await queues.queue.getProperties()).approximateMessagesCount, 0, "nothing left behind");
  });

  it("`enqueue --send-at` holds the message back in the queue", { timeout: 30_000 }, async () => {
    const env = envFor("sched-cli");
    const sendAt = new Date(Date.now() + 3_000);
    const result = await spawnCli(["enqueue", "--to", "cli@example.test", "--subject", "From the CLI", "--text", "x", "--id", "sched-3", "--send-at", sendAt.toISOString()], { env });
    assert.equal(result.status, 0, result.stderr);
    const queues = await openMailQueues(loadStorageConfig(env));
    if (Date.now() < sendAt.getTime() - 500) {
      assert.equal((await queues.queue.peekMessages({ numberOfMessages: 1 })).peekedMessageItems.length, 0, "hidden until sendAt");
    }
    await workUntilSent(env, "sched-3", 15_000);
    const copies = copiesOf("sched-3");
    assert.equal(copies.length, 1);
    assert.ok((copies[0]?.receivedAt.getTime() ?? 0) >= sendAt.getTime());
  });

  it("expiresAt in the past: poisoned with MESSAGE_EXPIRED, never sent", { timeout: 30_000 }, async () => {
    const env = envFor("sched-expired");
    const queues = await openMailQueues(loadStorageConfig(env));
    const expiresAt = new Date(Date.now() + 1_000);
    // Valid when enqueued; stale by the time a worker takes it.
    await enqueueEmail(queues.queue, { id: "sched-4", to: "stale@example.test", subject: "Reset link", text: "x", expiresAt: expiresAt.toISOString() });
    await within(new Promise((resolve) => setTimeout(resolve, expiresAt.getTime() - Date.now() + 100)), 5_000, "expiry");
    const logger = capturingLogger();
    const summary = await drain(env, logger);
    assert.deepEqual({ sent: summary.sent, poisoned: summary.poisoned }, { sent: 0, poisoned: 1 });
    assert.equal(copiesOf("sched-4").length, 0, "never sent");
    const poison = await readPoison(summary.mailer);
    assert.equal(poison.length, 1);
    assert.equal(poison[0]?.reason.code, "MESSAGE_EXPIRED");
    assert.match(poison[0]?.reason.message ?? "", /expired at/);
  });

  it("an unreadable date and an expiry before sendAt are refused at enqueue", { timeout: 10_000 }, async () => {
    const queues = await openMailQueues(loadStorageConfig(envFor("sched-invalid")));
    for (const [fields, code] of [
      [{ sendAt: "tomorrow" }, "MESSAGE_INVALID_DATE"],
      [{ sendAt: "2030-01-31T09:00:00" }, "MESSAGE_INVALID_DATE"],
      [{ sendAt: "2030-01-31T09:00:00Z", expiresAt: "2030-01-31T08:00:00Z" }, "MESSAGE_INVALID_DATE"],
    ] as const) {
      await assert.rejects(enqueueEmail(queues.queue, { to: "x@example.test", subject: "s", text: "x", ...fields }), (error: { code?: string }) => error.code === code);
    }
  });
});
