// Per-mailbox limits that hold across instances (issue 11): the daily recipient budget and the
// pause a throttling server asks for. Both live in Table storage (the local stack's Azurite here);
// two budget or pause objects stand for two Functions instances that share nothing but the account.
// The pipeline tests run the real worker over the real queue: against the SMTP sink (the pause and
// the budget sit before the transport, so the path is the same for Graph), and against the Graph
// double for what only Graph does: a 429 with Retry-After pauses the mailbox for every instance.
import assert from "node:assert/strict";
import { before, beforeEach, describe, it } from "node:test";
import type { QueueClient } from "@azure/storage-queue";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import { loadStorageConfig, type StorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { DAILY_RECIPIENT_TABLE, tableDailyRecipientBudget } from "../shared/send/dailyRecipientBudget.js";
import { MAILBOX_PAUSE_TABLE, tableMailboxPause } from "../shared/send/mailboxPause.js";
import { SEND_LEDGER_TABLE } from "../shared/send/sendLedger.js";
import { openTable, statusOf, tableKey } from "../shared/storage/storageClients.js";
import { capturingLogger, drain, readPoison, rejectionOf, useLocalStack, type CapturedLogger } from "./support/harness.js";

const HOUR = 60 * 60_000;
const events = (logger: CapturedLogger, event: string) => logger.lines.map((line) => JSON.parse(line) as Record<string, unknown>).filter((r) => r.event === event);

// One local stack (Azurite, OAuth server, SMTP sink, Graph double) for the whole file.
describe("per-mailbox limits", () => {
  // The Graph double runs beside the SMTP sink; `env` sends through Graph, `smtpEnv` through SMTP.
  const local = useLocalStack("qm-limits-", { transport: "graph" });
  const smtpEnv = () => ({ ...local.stack.env, TRANSPORT: "smtp", TOKEN_SCOPE: local.stack.oauth.scope });
  let storage: StorageConfig;
  let queue: QueueClient;
  let poison: QueueClient;

  before(async () => {
    storage = loadStorageConfig(local.stack.env);
    ({ queue, poison } = await openMailQueues(storage));
  });

  async function emptyTable(name: string): Promise<void> {
    const table = await openTable(storage, name);
    for await (const row of table.listEntities()) await table.deleteEntity(row.partitionKey ?? "", row.rowKey ?? "");
  }

  async function recipientsCounted(mailbox: string): Promise<number> {
    const table = await openTable(storage, DAILY_RECIPIENT_TABLE);
    // No row yet means nothing counted; any other failure fails the test.
    const row = await table.getEntity<{ buckets: string }>(tableKey(mailbox), "window").catch((error: unknown) => {
      if (statusOf(error) === 404) return { buckets: "{}" };
      throw error;
    });
    return Object.values(JSON.parse(row.buckets) as Record<string, number>).reduce((a, b) => a + b, 0);
  }

  describe("daily recipient budget across instances", () => {
    it("three instances reserving at once never admit more than the limit together", { timeout: 20_000 }, async () => {
      const instances = [0, 1, 2].map(() => tableDailyRecipientBudget(storage, "race@contoso.test", 10));
      // Each instance has counted once already, so the row exists (creating it twice is a 409, not
      // a lost update) and every instance has its table open: the reads and writes below overlap.
      for (const instance of instances) assert.ok((await instance.reserve(1)).ok);
      const results = await Promise.all(Array.from({ length: 30 }, (_, i) => instances[i % 3]!.reserve(1)));
      assert.equal(results.filter((r) => r.ok).length, 7, "exactly the limit is admitted, no more and no room wasted");
      // And the table agrees: what the instances admitted is what is counted.
      assert.equal(await recipientsCounted("race@contoso.test"), 10);
    });

    it("release gives the room back; a refused reservation says when to come back", { timeout: 10_000 }, async () => {
      const budget = tableDailyRecipientBudget(storage, "release@contoso.test", 3);
      const first = await budget.reserve(3);
      assert.ok(first.ok);
      const refused = await budget.reserve(1);
      assert.ok(!refused.ok);
      assert.ok(refused.retryAfterSeconds > 23 * 3600 && refused.retryAfterSeconds <= 24 * 3600 + 600, `retry after ${refused.retryAfterSeconds} s`);
      await first.release();
      await first.release(); // twice gives back once
      const [a, b, c, d] = await Promise.all([budget.reserve(1), budget.reserve(1), budget.reserve(1), budget.reserve(1)]);
      assert.deepEqual([a.ok, b.ok, c.ok, d.ok].filter(Boolean).length, 3);
    });

    it("a 3-recipient message with 2 left waits until the oldest count leaves the 24 h window", { timeout: 10_000 }, async () => {
      let clock = Date.parse("2026-03-02T08:00:00Z");
      const budget = tableDailyRecipientBudget(storage, "window@contoso.test", 5, { now: () => clock });
      assert.ok((await budget.reserve(2)).ok); // 08:00
      clock += 4 * HOUR;
      assert.ok((await budget.reserve(1)).ok); // 12:00: 3 used, 2 left
      const waiting = await budget.reserve(3);
      assert.ok(!waiting.ok, "3 do not fit in the 2 left");
      // The 08:00 bucket (10 minutes wide) frees 24 h after its end: 08:10 tomorrow.
      const freesAt = Date.parse("2026-03-03T08:10:00Z");
      assert.equal(waiting.freesAt.getTime(), freesAt);
      assert.equal(waiting.retryAfterSeconds, (freesAt - clock) / 1000);
      assert.equal(waiting.used, 3);
      clock = freesAt - 1_000;
      assert.ok(!(await budget.reserve(3)).ok, "a second early it still does not fit");
      clock = freesAt;
      assert.ok((await budget.reserve(3)).ok, "once the oldest count has left the window it fits");
    });

    it("a message with more recipients than the limit can never go: permanent, not a wait", { timeout: 10_000 }, async () => {
      const budget = tableDailyRecipientBudget(storage, "small@contoso.test", 2);
      const error = await rejectionOf(budget.reserve(3));
      assert.equal(error.code, "DAILY_RECIPIENT_LIMIT_EXCEEDED_BY_MESSAGE");
      assert.equal(error.kind, "permanent");
      assert.match(error.hint ?? "", /DAILY_RECIPIENT_LIMIT/);
    });

    it("a limit of 0 counts nothing", { timeout: 10_000 }, async () => {
      const budget = tableDailyRecipientBudget(storage, "free@contoso.test", 0);
      const results = await Promise.all(Array.from({ length: 3 }, () => budget.reserve(500)));
      assert.ok(results.every((r) => r.ok));
    });
  });

  describe("mailbox pause across instances", () => {
    it("one instance's pause stops the others; it only ever extends", { timeout: 10_000 }, async () => {
      const mailbox = "pause@contoso.test";
      const throttled = tableMailboxPause(storage, mailbox);
      const other = () => tableMailboxPause(storage, mailbox); // a fresh instance: nothing cached
      assert.equal(await other().pausedForMs(), 0);

      assert.equal(await throttled.pauseUntil(new Date(Date.now() + 60_000), "GRAPH_THROTTLED"), true);
      const seen = await other().pausedForMs();
      assert.ok(seen > 55_000 && seen <= 60_000, `paused for ${seen} ms`);

      // An earlier Retry-After (another in-flight request's) does not shorten it...
      assert.equal(await other().pauseUntil(new Date(Date.now() + 10_000), "GRAPH_THROTTLED"), false);
      assert.ok((await other().pausedForMs()) > 55_000);
      // ...and of concurrent ones the latest wins, whatever the order the writes land in.
      await Promise.all([throttled.pauseUntil(new Date(Date.now() + 90_000), "GRAPH_THROTTLED"), other().pauseUntil(new Date(Date.now() + 120_000), "GRAPH_THROTTLED"), other().pauseUntil(new Date(Date.now() + 100_000), "GRAPH_THROTTLED")]);
      const latest = await other().pausedForMs();
      assert.ok(latest > 115_000 && latest <= 120_000, `paused for ${latest} ms`);
    });

    it("the read cache's cost: another instance may miss a new pause for up to the cache moment", { timeout: 10_000 }, async () => {
      const mailbox = "cache@contoso.test";
      const reader = tableMailboxPause(storage, mailbox, { cacheMs: 300 });
      assert.equal(await reader.pausedForMs(), 0);
      await tableMailboxPause(storage, mailbox).pauseUntil(new Date(Date.now() + 30_000), "GRAPH_THROTTLED");
      assert.equal(await reader.pausedForMs(), 0, "still the cached read");
      await new Promise((resolve) => setTimeout(resolve, 350));
      assert.ok((await reader.pausedForMs()) > 25_000, "read again after the cache moment");
    });
  });

  describe("through the worker", () => {
    // Each test starts with an empty queue and no pause, count or ledger record for the mailbox.
    beforeEach(async () => {
      await Promise.all([queue.clearMessages(), poison.clearMessages(), ...[MAILBOX_PAUSE_TABLE, DAILY_RECIPIENT_TABLE, SEND_LEDGER_TABLE].map(emptyTable)]);
      local.stack.smtp.messages.length = 0;
      local.stack.smtp.resetStats();
      local.stack.oauth.resetStats();
      local.stack.graph?.resetStats();
    });

    it("DAILY_RECIPIENT_LIMIT=5, four messages of 2 recipients: 2 delivered, 2 wait in the queue, one log line", { timeout: 30_000 }, async () => {
      const recipients = [
        { to: ["a0@example.test", "b0@example.test"] },
        { to: "a1@example.test", cc: "b1@example.test" },
        { to: "a2@example.test", bcc: "b2@example.test" },
        { to: "a3@example.test", cc: "b3@example.test" },
      ];
      for (const [i, r] of recipients.entries()) await enqueueEmail(queue, { ...r, subject: `Daily ${i}`, text: "x" });
      const logger = capturingLogger();
      const began = Date.now();
      const result = await drain({ ...smtpEnv(), DAILY_RECIPIENT_LIMIT: "5" }, logger);

      assert.deepEqual({ sent: result.sent, waited: result.waited, poisoned: result.poisoned, retried: result.retried }, { sent: 2, waited: 2, poisoned: 0, retried: 0 });
      assert.equal(local.stack.smtp.messages.length, 2);
      assert.equal((await queue.getProperties()).approximateMessagesCount, 2, "the two that wait are still in the queue");
      assert.deepEqual(await readPoison(result.mailer), []);
      const reached = events(logger, "limits.daily_recipients_reached");
      assert.equal(reached.length, 1, "logged once for the exhaustion, not per message");
      assert.equal(reached[0]?.level, "warn");
      assert.deepEqual({ limit: reached[0]?.limit, used: reached[0]?.used, recipients: reached[0]?.recipients }, { limit: 5, used: 4, recipients: 2 });
      const freesAt = Date.parse(String(reached[0]?.freesAt));
      assert.ok(freesAt > began + 24 * HOUR && freesAt <= Date.now() + 24 * HOUR + 10 * 60_000, `frees at ${String(reached[0]?.freesAt)}`);
      const deferred = events(logger, "message.deferred");
      assert.deepEqual(deferred.map((r) => r.code), ["DAILY_RECIPIENT_LIMIT", "DAILY_RECIPIENT_LIMIT"]);
      for (const r of deferred) assert.ok(Number(r.afterSeconds) > 24 * 3600, `hidden for ${String(r.afterSeconds)} s`);
      // The ledger says the waiting ones were refused, not "may have been delivered": their next
      // delivery is a plain first send, without the resend warning.
      const ledger = await openTable(storage, SEND_LEDGER_TABLE);
      const rows: Array<{ status: string; lastError?: string }> = [];
      // The "mid:" rows are the ledger's Message-ID index (sendLedger.ts), not records.
      for await (const row of ledger.listEntities<{ status: string; lastError?: string }>()) if (!row.rowKey?.startsWith("mid:")) rows.push(row);
      assert.deepEqual(rows.map((r) => `${r.status} ${r.lastError ?? ""}`.trim()).sort(), ["failed DAILY_RECIPIENT_LIMIT", "failed DAILY_RECIPIENT_LIMIT", "sent", "sent"]);
    });

    it("To, Cc and Bcc all count: 3 recipients over a limit of 2 is poisoned with its own code", { timeout: 30_000 }, async () => {
      await enqueueEmail(queue, { to: "a@example.test", cc: "b@example.test", bcc: "c@example.test", subject: "Too many", text: "x" });
      const result = await drain({ ...smtpEnv(), DAILY_RECIPIENT_LIMIT: "2" }, capturingLogger());
      assert.deepEqual({ sent: result.sent, waited: result.waited, poisoned: result.poisoned }, { sent: 0, waited: 0, poisoned: 1 });
      const [record] = await readPoison(result.mailer);
      assert.equal(record?.reason.code, "DAILY_RECIPIENT_LIMIT_EXCEEDED_BY_MESSAGE");
      assert.equal(local.stack.smtp.stats.connections, 0);
    });

    it("a mailbox paused by another instance defers its mail without touching the SMTP server", { timeout: 30_000 }, async () => {
      await tableMailboxPause(storage, LOCAL_MAILBOX).pauseUntil(new Date(Date.now() + 120_000), "GRAPH_THROTTLED");
      await enqueueEmail(queue, { to: "paused@example.test", subject: "Paused", text: "x" });
      const logger = capturingLogger();
      const result = await drain(smtpEnv(), logger);

      assert.deepEqual({ sent: result.sent, waited: result.waited, poisoned: result.poisoned, retried: result.retried }, { sent: 0, waited: 1, poisoned: 0, retried: 0 });
      assert.equal(local.stack.smtp.stats.connections, 0, "no SMTP connection");
      assert.equal(local.stack.oauth.stats.tokenRequests, 0, "not even a token");
      assert.equal((await queue.getProperties()).approximateMessagesCount, 1);
      const [deferred] = events(logger, "message.deferred");
      assert.equal(deferred?.code, "MAILBOX_PAUSED");
      assert.ok(Number(deferred?.afterSeconds) > 110 && Number(deferred?.afterSeconds) <= 120, `waits ${String(deferred?.afterSeconds)} s`);
      assert.deepEqual(await readPoison(result.mailer), []);
    });

    it("Graph's 429 with Retry-After pauses the mailbox: this instance's message and every other instance's wait, no request reaches Graph", { timeout: 30_000 }, async () => {
      const graph = local.stack.graph;
      assert.ok(graph, "the stack runs the Graph double");
      graph.throttle(LOCAL_MAILBOX, { retryAfterSeconds: 90, count: 1 });
      await enqueueEmail(queue, { to: "first@example.test", subject: "Throttled", text: "x" });
      const first = capturingLogger();
      const throttled = await drain(local.stack.env, first);

      assert.deepEqual({ sent: throttled.sent, waited: throttled.waited, poisoned: throttled.poisoned, retried: throttled.retried }, { sent: 0, waited: 1, poisoned: 0, retried: 0 });
      assert.deepEqual(graph.requests.map((r) => `${r.kind} ${r.status}`), ["sendMail 429"]);
      assert.deepEqual(events(first, "message.deferred").map((r) => [r.code, r.afterSeconds]), [["GRAPH_THROTTLED", 90]]);
      const paused = events(first, "limits.mailbox_paused");
      assert.equal(paused.length, 1);
      assert.deepEqual({ code: paused[0]?.code, seconds: paused[0]?.seconds }, { code: "GRAPH_THROTTLED", seconds: 90 });
      assert.equal(await recipientsCounted(LOCAL_MAILBOX), 0, "the refused send gave its recipient back");

      // Another instance (a new process: nothing cached) holds its mail without asking Graph.
      await enqueueEmail(queue, { to: "second@example.test", subject: "Held 1", text: "x" });
      await enqueueEmail(queue, { to: "third@example.test", subject: "Held 2", text: "x" });
      local.stack.oauth.resetStats();
      const second = capturingLogger();
      const held = await drain(local.stack.env, second);

      assert.deepEqual({ sent: held.sent, waited: held.waited, poisoned: held.poisoned }, { sent: 0, waited: 2, poisoned: 0 });
      assert.equal(graph.requests.length, 1, "no request after the 429");
      assert.equal(local.stack.oauth.stats.tokenRequests, 0, "not even a token");
      const deferred = events(second, "message.deferred");
      assert.deepEqual(deferred.map((r) => r.code), ["MAILBOX_PAUSED", "MAILBOX_PAUSED"]);
      for (const r of deferred) assert.ok(Number(r.afterSeconds) > 80 && Number(r.afterSeconds) <= 90, `waits ${String(r.afterSeconds)} s`);
      assert.equal((await queue.getProperties()).approximateMessagesCount, 3);
      assert.deepEqual(await readPoison(held.mailer), []);
    });
  });
});
