// What happens when a message comes back: the send ledger's duplicate outcome, the case SMTP cannot
// settle (the server stored the message but the client never saw the 250), and a send slower than
// the lease. One local stack; each test has its own queue, so each runs alone or in any order.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import type { SmtpFault, SmtpFaultAction } from "../cli/local/smtpSink.js";
import { loadSendConfig, loadStorageConfig } from "../shared/config.js";
import { createMailer } from "../shared/mailer.js";
import { encodeQueueText, openMailQueues } from "../shared/queue/mailQueue.js";
import { messageIdFor } from "../shared/transport/smtpTransport.js";
import { capturingLogger, drain, useLocalStack, within, type CapturedLogger } from "./support/harness.js";

/** The fault for the transaction whose message has this subject (set per test). */
let faultFor: ((ctx: SmtpFault) => SmtpFaultAction | undefined) | undefined;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const events = (logger: CapturedLogger) => logger.lines.map((line) => JSON.parse(line) as { event: string; id?: string; queueMessageId?: string; error?: { code: string } });

describe("redelivered messages", () => {
  const local = useLocalStack("qm-redelivery-", { fault: (ctx) => faultFor?.(ctx) });

  /** Settings for one test: its own queue, so no test sees another's messages. */
  const envFor = (queue: string, extra: Record<string, string> = {}) => ({ ...local.stack.env, MAIL_QUEUE: queue, ...extra });
  const copiesOf = (id: string) => local.stack.smtp.messages.filter((m) => m.headers["message-id"]?.[0] === messageIdFor(id, LOCAL_MAILBOX));

  /**
   * A worker sent the message and died before deleting it: the queue hands it out again with
   * dequeue count 2.
   */
  async function sentThenRedelivered(env: Record<string, string>, id: string) {
    const queues = await openMailQueues(loadStorageConfig(env));
    await queues.queue.sendMessage(encodeQueueText(JSON.stringify({ id, to: "twice@example.test", subject: `Once ${id}`, text: "x" })));
    const taken = (await queues.queue.receiveMessages({ numberOfMessages: 1, visibilityTimeout: 1 })).receivedMessageItems[0];
    assert.ok(taken, "the first delivery");
    assert.equal(taken.dequeueCount, 1);
    const dead = createMailer(loadSendConfig(env), capturingLogger());
    try {
      const first = await dead.process(taken.messageText, { queueMessageId: taken.messageId, dequeueCount: taken.dequeueCount });
      assert.equal(first.status, "sent");
    } finally {
      await dead.close();
    }
    await sleep(1_100); // its lease runs out; it is not deleted
    return queues;
  }

  it("a redelivered message the ledger shows as sent is acknowledged, not sent again", { timeout: 60_000 }, async () => {
    const env = envFor("dup-ledger");
    const queues = await sentThenRedelivered(env, "dup-1");
    const logger = capturingLogger();
    const summary = await drain(env, logger);
    assert.deepEqual({ sent: summary.sent, duplicates: summary.duplicates, poisoned: summary.poisoned }, { sent: 0, duplicates: 1, poisoned: 0 });
    assert.equal(copiesOf("dup-1").length, 1, "delivered once");
    assert.equal((await queues.queue.getProperties()).approximateMessagesCount, 0, "acknowledged");
    const duplicate = events(logger).filter((r) => r.event === "message.duplicate");
    assert.equal(duplicate.length, 1);
    assert.equal(duplicate[0]?.id, "dup-1");
  });

  it("with SEND_LEDGER=false the same redelivery is sent again, with the same Message-ID", { timeout: 60_000 }, async () => {
    const env = envFor("dup-noledger", { SEND_LEDGER: "false" });
    await sentThenRedelivered(env, "dup-2");
    const summary = await drain(env, capturingLogger());
    assert.deepEqual({ sent: summary.sent, duplicates: summary.duplicates }, { sent: 1, duplicates: 0 });
    const copies = copiesOf("dup-2");
    assert.equal(copies.length, 2, "sent twice");
    assert.equal(copies[0]?.headers["message-id"]?.[0], copies[1]?.headers["message-id"]?.[0]);
  });

  it("stored by the server but the 250 lost: resent with the same Message-ID and logged as an unknown outcome", { timeout: 60_000 }, async () => {
    const env = envFor("stored-unanswered", { RETRY_BASE_SECONDS: "0" });
    const queues = await openMailQueues(loadStorageConfig(env));
    await queues.queue.sendMessage(encodeQueueText(JSON.stringify({ id: "lost-250", to: "lost@example.test", subject: "Lost reply", text: "x" })));
    let dropped = 0;
    faultFor = ({ phase }) => (phase === "data" && dropped++ === 0 ? { storeThenDrop: true } : undefined);
    const logger = capturingLogger();
    let summary;
    try {
      summary = await drain(env, logger);
    } finally {
      faultFor = undefined;
    }
    assert.equal(dropped, 2, "the store-then-drop happened, then one more transaction");
    const copies = copiesOf("lost-250");
    assert.equal(copies.length, 2, "the server holds it twice: SMTP cannot tell a lost reply from a lost message");
    assert.equal(copies[0]?.headers["message-id"]?.[0], copies[1]?.headers["message-id"]?.[0], "same Message-ID, so clients can fold the repeat");
    assert.deepEqual({ sent: summary.sent, retried: summary.retried, poisoned: summary.poisoned }, { sent: 1, retried: 1, poisoned: 0 });
    const records = events(logger);
    assert.equal(records.find((r) => r.event === "message.retry")?.error?.code, "SMTP_CONNECTION_FAILED");
    assert.deepEqual(records.filter((r) => r.event === "message.resend_unknown_outcome").map((r) => r.id), ["lost-250"]);
  });

  it("a send slower than the lease: the lease is renewed, nobody else sees the message, it is delivered once and deleted with the current pop receipt", { timeout: 60_000 }, async () => {
    const env = envFor("slow-send", { LEASE_SECONDS: "5" });
    const queues = await openMailQueues(loadStorageConfig(env));
    await queues.queue.sendMessage(encodeQueueText(JSON.stringify({ id: "slow-1", to: "slow@example.test", subject: "Slow", text: "x" })));
    // The server takes 8 s to answer DATA: longer than the 5 s lease.
    faultFor = ({ phase }) => (phase === "data" ? { delayMs: 8_000 } : undefined);
    const logger = capturingLogger();
    const sending = drain(env, logger);
    // A rival receiver polls the queue the whole time, as a second instance would.
    const stolen: string[] = [];
    let done = false;
    const finished = sending.finally(() => (done = true));
    await sleep(500);
    while (!done) {
      const { receivedMessageItems } = await queues.queue.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 1 });
      stolen.push(...receivedMessageItems.map((m) => m.messageId));
      await sleep(250);
    }
    let summary;
    try {
      summary = await within(finished, 30_000, "the slow send to finish");
    } finally {
      faultFor = undefined;
    }
    assert.deepEqual(stolen, [], "no other receiver saw the message while it was being sent");
    assert.equal(summary.sent, 1);
    assert.equal(copiesOf("slow-1").length, 1, "delivered once");
    const names = events(logger).map((r) => r.event);
    assert.ok(!names.includes("worker.settle_failed"), "deleted with the current pop receipt");
    assert.ok(!names.includes("worker.lease_renewal_failed"));
    assert.equal((await queues.queue.getProperties()).approximateMessagesCount, 0, "deleted");
  });
});
