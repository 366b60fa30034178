// The poison queue for people: `queue-mailer poison list|requeue` and shared/queue/poisonQueue.ts,
// against a real Azurite. Listing must take nothing away; requeue must put back the original text
// exactly as it was received (raw JSON stays raw, base64 stays base64) and lose nothing.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import { startAzurite, type Azurite } from "../cli/local/azurite.js";
import { loadStorageConfig } from "../shared/config.js";
import { encodeQueueText, openMailQueues, writePoisonRecord, type MailQueues } from "../shared/queue/mailQueue.js";
import { decodeQueueText } from "../shared/queue/decode.js";
import { HOST_MOVED_REASON, listPoison, requeuePoison } from "../shared/queue/poisonQueue.js";
import type { PoisonRecord } from "../shared/queue/outcome.js";
import { spawnCli } from "./support/cli.js";

const run = (args: string[], env: Record<string, string>, cwd: string) => spawnCli(args, { env, cwd });

/** Raw JSON as Storage Explorer would put it, with spacing, an escape and non-ASCII that must survive as is. */
const rawOriginal = '{ "id": "order-raw",   "to": "ada@example.test", "subject": "Grüße \\u00e9 <&>", "text": "x",  "bogus": 1 }';
/** Base64 JSON as the SDKs put it. */
const base64Original = encodeQueueText(JSON.stringify({ id: "order-b64", to: "grace@example.test", subject: "Hi", text: "y", cc: "not an address" }));

function record(original: string, code = "MESSAGE_UNKNOWN_FIELD", attempts = 1): PoisonRecord {
  return { reason: { code, message: `${code} for a test` }, attempts, failedAt: new Date().toISOString(), original };
}

async function poisonIds(queues: MailQueues): Promise<Map<string, string>> {
  // peek: at most 32, enough for these small cases; maps message `id` (or raw text) → poison queue id.
  const { peekedMessageItems } = await queues.poison.peekMessages({ numberOfMessages: 32 });
  const byKey = new Map<string, string>();
  for (const item of peekedMessageItems) {
    const decoded = Buffer.from(item.messageText, "base64").toString("utf8");
    let key = item.messageText;
    try {
      const parsed = JSON.parse(decoded) as { original?: string };
      if (typeof parsed.original === "string") key = parsed.original;
    } catch {
      // host-moved text
    }
    byKey.set(key, item.messageId);
  }
  return byKey;
}

/** Every text on the mail queue, taken off it. */
async function takeAll(queues: MailQueues): Promise<string[]> {
  const texts: string[] = [];
  for (;;) {
    const { receivedMessageItems } = await queues.queue.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 60 });
    if (receivedMessageItems.length === 0) return texts;
    for (const item of receivedMessageItems) {
      texts.push(item.messageText);
      await queues.queue.deleteMessage(item.messageId, item.popReceipt);
    }
  }
}

async function visibleCount(queues: MailQueues): Promise<number> {
  return (await queues.poison.peekMessages({ numberOfMessages: 32 })).peekedMessageItems.length;
}

describe("poison queue", () => {
  let azurite: Azurite;
  let queues: MailQueues;
  let env: Record<string, string>;
  let cwd: string;

  before(async () => {
    azurite = await startAzurite();
    env = { AzureWebJobsStorage: azurite.connectionString, MAIL_QUEUE: "poison-test" };
    queues = await openMailQueues(loadStorageConfig(env));
    cwd = mkdtempSync(join(tmpdir(), "qm-poison-"));
  });
  after(async () => {
    await azurite.stop();
    rmSync(cwd, { recursive: true, force: true });
  });
  beforeEach(async () => {
    await Promise.all([queues.queue.clearMessages(), queues.poison.clearMessages()]);
  });

  /** Our two kinds of records plus a message the host moved as is (base64 text, no reason). */
  async function seedThree(): Promise<{ hostMoved: string }> {
    const hostMoved = encodeQueueText(JSON.stringify({ id: "order-host", to: "host@example.test", subject: "S", text: "t" }));
    await writePoisonRecord(queues.poison, record(rawOriginal));
    await writePoisonRecord(queues.poison, record(base64Original, "MESSAGE_INVALID_ADDRESS", 1));
    await queues.poison.sendMessage(hostMoved);
    return { hostMoved };
  }

  it("lists entries without consuming them: twice the same, queue count unchanged, all still visible", async () => {
    const { hostMoved } = await seedThree();
    const first = await listPoison(queues.poison);
    const second = await listPoison(queues.poison);
    assert.equal(first.length, 3);
    assert.deepEqual(second.map((e) => e.queueMessageId).sort(), first.map((e) => e.queueMessageId).sort());
    assert.equal((await queues.poison.getProperties()).approximateMessagesCount, 3);
    assert.equal(await visibleCount(queues), 3);

    const byId = new Map(first.map((e) => [e.id, e]));
    assert.equal(byId.get("order-raw")?.record?.original, rawOriginal);
    assert.equal(byId.get("order-raw")?.record?.reason.code, "MESSAGE_UNKNOWN_FIELD");
    assert.equal(byId.get("order-b64")?.record?.original, base64Original);
    assert.equal(byId.get("order-b64")?.record?.reason.code, "MESSAGE_INVALID_ADDRESS");
    const host = byId.get("order-host");
    assert.ok(host, "the host-moved entry is listed, with the id of the message it holds");
    assert.equal(host.record, undefined);
    assert.equal(host.raw, hostMoved);
    assert.ok(host.insertedOn instanceof Date);
  });

  it("lists more than 32 entries, all of them, and leaves them all visible", async () => {
    for (let i = 0; i < 45; i += 1) {
      await writePoisonRecord(queues.poison, record(encodeQueueText(JSON.stringify({ id: `bulk-${i}`, to: "x@example.test", subject: "s", text: "t" }))));
    }
    const listed = await listPoison(queues.poison);
    assert.equal(listed.length, 45);
    assert.equal(new Set(listed.map((e) => e.queueMessageId)).size, 45);
    assert.deepEqual(new Set(listed.map((e) => e.id)), new Set(Array.from({ length: 45 }, (_, i) => `bulk-${i}`)));
    // Made visible again at once, not after the listing's visibility timeout.
    assert.equal(await visibleCount(queues), 32);
    assert.equal((await listPoison(queues.poison)).length, 45);
    assert.equal((await queues.poison.getProperties()).approximateMessagesCount, 45);
    assert.equal((await listPoison(queues.poison, { limit: 40 })).length, 40);
    assert.equal((await listPoison(queues.poison, { limit: 5 })).length, 5);
    assert.equal((await listPoison(queues.poison)).length, 45);
  });

  it("an absent poison queue lists as empty", async () => {
    const other = await openMailQueues(loadStorageConfig({ ...env, MAIL_QUEUE: "never-created" }), { create: false });
    assert.deepEqual(await listPoison(other.poison), []);
    assert.deepEqual(await requeuePoison(other, { all: true }), { requeued: 0, skipped: 0, entries: [], refused: [], notFound: [] });
  });

  it("requeues by poison queue id: the raw JSON original goes back exactly as received", async () => {
    await seedThree();
    const poisonId = (await poisonIds(queues)).get(rawOriginal);
    assert.ok(poisonId);
    const result = await requeuePoison(queues, { ids: [poisonId] });
    assert.equal(result.requeued, 1);
    assert.equal(result.skipped, 2);
    assert.deepEqual(result.notFound, []);
    assert.deepEqual(result.entries.map((e) => [e.queueMessageId, e.id]), [[poisonId, "order-raw"]]);
    assert.deepEqual(await takeAll(queues), [rawOriginal]);
    const left = await listPoison(queues.poison);
    assert.deepEqual(left.map((e) => e.id).sort(), ["order-b64", "order-host"]);
    assert.equal(await visibleCount(queues), 2, "the entries left are visible again at once");
  });

  it("requeues by message id: the base64 original goes back exactly as received", async () => {
    await seedThree();
    const result = await requeuePoison(queues, { ids: ["order-b64", "no-such-id"] });
    assert.equal(result.requeued, 1);
    assert.deepEqual(result.notFound, ["no-such-id"]);
    assert.deepEqual(await takeAll(queues), [base64Original]);
    assert.equal((await listPoison(queues.poison)).length, 2);
  });

  it("requeues a multi-line raw original base64-encoded (the SDK drops line breaks), which decodes to exactly the original", async () => {
    // Pretty-printed JSON as `az storage message put --content "$(cat msg.json)"` would put it.
    const multiLine = '{\r\n  "id": "order-lines",\n  "to": "l@example.test",\n  "subject": "s",\n  "text": "t", "x": 1\n}\n';
    await writePoisonRecord(queues.poison, record(multiLine));
    const notJson = "line one\nline two";
    await queues.poison.sendMessage(encodeQueueText(notJson)); // host-moved, base64 of a non-JSON text: fine as is
    await writePoisonRecord(queues.poison, record(notJson, "MESSAGE_NOT_JSON")); // raw non-JSON with a line break: refused
    const result = await requeuePoison(queues, { all: true });
    assert.equal(result.requeued, 2);
    assert.deepEqual(result.entries.map((e) => e.encoding).sort(), ["as-is", "base64"]);
    assert.equal(result.entries.find((e) => e.encoding === "base64")?.id, "order-lines");
    assert.equal(result.refused.length, 1);
    assert.equal(result.skipped, 1);
    assert.match(result.refused[0]?.reason ?? "", /line breaks/);
    const sent = await takeAll(queues);
    assert.deepEqual(sent.map((t) => decodeQueueText(t)).sort(), [multiLine, encodeQueueText(notJson)].sort());
    const left = await listPoison(queues.poison);
    assert.equal(left.length, 1);
    assert.equal(left[0]?.record?.original, notJson, "the refused entry is still there, unchanged and visible");
  });

  it("requeues a host-moved entry (no record) as its own text", async () => {
    const { hostMoved } = await seedThree();
    const rawHostMoved = '{"id":"raw-host","to":"r@example.test","subject":"s","text":"t"}';
    await queues.poison.sendMessage(rawHostMoved);
    const listed = await listPoison(queues.poison);
    assert.equal(listed.find((e) => e.id === "raw-host")?.record, undefined);
    const result = await requeuePoison(queues, { ids: ["order-host", "raw-host"] });
    assert.equal(result.requeued, 2);
    assert.deepEqual((await takeAll(queues)).sort(), [hostMoved, rawHostMoved].sort());
  });

  it("requeues everything with all, more than 32 entries, each original unchanged", async () => {
    const originals: string[] = [rawOriginal, base64Original];
    for (let i = 0; i < 36; i += 1) originals.push(encodeQueueText(JSON.stringify({ id: `all-${i}`, to: "x@example.test", subject: `s${i}`, text: "t" })));
    for (const original of originals) await writePoisonRecord(queues.poison, record(original));
    const hostMoved = "not JSON at all, moved by the host";
    await queues.poison.sendMessage(hostMoved);
    const result = await requeuePoison(queues, { all: true });
    assert.equal(result.requeued, 39);
    assert.equal(result.skipped, 0);
    assert.deepEqual((await takeAll(queues)).sort(), [...originals, hostMoved].sort());
    assert.equal((await queues.poison.getProperties()).approximateMessagesCount, 0);
  });

  it("refuses a requeue with neither ids nor all", async () => {
    await assert.rejects(requeuePoison(queues, {}), { code: "POISON_NOTHING_SELECTED" });
  });

  describe("queue-mailer poison (the command)", () => {
    it("list --json prints every entry, the host-moved one without a reason, and takes nothing", async () => {
      await seedThree();
      const result = await run(["poison", "list", "--json"], env, cwd);
      assert.equal(result.status, 0, result.stderr);
      const printed = JSON.parse(result.stdout) as { queue: string; count: number; entries: Array<Record<string, unknown>> };
      assert.equal(printed.queue, "poison-test-poison");
      assert.equal(printed.count, 3);
      const byId = new Map(printed.entries.map((e) => [e["id"], e]));
      assert.equal(byId.get("order-raw")?.["code"], "MESSAGE_UNKNOWN_FIELD");
      assert.equal(byId.get("order-raw")?.["original"], rawOriginal);
      assert.equal(byId.get("order-b64")?.["attempts"], 1);
      assert.equal(byId.get("order-host")?.["code"], null);
      assert.equal(byId.get("order-host")?.["message"], HOST_MOVED_REASON);
      assert.equal(byId.get("order-host")?.["movedByHost"], true);
      assert.equal(await visibleCount(queues), 3);
    });

    it("list prints a table", async () => {
      await seedThree();
      const result = await run(["poison", "list"], env, cwd);
      assert.equal(result.status, 0, result.stderr);
      const lines = result.stdout.split("\n");
      assert.match(lines[0] ?? "", /^QUEUED ID\s+MESSAGE ID\s+FAILED AT\s+ATTEMPTS\s+CODE\s+MESSAGE$/);
      assert.match(result.stdout, /order-host .*\(no reason: moved by the host\)/);
      assert.match(result.stdout, /order-b64 .* MESSAGE_INVALID_ADDRESS/);
      assert.match(result.stdout, /3 entries in poison-test-poison/);
    });

    it("requeue --id puts the original back and says what it did; an unmatched id exits 1", async () => {
      await seedThree();
      const poisonId = (await poisonIds(queues)).get(base64Original);
      assert.ok(poisonId);
      const byPoisonId = await run(["poison", "requeue", "--id", poisonId], env, cwd);
      assert.equal(byPoisonId.status, 0, byPoisonId.stderr);
      assert.match(byPoisonId.stdout, new RegExp(`requeued ${poisonId} \\(id order-b64\\) as \\S+ on poison-test`));
      assert.match(byPoisonId.stdout, /1 requeued, 2 left in poison-test-poison/);
      const byMessageId = await run(["poison", "requeue", "--id", "order-raw", "--id", "missing"], env, cwd);
      assert.equal(byMessageId.status, 1);
      assert.match(byMessageId.stdout, /requeued \S+ \(id order-raw\)/);
      assert.match(byMessageId.stderr, /no entry in poison-test-poison matches "missing"/);
      assert.deepEqual(await takeAll(queues), [base64Original, rawOriginal]);
      assert.equal((await listPoison(queues.poison)).length, 1);
    });

    it("requeue --all", async () => {
      await seedThree();
      const result = await run(["poison", "requeue", "--all", "--json"], env, cwd);
      assert.equal(result.status, 0, result.stderr);
      assert.equal((JSON.parse(result.stdout) as { requeued: number }).requeued, 3);
      assert.equal((await takeAll(queues)).length, 3);
      assert.equal((await queues.poison.getProperties()).approximateMessagesCount, 0);
    });

    it("usage errors exit 2: requeue without --id/--all, unknown subcommand, unknown option", async () => {
      await seedThree();
      const bare = await run(["poison", "requeue"], env, cwd);
      assert.equal(bare.status, 2);
      assert.match(bare.stderr, /--id ID \(repeatable\) or --all/);
      const unknown = await run(["poison", "purge"], env, cwd);
      assert.equal(unknown.status, 2);
      assert.match(unknown.stderr, /unknown subcommand "purge"[\s\S]*Usage:/);
      const option = await run(["poison", "list", "--verbose"], env, cwd);
      assert.equal(option.status, 2);
      assert.equal(await visibleCount(queues), 3, "nothing was touched");
    });

    it("names the storage setting when it is missing (exit 2)", async () => {
      const result = await run(["poison", "list"], {}, cwd);
      assert.equal(result.status, 2);
      assert.match(result.stderr, /AzureWebJobsStorage: is not set/);
    });
  });
});
