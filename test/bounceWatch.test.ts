// The bounce watch (issue 13) end to end: real Dovecot on loopback that accepts only XOAUTH2 (as
// Exchange Online) and checks every token with the local OAuth server (IMAP.AccessAsApp plus a
// mailbox permission), the local stack (Azurite, OAuth server, SMTP sink), and the originals sent
// through our own pipeline so that the send ledger knows their Message-IDs. Each report becomes the
// right suppression entry exactly once (also with two passes at once), ordinary mail stays where it
// is and unseen, reports end in the done folder, and the next message to a bounced address goes to
// the other recipients only. A malformed report, a report for a message we never sent and a refused
// IMAP login each give one log line and lose nothing. One Dovecot and one stack for the whole file.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, it } from "node:test";
import functionsModule from "@azure/functions";
import { LOCAL_CLIENT_ID, LOCAL_MAILBOX } from "../cli/local/localStack.js";
import { createBounceWatch, type BouncePassResult, type BounceWatch } from "../shared/bounces/bounceWatch.js";
import { tableBounceWatchState } from "../shared/bounces/bounceWatchState.js";
import { tableSuppressionList, type SuppressionList } from "../shared/bounces/suppressionList.js";
import { loadBounceConfig, loadStorageConfig, type BounceConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { readDeliveryEvents } from "../shared/events/deliveryEvents.js";
import { openMailQueues, type MailQueues } from "../shared/queue/mailQueue.js";
import { messageIdFor } from "../shared/transport/mailOptions.js";
import { spawnCli } from "./support/cli.js";
import { dovecotAvailable, startDovecot, type Dovecot } from "./support/dovecot.js";
import { capturingLogger, drain, readPoison, rejectionOf, useLocalStack, type CapturedLogger } from "./support/harness.js";

const unavailable = dovecotAvailable();
const DONE = "queue-mailer-processed";
const { InvocationContext } = functionsModule;

interface LogRecord {
  level: string;
  event: string;
  [field: string]: unknown;
}

const fixture = (name: string): string => readFileSync(new URL(`./fixtures/bounces/${name}`, import.meta.url), "utf8");

/**
 * An RFC 3464 report (the Postfix fixture) for our message `id`, bouncing `first` (5.1.1) and
 * `second` (5.2.1), with a Message-ID of its own.
 */
function reportFor(id: string, first: string, second: string): string {
  return fixture("rfc3464.eml")
    .replaceAll("qm.InbQ-Sem78JgiVSXINDndAcPVz2_I-ur@contoso.test", messageIdFor(id, LOCAL_MAILBOX).slice(1, -1))
    .replaceAll("20261123091406.4Zk9Ql6X3Tz9sRq@mx1.fabrikam.test", `${id}.report@mx1.fabrikam.test`)
    .replace(/ghost@fabrikam\.test/gi, first)
    .replace(/old\.team@fabrikam\.test/gi, second);
}

/** The originals the reports bounce, sent through the real pipeline so the ledger indexes their Message-IDs. */
const ORIGINALS: Array<{ id: string; to: string[] }> = [
  { id: "bounce-rfc3464", to: ["ghost@fabrikam.test", "\"Team, Old\" <Old.Team@Fabrikam.test>", "ada@fabrikam.test"] },
  { id: "bounce-exchange", to: ["nobody@northwind.test"] },
  { id: "bounce-gmail", to: ["grace.hopper.typo@gmail.com"] },
  { id: "bounce-soft", to: ["busy@woodgrove.test"] },
  ...["concurrent-1", "concurrent-2", "concurrent-3", "no-lease-1", "no-lease-2", "auth-refused", "cli-pass", "timer-pass"].map((id) => ({ id, to: [`${id}.a@fabrikam.test`, `${id}.b@fabrikam.test`] })),
];

describe("bounce watch: IMAP (Dovecot, XOAUTH2) → suppression list", { skip: unavailable ?? false }, () => {
  const local = useLocalStack("qm-bounces-", { imap: true });
  let imap: Dovecot;
  let env: Record<string, string>;
  let config: BounceConfig;
  let queues: MailQueues;
  let suppressions: SuppressionList;
  /** Every logger of the file, checked for secrets at the end. */
  const loggers: CapturedLogger[] = [];
  const cliOutput: string[] = [];

  const newLogger = (): CapturedLogger => {
    const logger = capturingLogger();
    loggers.push(logger);
    return logger;
  };
  const records = (logger: CapturedLogger, event?: string): LogRecord[] => logger.lines.map((l) => JSON.parse(l) as LogRecord).filter((r) => event === undefined || r.event === event);
  const stored = async (folder: string) => (await imap.list(LOCAL_MAILBOX, folder)).map((m) => ({ messageId: /^message-id:\s*(\S+)/im.exec(m.raw.toString("utf8"))?.[1], flags: m.flags }));
  const watch = (extra: Record<string, string> = {}): BounceWatch => createBounceWatch(loadBounceConfig({ ...env, ...extra }));

  before(async () => {
    imap = await startDovecot({ oauth: local.stack.oauth, users: [LOCAL_MAILBOX], mechanisms: ["xoauth2"] });
    env = { ...local.stack.env, MAIL_QUEUE: "bounce-mail", RETRY_BASE_SECONDS: "0", IMAP_HOST: imap.host, IMAP_PORT: String(imap.port) };
    config = loadBounceConfig(env);
    suppressions = tableSuppressionList(config.storage, capturingLogger());
    queues = await openMailQueues(loadStorageConfig(env));
    for (const original of ORIGINALS) await enqueueEmail(queues.queue, { id: original.id, to: original.to, subject: `Original ${original.id}`, text: "x" });
    const run = await drain(env, newLogger());
    assert.equal(run.sent, ORIGINALS.length);
  });

  after(async () => {
    await imap?.stop();
  });

  it("each report becomes its suppression entry once and moves to the done folder; other mail stays, unseen", { timeout: 30_000 }, async () => {
    for (const name of ["rfc3464.eml", "ordinary.eml", "exchange-ndr.eml", "gmail.eml", "auto-reply.eml", "soft-4xx.eml"]) await imap.deliver(LOCAL_MAILBOX, "INBOX", fixture(name));
    assert.deepEqual(await imap.folders(LOCAL_MAILBOX), ["INBOX"]);
    const logger = newLogger();
    const result = await watch().run(logger);

    assert.equal(result.examined, 6);
    assert.equal(result.notBounces, 2);
    assert.deepEqual(result.malformed, []);
    assert.deepEqual(
      result.reports.map((r) => [r.format, r.outcome, r.id, r.movedTo, r.recipients.map((p) => [p.address, p.status, p.kind, p.newlySuppressed])]),
      [
        ["rfc3464", "recorded", "bounce-rfc3464", DONE, [["ghost@fabrikam.test", "5.1.1", "hard", true], ["old.team@fabrikam.test", "5.2.1", "hard", true]]],
        ["exchange", "recorded", "bounce-exchange", DONE, [["nobody@northwind.test", "5.1.10", "hard", true]]],
        ["gmail", "recorded", "bounce-gmail", DONE, [["grace.hopper.typo@gmail.com", "5.1.1", "hard", true]]],
        ["rfc3464", "recorded", "bounce-soft", DONE, [["busy@woodgrove.test", "4.2.2", "soft", false]]],
      ],
    );
    assert.deepEqual(result.suppressed, ["ghost@fabrikam.test", "old.team@fabrikam.test", "nobody@northwind.test", "grace.hopper.typo@gmail.com"]);

    // The suppression list: one entry per hard-bounced address, with the original's id; the soft one is counted, not suppressed.
    const entries = await suppressions.list();
    assert.deepEqual(entries.map((e) => [e.address, e.source, e.status, e.kind, e.id, e.messageId]), [
      ["ghost@fabrikam.test", "bounce", "5.1.1", "hard", "bounce-rfc3464", messageIdFor("bounce-rfc3464", LOCAL_MAILBOX)],
      ["grace.hopper.typo@gmail.com", "bounce", "5.1.1", "hard", "bounce-gmail", messageIdFor("bounce-gmail", LOCAL_MAILBOX)],
      ["nobody@northwind.test", "bounce", "5.1.10", "hard", "bounce-exchange", messageIdFor("bounce-exchange", LOCAL_MAILBOX)],
      ["old.team@fabrikam.test", "bounce", "5.2.1", "hard", "bounce-rfc3464", messageIdFor("bounce-rfc3464", LOCAL_MAILBOX)],
    ]);
    assert.equal(await suppressions.isSuppressed("busy@woodgrove.test"), false);
    const recorded = records(logger, "bounce.recorded");
    assert.deepEqual(recorded.map((r) => [r.recipient, r.id]).sort(), [
      ["busy@woodgrove.test", "bounce-soft"],
      ["ghost@fabrikam.test", "bounce-rfc3464"],
      ["grace.hopper.typo@gmail.com", "bounce-gmail"],
      ["nobody@northwind.test", "bounce-exchange"],
      ["old.team@fabrikam.test", "bounce-rfc3464"],
    ]);
    assert.equal(records(logger, "bounce.recorded").find((r) => r.recipient === "busy@woodgrove.test")?.softBounces, 1);
    // Each bounce joins its message's history, after the send.
    const history = await readDeliveryEvents(config.storage, "bounce-rfc3464");
    assert.deepEqual(history.map((e) => e.event), ["sent", "bounced", "bounced"]);
    assert.deepEqual(history.filter((e) => e.event === "bounced").map((e) => [e.recipient, e.code, e.messageId, e.suppressed]).sort(), [
      ["ghost@fabrikam.test", "5.1.1", messageIdFor("bounce-rfc3464", LOCAL_MAILBOX), ["ghost@fabrikam.test"]],
      ["old.team@fabrikam.test", "5.2.1", messageIdFor("bounce-rfc3464", LOCAL_MAILBOX), ["old.team@fabrikam.test"]],
    ]);
    const softHistory = await readDeliveryEvents(config.storage, "bounce-soft");
    assert.deepEqual(softHistory.map((e) => [e.event, e.recipient, e.code, e.suppressed]), [["sent", undefined, undefined, undefined], ["bounced", "busy@woodgrove.test", "4.2.2", undefined]]);

    // Reports in the done folder; ordinary mail and the auto-reply where they were, not even \Seen.
    assert.deepEqual(await imap.folders(LOCAL_MAILBOX), ["INBOX", DONE]);
    assert.deepEqual(await stored("INBOX"), [
      { messageId: "<CAF3x9+Yq2Lr8Hn5Tz1Wd0Ke6Qm4Pj7Vs@mail.fabrikam.test>", flags: [] },
      { messageId: "<DB9PR01MB5555E1F2A3B4C5D6E7F8A9B0C1D2@DB9PR01MB5555.eurprd01.prod.exchangelabs.com>", flags: [] },
    ]);
    assert.equal((await stored(DONE)).length, 4);
    const summary = records(logger, "bounces.checked")[0];
    assert.deepEqual([summary?.examined, summary?.recorded, summary?.unmatched, summary?.malformed, summary?.notBounces], [6, 4, 0, 0, 2]);

    // The next pass finds nothing new: nothing recorded, nothing moved, ordinary mail not read again.
    const again = newLogger();
    const second = await watch().run(again);
    assert.deepEqual([second.examined, second.reports.length, second.notBounces], [0, 0, 0]);
    assert.deepEqual(records(again, "bounce.recorded"), []);
    assert.equal((await stored(DONE)).length, 4);
    assert.equal((await stored("INBOX")).length, 2);
  });

  it("the next message to a bounced address goes to the other recipients only; one only to bounced addresses is poisoned", { timeout: 30_000 }, async () => {
    await enqueueEmail(queues.queue, { id: "after-bounce", to: ["Ghost <ghost@fabrikam.test>", "Ada <ada@fabrikam.test>"], cc: "nobody@northwind.test", subject: "After the bounce", text: "x" });
    await enqueueEmail(queues.queue, { id: "only-bounced", to: "grace.hopper.typo@gmail.com", bcc: "old.team@fabrikam.test", subject: "Nobody left", text: "x" });
    const run = await drain(env, newLogger());
    assert.deepEqual({ sent: run.sent, poisoned: run.poisoned }, { sent: 1, poisoned: 1 });
    const message = local.stack.smtp.messages.find((m) => m.headers["message-id"]?.[0] === messageIdFor("after-bounce", LOCAL_MAILBOX));
    assert.ok(message, "the message reached the SMTP server");
    assert.deepEqual(message.rcptTo, ["ada@fabrikam.test"]);
    assert.deepEqual(message.headers["to"], ["Ada <ada@fabrikam.test>"]);
    assert.equal(message.headers["cc"], undefined);
    assert.doesNotMatch(message.raw.toString("utf8"), /ghost|nobody@northwind/i);
    assert.equal(local.stack.smtp.messages.some((m) => m.headers["message-id"]?.[0] === messageIdFor("only-bounced", LOCAL_MAILBOX)), false);
    const [poisoned] = await readPoison(run.mailer);
    assert.equal(poisoned?.reason.code, "RECIPIENT_SUPPRESSED");
    await queues.poison.clearMessages();
  });

  it("a malformed report and a report for a message we never sent: one log line each, nothing recorded, left in the folder", { timeout: 30_000 }, async () => {
    await imap.deliver(LOCAL_MAILBOX, "INBOX", fixture("malformed.eml"));
    await imap.deliver(LOCAL_MAILBOX, "INBOX", fixture("unknown-message.eml"));
    const logger = newLogger();
    const result = await watch().run(logger);
    assert.equal(result.examined, 2);

    const [malformed] = records(logger, "bounce.malformed");
    assert.equal(records(logger, "bounce.malformed").length, 1);
    assert.deepEqual([malformed?.level, malformed?.code, malformed?.reportMessageId, malformed?.folder, typeof malformed?.uid], ["warn", "BOUNCE_MALFORMED", "<ndr.20261124113001.77@gateway.litware.test>", "INBOX", "number"]);
    assert.match(String(malformed?.reason), /recipient 1: no usable Final-Recipient/);
    assert.doesNotMatch(JSON.stringify(malformed), /Your message could not be delivered/, "the report's content stays out of the log");
    assert.deepEqual(result.malformed.map((m) => [m.code, m.reportMessageId]), [["BOUNCE_MALFORMED", "<ndr.20261124113001.77@gateway.litware.test>"]]);

    const unmatched = records(logger, "bounce.unmatched");
    assert.equal(unmatched.length, 1);
    assert.equal(unmatched[0]?.originalMessageId, messageIdFor("never-sent-4711", LOCAL_MAILBOX));
    assert.deepEqual(unmatched[0]?.recipients, [{ address: "nobody@tailspin.test", status: "5.1.1", kind: "hard", action: "failed" }]);
    assert.deepEqual(result.reports.map((r) => [r.outcome, r.id, r.movedTo]), [["unmatched", undefined, undefined]]);

    // Nothing recorded (a forged report suppresses nobody); both still in INBOX, unseen.
    assert.deepEqual(records(logger, "bounce.recorded"), []);
    assert.equal(await suppressions.isSuppressed("nobody@tailspin.test"), false);
    const inbox = await stored("INBOX");
    assert.deepEqual(inbox.slice(2), [
      { messageId: "<ndr.20261124113001.77@gateway.litware.test>", flags: [] },
      { messageId: /^message-id:\s*(\S+)/im.exec(fixture("unknown-message.eml"))?.[1], flags: [] },
    ]);

    // Logged once, not every five minutes.
    const next = newLogger();
    assert.equal((await watch().run(next)).examined, 0);
    assert.deepEqual([records(next, "bounce.malformed").length, records(next, "bounce.unmatched").length], [0, 0]);
  });

  it("two passes at once (two instances): one holds the lease, every report is recorded once and ends in the done folder", { timeout: 30_000 }, async () => {
    const ids = ["concurrent-1", "concurrent-2", "concurrent-3"];
    for (const id of ids) await imap.deliver(LOCAL_MAILBOX, "INBOX", reportFor(id, `${id}.a@fabrikam.test`, `${id}.b@fabrikam.test`));
    const [first, second] = [newLogger(), newLogger()];
    const results = await Promise.all([watch().run(first), watch().run(second)]);
    assert.deepEqual(results.map((r) => r.skipped !== undefined).sort(), [false, true], "one pass ran, the other found the lease taken");
    const ran = results.find((r) => r.skipped === undefined) as BouncePassResult;
    assert.deepEqual(ran.reports.map((r) => [r.id, r.outcome]), ids.map((id) => [id, "recorded"]));
    assert.equal([first, second].flatMap((l) => records(l, "bounces.skipped")).length, 1);
    const recorded = [first, second].flatMap((l) => records(l, "bounce.recorded")).map((r) => r.recipient as string).sort();
    assert.deepEqual(recorded, ids.flatMap((id) => [`${id}.a@fabrikam.test`, `${id}.b@fabrikam.test`]).sort());
    const done = (await stored(DONE)).map((m) => m.messageId);
    for (const id of ids) assert.equal(done.filter((m) => m === `<${id}.report@mx1.fabrikam.test>`).length, 1, `${id}'s report is in the done folder once`);
    assert.equal((await stored("INBOX")).length, 4, "only the ordinary, auto-reply, malformed and unmatched messages are left");

    // A pass that waits for the lease runs after the other and finds nothing new.
    await imap.deliver(LOCAL_MAILBOX, "INBOX", reportFor("no-lease-1", "no-lease-1.a@fabrikam.test", "no-lease-1.b@fabrikam.test"));
    const waited = await Promise.all([watch().run(newLogger(), { leaseWaitMs: 20_000 }), watch().run(newLogger(), { leaseWaitMs: 20_000 })]);
    assert.deepEqual(waited.map((r) => [r.skipped, r.examined]).sort(), [[undefined, 0], [undefined, 1]]);
  });

  it("without the lease (it ran out mid-pass) two passes over the same reports still record each once", { timeout: 30_000 }, async () => {
    // Both instances read the same folder at the same moment: recording is idempotent, and a
    // report the other one moved first is simply gone.
    await imap.deliver(LOCAL_MAILBOX, "INBOX", reportFor("no-lease-2", "no-lease-2.a@fabrikam.test", "no-lease-2.b@fabrikam.test"));
    const alwaysFree = () => ({ ...tableBounceWatchState(config.storage, config.imap), acquire: async () => ({ release: async () => undefined }) });
    const [first, second] = [newLogger(), newLogger()];
    await Promise.all([createBounceWatch(config, { state: alwaysFree() }).run(first), createBounceWatch(config, { state: alwaysFree() }).run(second)]);
    const recorded = [first, second].flatMap((l) => records(l, "bounce.recorded")).map((r) => r.recipient as string).sort();
    assert.deepEqual(recorded, ["no-lease-2.a@fabrikam.test", "no-lease-2.b@fabrikam.test"]);
    assert.equal((await suppressions.list()).filter((e) => e.address.startsWith("no-lease-2.")).length, 2);
    assert.equal((await stored(DONE)).filter((m) => m.messageId === "<no-lease-2.report@mx1.fabrikam.test>").length, 1);
  });

  it("an IMAP login the server refuses: IMAP_AUTH_FAILED logged as bounces.failed with the fix, nothing lost; connection failures too", { timeout: 30_000 }, async () => {
    await imap.deliver(LOCAL_MAILBOX, "INBOX", reportFor("auth-refused", "auth-refused.a@fabrikam.test", "auth-refused.b@fabrikam.test"));
    // Remove-MailboxPermission: the token is still good, the mailbox is no longer the app's.
    local.stack.oauth.removeMailboxPermission(LOCAL_CLIENT_ID, LOCAL_MAILBOX);
    const logger = newLogger();
    try {
      const error = await rejectionOf(watch().run(logger));
      assert.equal(error.code, "IMAP_AUTH_FAILED");
      assert.equal(error.kind, "config");
      assert.match(error.hint ?? "", /IMAP\.AccessAsApp/);
      assert.match(error.hint ?? "", new RegExp(`New-ServicePrincipal -AppId ${LOCAL_CLIENT_ID}`));
      assert.match(error.hint ?? "", /Add-MailboxPermission -Identity "mailer@contoso\.test" -User .* -AccessRights FullAccess/);
      const [failed] = records(logger, "bounces.failed");
      assert.equal(failed?.level, "error");
      assert.equal((failed?.error as { code?: string } | undefined)?.code, "IMAP_AUTH_FAILED");
      assert.equal(local.stack.oauth.stats.introspections.at(-1)?.active, true, "the token itself was fine");
    } finally {
      local.stack.oauth.addMailboxPermission(LOCAL_CLIENT_ID, LOCAL_MAILBOX);
    }
    assert.ok((await stored("INBOX")).some((m) => m.messageId === "<auth-refused.report@mx1.fabrikam.test>"), "the report is still there");
    assert.equal(await suppressions.isSuppressed("auth-refused.a@fabrikam.test"), false);

    // Nobody listening on IMAP_PORT.
    const closed = newLogger();
    const refused = await rejectionOf(watch({ IMAP_PORT: "9" }).run(closed, {}));
    assert.equal(refused.code, "IMAP_CONNECTION_FAILED");
    assert.equal((records(closed, "bounces.failed")[0]?.error as { code?: string } | undefined)?.code, "IMAP_CONNECTION_FAILED");

    // With the permission back, the same report is read and recorded.
    const result = await watch().run(newLogger());
    assert.deepEqual(result.reports.map((r) => [r.id, r.outcome]), [["auth-refused", "recorded"]]);
    assert.equal(await suppressions.isSuppressed("auth-refused.a@fabrikam.test"), true);
  });

  it("`queue-mailer bounces --json` runs one pass and says what it found and suppressed; a failure exits 1 with the code", { timeout: 40_000 }, async () => {
    await imap.deliver(LOCAL_MAILBOX, "INBOX", reportFor("cli-pass", "cli-pass.a@fabrikam.test", "cli-pass.b@fabrikam.test"));
    const cliEnv = { ...env, NODE_EXTRA_CA_CERTS: local.stack.caPath };
    const json = await spawnCli(["bounces", "--json", "--log-level", "debug"], { env: cliEnv });
    cliOutput.push(json.stdout, json.stderr);
    assert.equal(json.status, 0, json.stderr);
    const printed = JSON.parse(json.stdout) as BouncePassResult & { ok: boolean };
    assert.equal(printed.ok, true);
    assert.equal(printed.examined, 1);
    assert.deepEqual(printed.reports.map((r) => [r.format, r.id, r.outcome, r.movedTo, r.recipients.map((p) => [p.address, p.status, p.suppressed])]), [
      ["rfc3464", "cli-pass", "recorded", DONE, [["cli-pass.a@fabrikam.test", "5.1.1", true], ["cli-pass.b@fabrikam.test", "5.2.1", true]]],
    ]);
    assert.deepEqual(printed.suppressed, ["cli-pass.a@fabrikam.test", "cli-pass.b@fabrikam.test"]);
    assert.match(json.stderr, /"event":"bounce\.recorded"/);

    // Text, with nothing new.
    const text = await spawnCli(["bounces"], { env: cliEnv });
    cliOutput.push(text.stdout, text.stderr);
    assert.equal(text.status, 0, text.stderr);
    assert.match(text.stdout, /mailer@contoso\.test at 127\.0\.0\.1:\d+, folder INBOX: 0 new messages examined\./);

    local.stack.oauth.removeMailboxPermission(LOCAL_CLIENT_ID, LOCAL_MAILBOX);
    try {
      const failed = await spawnCli(["bounces", "--json"], { env: cliEnv });
      cliOutput.push(failed.stdout, failed.stderr);
      assert.equal(failed.status, 1);
      assert.match(failed.stderr, /queue-mailer bounces: IMAP_AUTH_FAILED: /);
      assert.match(failed.stderr, /hint: [\s\S]*IMAP\.AccessAsApp/);
      assert.equal((JSON.parse(failed.stdout) as { ok: boolean; error: { code: string } }).error.code, "IMAP_AUTH_FAILED");
    } finally {
      local.stack.oauth.addMailboxPermission(LOCAL_CLIENT_ID, LOCAL_MAILBOX);
    }

    const off = await spawnCli(["bounces"], { env: { ...cliEnv, BOUNCES_ENABLED: "false" } });
    assert.equal(off.status, 2);
    assert.match(off.stderr, /BOUNCES_ENABLED=false/);
  });

  it("the bounceWatch timer function runs a pass with the app's settings", { timeout: 30_000 }, async () => {
    await imap.deliver(LOCAL_MAILBOX, "INBOX", reportFor("timer-pass", "timer-pass.a@fabrikam.test", "timer-pass.b@fabrikam.test"));
    Object.assign(process.env, env);
    const { bounceWatch } = await import("../functions/bounceWatch.js");
    const lines: string[] = [];
    const context = new InvocationContext({ invocationId: "inv-bounces-1", functionName: "bounceWatch", logHandler: (_level, ...args) => lines.push(args.map(String).join(" ")) });
    await bounceWatch({ isPastDue: false, schedule: { adjustForDST: false }, scheduleStatus: { last: "", next: "", lastUpdated: "" } }, context);
    const logged = lines.map((l) => JSON.parse(l) as LogRecord);
    assert.deepEqual(logged.filter((r) => r.event === "bounce.recorded").map((r) => [r.recipient, r.id, r.invocationId]), [
      ["timer-pass.a@fabrikam.test", "timer-pass", "inv-bounces-1"],
      ["timer-pass.b@fabrikam.test", "timer-pass", "inv-bounces-1"],
    ]);
    assert.equal(logged.find((r) => r.event === "bounces.checked")?.recorded, 1);
    cliOutput.push(...lines);
  });

  it("no token, XOAUTH2 string or other secret reaches a log line", () => {
    const secrets = local.stack.oauth.secretsSeen();
    assert.ok(secrets.length > 0);
    const lines = [...loggers.flatMap((l) => l.lines), ...cliOutput];
    assert.ok(lines.length > 50, "the logs were captured");
    for (const line of lines) {
      assert.doesNotMatch(line, /eyJ[A-Za-z0-9_-]{8,}\.|dXNlcj|auth=Bearer|\[redacted/i, "nothing secret-shaped was even handed to the logger");
      for (const secret of secrets) assert.ok(!line.includes(secret), "a secret reached a log line");
    }
    const dovecotLog = imap.log();
    for (const secret of secrets) assert.ok(!dovecotLog.includes(secret), "Dovecot's log holds a secret");
  });
});
