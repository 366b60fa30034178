// The suppression list (issue 13) against real Azurite, and the sender reading it through the real
// worker, queue and SMTP server: bounce reports (the fixtures, parsed) become entries exactly once;
// soft bounces count per distinct message within 7 days; the ledger turns a bounce's Message-ID back
// into our id; `queue-mailer suppression` lists, adds and removes; a message whose recipients are all
// suppressed is poisoned with RECIPIENT_SUPPRESSED without reaching the server, and suppressed
// recipients of a message with others are left out of envelope and headers alike.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { before, describe, it } from "node:test";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import { parseBounce, type BounceReport } from "../shared/bounces/parseBounce.js";
import { bounceEventsOf, suppressionSnapshot, tableSuppressionList, type BounceEvent, type SuppressionList } from "../shared/bounces/suppressionList.js";
import { loadStorageConfig, type StorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { readDeliveryEvents } from "../shared/events/deliveryEvents.js";
import { openMailQueues, type MailQueues } from "../shared/queue/mailQueue.js";
import { SEND_LEDGER_TABLE, sentMessageIndex } from "../shared/send/sendLedger.js";
import { openTable, tableKey } from "../shared/storage/storageClients.js";
import { messageIdFor } from "../shared/transport/mailOptions.js";
import { spawnCli } from "./support/cli.js";
import { capturingLogger, drain, readPoison, useLocalStack, type CapturedLogger } from "./support/harness.js";

interface LogRecord {
  level: string;
  event: string;
  [field: string]: unknown;
}

const records = (logger: CapturedLogger, event: string): LogRecord[] => logger.lines.map((l) => JSON.parse(l) as LogRecord).filter((r) => r.event === event);
const DAY = 24 * 60 * 60 * 1000;

async function report(name: string): Promise<BounceReport> {
  const parsed = await parseBounce(readFileSync(new URL(`./fixtures/bounces/${name}`, import.meta.url)));
  assert.ok(parsed.bounce, `${name} is a bounce`);
  return parsed.report;
}

function softBounce(address: string, messageId: string, at: Date): BounceEvent {
  return { address, status: "4.2.2", kind: "soft", action: "delayed", diagnostic: "452 4.2.2 Mailbox full", messageId, at };
}

describe("suppression list and the sender", () => {
  const local = useLocalStack("qm-suppress-");
  const env = (extra: Record<string, string> = {}) => ({ ...local.stack.env, MAIL_QUEUE: "suppress-mail", RETRY_BASE_SECONDS: "0", ...extra });
  let storage: StorageConfig;
  let queues: MailQueues;
  let list: SuppressionList;

  before(async () => {
    storage = loadStorageConfig(env());
    queues = await openMailQueues(storage);
    list = tableSuppressionList(storage, capturingLogger());
  });

  it("a hard bounce suppresses its recipients once, even when the report is recorded twice", { timeout: 20_000 }, async () => {
    const logger = capturingLogger();
    const bounces = tableSuppressionList(storage, logger);
    const parsed = await report("rfc3464.eml");
    const events = bounceEventsOf(parsed, { messageId: parsed.originalMessageId ?? "", id: "bounce-rfc3464" });
    const first = [];
    for (const event of events) first.push(await bounces.recordBounce(event));
    const second = [];
    for (const event of events) second.push(await bounces.recordBounce(event));

    assert.deepEqual(first.map((r) => [r.address, r.duplicate, r.suppressed, r.newlySuppressed]), [["ghost@fabrikam.test", false, true, true], ["old.team@fabrikam.test", false, true, true]]);
    assert.deepEqual(second.map((r) => [r.address, r.duplicate, r.suppressed, r.newlySuppressed]), [["ghost@fabrikam.test", true, true, false], ["old.team@fabrikam.test", true, true, false]]);

    const entries = (await bounces.list()).filter((e) => e.address.endsWith("@fabrikam.test"));
    assert.deepEqual(entries.map((e) => [e.address, e.source, e.status, e.kind, e.id, e.messageId, e.at]), [
      ["ghost@fabrikam.test", "bounce", "5.1.1", "hard", "bounce-rfc3464", messageIdFor("bounce-rfc3464", LOCAL_MAILBOX), "2026-11-23T09:14:06.000Z"],
      ["old.team@fabrikam.test", "bounce", "5.2.1", "hard", "bounce-rfc3464", messageIdFor("bounce-rfc3464", LOCAL_MAILBOX), "2026-11-23T09:14:06.000Z"],
    ]);
    assert.match(entries[0]?.reason ?? "", /^hard bounce 5\.1\.1: 550 5\.1\.1 <ghost@fabrikam\.test>: Recipient address rejected/);

    // One bounce.recorded per recipient (what an alert rule counts), the second reading logged as a duplicate.
    const recorded = records(logger, "bounce.recorded");
    assert.deepEqual(recorded.map((r) => [r.recipient, r.status, r.kind, r.id, r.messageId, r.suppressed, r.newlySuppressed]), [
      ["ghost@fabrikam.test", "5.1.1", "hard", "bounce-rfc3464", messageIdFor("bounce-rfc3464", LOCAL_MAILBOX), true, true],
      ["old.team@fabrikam.test", "5.2.1", "hard", "bounce-rfc3464", messageIdFor("bounce-rfc3464", LOCAL_MAILBOX), true, true],
    ]);
    assert.equal(records(logger, "bounce.duplicate").length, 2);
    // The same address from another report: a new event, still one entry (the first one stays).
    const again = await bounces.recordBounce({ address: "Ghost@Fabrikam.test", status: "5.1.1", kind: "hard", messageId: "<qm.other@contoso.test>", at: new Date("2026-11-24T00:00:00Z") });
    assert.deepEqual([again.duplicate, again.suppressed, again.newlySuppressed], [false, true, false]);
    assert.equal((await bounces.list()).filter((e) => e.address === "ghost@fabrikam.test").length, 1);
  });

  it("soft bounces: two messages in 7 days do not suppress, a third does; a report read twice counts once", { timeout: 20_000 }, async () => {
    const logger = capturingLogger();
    const bounces = tableSuppressionList(storage, logger, { softBounceLimit: 3 });
    const parsed = await report("soft-4xx.eml");
    const [fromFixture] = bounceEventsOf(parsed, { messageId: parsed.originalMessageId ?? "", id: "bounce-soft" });
    assert.ok(fromFixture);
    const t0 = fromFixture.at.getTime();

    const one = await bounces.recordBounce(fromFixture);
    const oneAgain = await bounces.recordBounce(fromFixture);
    const two = await bounces.recordBounce(softBounce("busy@woodgrove.test", "<qm.soft-2@contoso.test>", new Date(t0 + DAY)));
    assert.deepEqual([one.softBounces, one.suppressed, oneAgain.duplicate, two.softBounces, two.suppressed], [1, false, true, 2, false]);
    assert.equal(await bounces.isSuppressed("busy@woodgrove.test"), false, "two soft bounces do not suppress");

    const three = await bounces.recordBounce(softBounce("BUSY@woodgrove.test", "<qm.soft-3@contoso.test>", new Date(t0 + 3 * DAY)));
    assert.deepEqual([three.softBounces, three.suppressed, three.newlySuppressed], [3, true, true]);
    const [entry] = (await bounces.lookup(["busy@woodgrove.test"])).values();
    assert.deepEqual([entry?.source, entry?.kind, entry?.softBounces, entry?.status], ["bounce", "soft", 3, "4.2.2"]);
    assert.match(entry?.reason ?? "", /^3 soft bounces within 7 days/);
    assert.deepEqual(records(logger, "bounce.recorded").map((r) => r.softBounces), [1, 2, 3]);

    // Spread over more than 7 days: the first has left the window when the third comes.
    for (const [n, days] of [[1, 0], [2, 4], [3, 8]] as const) {
      const result = await bounces.recordBounce(softBounce("slow@woodgrove.test", `<qm.slow-${n}@contoso.test>`, new Date(t0 + days * DAY)));
      assert.equal(result.suppressed, false, `soft bounce ${n} of slow@`);
    }
  });

  it("removing an address lets it get mail again and its earlier soft bounces stop counting", { timeout: 20_000 }, async () => {
    const bounces = tableSuppressionList(storage, capturingLogger(), { softBounceLimit: 2 });
    const t0 = Date.now() - 2 * DAY;
    await bounces.recordBounce(softBounce("flaky@woodgrove.test", "<qm.flaky-1@contoso.test>", new Date(t0)));
    assert.equal((await bounces.recordBounce(softBounce("flaky@woodgrove.test", "<qm.flaky-2@contoso.test>", new Date(t0 + 1000)))).newlySuppressed, true);
    assert.equal(await bounces.remove("flaky@woodgrove.test"), true);
    assert.equal(await bounces.remove("flaky@woodgrove.test"), false, "not on the list any more");
    const next = await bounces.recordBounce(softBounce("flaky@woodgrove.test", "<qm.flaky-3@contoso.test>", new Date()));
    assert.deepEqual([next.softBounces, next.suppressed], [1, false]);
  });

  it("lookup reads many addresses at once and normalizes them (case, angle brackets, IDN domain)", { timeout: 20_000 }, async () => {
    await list.add("José@Exämple.test", "test");
    const addresses = Array.from({ length: 40 }, (_, i) => `nobody-${i}@example.test`);
    const found = await list.lookup([...addresses, "<josé@xn--exmple-cua.test>", "GHOST@fabrikam.test", "ghost@fabrikam.test"]);
    assert.deepEqual([...found.keys()].sort(), ["ghost@fabrikam.test", "josé@xn--exmple-cua.test"]);
  });

  it("the sender's snapshot: one list read for many checks; a new entry counts from the next refresh", { timeout: 20_000 }, async () => {
    const table = tableSuppressionList(storage, capturingLogger());
    let reads = 0;
    const counted: SuppressionList = { ...table, list: async () => (reads++, table.list()) };
    let clock = 1_000_000;
    const snapshot = suppressionSnapshot(counted, 60_000, capturingLogger(), () => clock);
    await table.add("snap-old@example.test", "test");
    const checks = await Promise.all(Array.from({ length: 20 }, (_, i) => snapshot.lookup([`Snap-Old@Example.test`, `fresh-${i}@example.test`])));
    assert.ok(checks.every((found) => [...found.keys()].join() === "snap-old@example.test"));
    assert.equal(reads, 1, "20 concurrent checks share one read of the list");
    await table.add("snap-new@example.test", "test");
    clock += 59_000;
    assert.equal(await snapshot.isSuppressed("snap-new@example.test"), false, "not before the refresh");
    clock += 2_000;
    assert.equal(await snapshot.isSuppressed("snap-new@example.test"), true, "after the refresh");
    assert.equal(reads, 2);
    await table.remove("snap-old@example.test");
    await table.remove("snap-new@example.test");
  });

  it("the ledger turns a bounce's Message-ID back into our message id", { timeout: 30_000 }, async () => {
    await enqueueEmail(queues.queue, { id: "sup-ledger-1", to: "reader@example.test", subject: "Ledger", text: "x" });
    const run = await drain(env(), capturingLogger());
    assert.equal(run.sent, 1);
    const index = sentMessageIndex(storage);
    assert.deepEqual(await index.find(messageIdFor("sup-ledger-1", LOCAL_MAILBOX)), { id: "sup-ledger-1", messageId: messageIdFor("sup-ledger-1", LOCAL_MAILBOX), sentAt: (await index.find(messageIdFor("sup-ledger-1", LOCAL_MAILBOX)))?.sentAt });
    // A server that changed the domain's case still matches; a Message-ID we never sent does not.
    assert.equal((await index.find(messageIdFor("sup-ledger-1", LOCAL_MAILBOX).replace("contoso.test", "CONTOSO.TEST")))?.id, "sup-ledger-1");
    assert.equal(await index.find(messageIdFor("never-sent-4711", LOCAL_MAILBOX)), undefined);
    assert.equal(await index.find("<20261123091406.4Zk9Ql6X3Tz9sRq@mx1.fabrikam.test>"), undefined);
  });

  it("a message whose recipients are all suppressed is poisoned with RECIPIENT_SUPPRESSED and never reaches the server", { timeout: 30_000 }, async () => {
    await list.add("blocked@example.test", "asked not to be mailed");
    const delivered = local.stack.smtp.messages.length;
    // ghost@ bounced (first test); blocked@ was added by hand; one of them only as Bcc.
    await enqueueEmail(queues.queue, { id: "sup-all", to: "Ghost <GHOST@fabrikam.test>", bcc: "blocked@example.test", subject: "All suppressed", text: "x" });
    const logger = capturingLogger();
    const run = await drain(env(), logger);
    assert.deepEqual({ sent: run.sent, poisoned: run.poisoned }, { sent: 0, poisoned: 1 });
    assert.equal(local.stack.smtp.messages.length, delivered, "nothing reached the SMTP server");
    const poisoned = await readPoison(run.mailer);
    assert.equal(poisoned.length, 1);
    const [record] = poisoned;
    assert.equal(record?.reason.code, "RECIPIENT_SUPPRESSED");
    assert.match(record?.reason.message ?? "", /GHOST@fabrikam\.test \(bounce: hard bounce 5\.1\.1/);
    assert.match(record?.reason.message ?? "", /blocked@example\.test \(manual: asked not to be mailed\)/);
    const events = await readDeliveryEvents(storage, "sup-all");
    assert.deepEqual(events.map((e) => [e.event, e.code]), [["poisoned", "RECIPIENT_SUPPRESSED"]]);
    await queues.poison.clearMessages();
  });

  it("suppressed To, Cc and Bcc recipients are left out of envelope and headers; the others get the message", { timeout: 30_000 }, async () => {
    await list.add("bcc-blocked@example.test", "manual");
    await enqueueEmail(queues.queue, {
      id: "sup-some",
      to: ["Ada <ada@example.test>", "\"Ghost, The\" <ghost@fabrikam.test>"],
      cc: ["old.team@fabrikam.test", "carol@example.test"],
      bcc: ["bcc-blocked@example.test", "audit@example.test"],
      subject: "Some suppressed",
      text: "x",
    });
    const logger = capturingLogger();
    const run = await drain(env(), logger);
    assert.deepEqual({ sent: run.sent, poisoned: run.poisoned }, { sent: 1, poisoned: 0 });
    const message = local.stack.smtp.messages.find((m) => m.headers["message-id"]?.[0] === messageIdFor("sup-some", LOCAL_MAILBOX));
    assert.ok(message, "the message reached the server");
    assert.deepEqual(message.rcptTo.sort(), ["ada@example.test", "audit@example.test", "carol@example.test"]);
    assert.deepEqual(message.headers["to"], ["Ada <ada@example.test>"]);
    assert.deepEqual(message.headers["cc"], ["carol@example.test"]);
    assert.equal(message.headers["bcc"], undefined);
    assert.doesNotMatch(message.raw.toString("utf8"), /ghost|old\.team|bcc-blocked/i);

    const [dropped] = records(logger, "message.recipients_suppressed");
    assert.equal(dropped?.id, "sup-some");
    assert.equal(dropped?.remaining, 3);
    const who = (dropped?.suppressed as Array<{ address: string; field: string; source: string; reason: string; status?: string }>).map((r) => [r.address, r.field, r.source, r.status]);
    assert.deepEqual(who, [["ghost@fabrikam.test", "to", "bounce", "5.1.1"], ["old.team@fabrikam.test", "cc", "bounce", "5.2.1"], ["bcc-blocked@example.test", "bcc", "manual", undefined]]);
    assert.deepEqual(records(logger, "message.sent")[0]?.suppressed, ["ghost@fabrikam.test", "old.team@fabrikam.test", "bcc-blocked@example.test"]);

    // The ledger row and the delivery event say who was left out.
    const [sent] = await readDeliveryEvents(storage, "sup-some");
    assert.deepEqual([sent?.event, sent?.suppressed], ["sent", ["ghost@fabrikam.test", "old.team@fabrikam.test", "bcc-blocked@example.test"]]);
    const row = await (await openTable(storage, SEND_LEDGER_TABLE)).getEntity<{ status: string; suppressed?: string }>("sent", tableKey("sup-some"));
    assert.deepEqual([row.status, row.suppressed], ["sent", "ghost@fabrikam.test, old.team@fabrikam.test, bcc-blocked@example.test"]);
  });

  it("SUPPRESSION_CHECK=false sends to everyone", { timeout: 30_000 }, async () => {
    await enqueueEmail(queues.queue, { id: "sup-off", to: "blocked@example.test", subject: "Unchecked", text: "x" });
    const run = await drain(env({ SUPPRESSION_CHECK: "false" }), capturingLogger());
    assert.equal(run.sent, 1);
    assert.deepEqual(local.stack.smtp.messages.find((m) => m.headers["message-id"]?.[0] === messageIdFor("sup-off", LOCAL_MAILBOX))?.rcptTo, ["blocked@example.test"]);
  });

  it("`queue-mailer suppression add`, `list` and `remove`", { timeout: 60_000 }, async () => {
    const cliEnv = env();
    const added = await spawnCli(["suppression", "add", "Cli.User@Example.test", "--reason", "complained"], { env: cliEnv });
    assert.equal(added.status, 0, added.stderr);
    assert.match(added.stdout, /suppressed cli\.user@example\.test: complained/);

    const json = await spawnCli(["suppression", "list", "--json"], { env: cliEnv });
    assert.equal(json.status, 0, json.stderr);
    const listed = JSON.parse(json.stdout) as { table: string; count: number; entries: Array<{ address: string; source: string; reason: string }> };
    assert.equal(listed.table, "suppressions");
    assert.deepEqual(listed.entries.find((e) => e.address === "cli.user@example.test"), { address: "cli.user@example.test", source: "manual", reason: "complained", at: (listed.entries.find((e) => e.address === "cli.user@example.test") as { at?: string } | undefined)?.at });
    assert.ok(listed.entries.some((e) => e.address === "ghost@fabrikam.test" && e.source === "bounce"), "bounced addresses are listed too");
    assert.equal(listed.count, listed.entries.length);

    const text = await spawnCli(["suppression", "list"], { env: cliEnv });
    assert.match(text.stdout, /^ADDRESS\s+SOURCE\s+SINCE\s+STATUS\s+MESSAGE ID\s+REASON/m);
    assert.match(text.stdout, /^ghost@fabrikam\.test\s+bounce\s+2026-11-23T09:14:06\.000Z\s+5\.1\.1\s+bounce-rfc3464\s+hard bounce 5\.1\.1/m);

    const removed = await spawnCli(["suppression", "remove", "cli.user@example.test"], { env: cliEnv });
    assert.equal(removed.status, 0, removed.stderr);
    assert.equal(await list.isSuppressed("cli.user@example.test"), false);
    const again = await spawnCli(["suppression", "remove", "cli.user@example.test"], { env: cliEnv });
    assert.equal(again.status, 1, "not on the list");
    assert.match(again.stdout, /is not on the suppression list/);

    const bad = await spawnCli(["suppression", "add", "not-an-address"], { env: cliEnv });
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /not an email address/);
  });
});
