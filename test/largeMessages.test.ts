// Issue 15: messages up to MAX_MESSAGE_BYTES go through, byte-exact, without the base64 check
// overflowing the stack and without the worker holding many copies of them. A 20 MB attachment is
// enqueued with the real CLI (`queue-mailer enqueue --attach`, from the sources) and sent by the
// real worker as a process of its own, whose peak RSS comes from its `worker.stopped` log line.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { loadStorageConfig } from "../shared/config.js";
import { LargeJsonString, parseClaimCheckJson } from "../shared/message/claimCheckJson.js";
import { base64DecodedLength, MessageError, validateMessage } from "../shared/message/validate.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { openContainer } from "../shared/storage/storageClients.js";
import { spawnCli, type CliResult } from "./support/cli.js";
import { useLocalStack } from "./support/harness.js";

const MiB = 1024 * 1024;
const ATTACHMENT_BYTES = 20 * MiB;
const DEFAULTS = { from: "mailer@contoso.test", id: "large" };

function withAttachment(content: string): Record<string, unknown> {
  return { to: "ada@example.test", subject: "s", text: "t", attachments: [{ filename: "big.bin", content }] };
}

function invalidBase64(content: string): MessageError {
  try {
    validateMessage(withAttachment(content), DEFAULTS);
  } catch (error) {
    assert.ok(error instanceof MessageError, `expected a MessageError, got ${String(error)}`);
    return error;
  }
  return assert.fail("expected MESSAGE_INVALID_BASE64, but the content was accepted");
}

/** The worker's peak RSS from its worker.stopped line, after checking it sent and poisoned as expected. */
function peakOf(worker: CliResult, sent: number, poisoned: number): number {
  assert.equal(worker.status, 0, worker.stderr.slice(-4000));
  const records = worker.stderr.split("\n").filter((line) => line.startsWith("{")).map((line) => JSON.parse(line) as Record<string, unknown>);
  const stopped = records.find((r) => r["event"] === "worker.stopped") as { sent: number; poisoned: number; retried: number; memory: { peakRssBytes: number } } | undefined;
  assert.ok(stopped, "the worker logged worker.stopped");
  assert.deepEqual({ sent: stopped.sent, poisoned: stopped.poisoned, retried: stopped.retried }, { sent, poisoned, retried: 0 });
  return stopped.memory.peakRssBytes;
}

const sha256 = (bytes: Buffer): string => createHash("sha256").update(bytes).digest("hex");

/** The decoded body of the MIME part whose headers name `filename`. */
function attachmentBytes(raw: Buffer, filename: string): Buffer {
  const text = raw.toString("latin1");
  const named = text.indexOf(`filename=${filename}`);
  assert.ok(named >= 0, `a part named ${filename}`);
  const bodyStart = text.indexOf("\r\n\r\n", named) + 4;
  const bodyEnd = text.indexOf("\r\n--", bodyStart);
  return Buffer.from(text.slice(bodyStart, bodyEnd), "base64");
}

describe("base64 attachments: linear check, exact decode", () => {
  it("accepts padded base64 with line breaks anywhere and refuses everything else", () => {
    const cases: Array<[string, number | undefined]> = [
      ["", 0],
      ["QQ==", 1],
      ["QUI=", 2],
      ["QUJD", 3],
      ["QU\r\nJD\n", 3],
      [" Q U J D Q Q = = ", 4],
      ["QQ", undefined], // unpadded
      ["QUJD=", undefined],
      ["QQ=", undefined],
      ["Q===", undefined],
      ["QQ==QUJD", undefined], // data after padding
      ["QU=D", undefined],
      ["-_-_", undefined], // base64url
      ["QUJ\u00c4", undefined],
      ["QUJD\u0000", undefined],
    ];
    for (const [text, length] of cases) assert.equal(base64DecodedLength(text), length, JSON.stringify(text));
  });

  it(`decodes ${ATTACHMENT_BYTES / MiB} MiB of inline base64 byte-exact, wrapped or not (was: Maximum call stack size exceeded)`, () => {
    const bytes = randomBytes(ATTACHMENT_BYTES);
    const flat = bytes.toString("base64");
    const wrapped = flat.replace(/.{76}/g, "$&\r\n");
    for (const content of [flat, wrapped]) {
      const started = performance.now();
      const [attachment] = validateMessage(withAttachment(content), DEFAULTS).attachments;
      const ms = performance.now() - started;
      assert.ok(attachment?.content?.equals(bytes), "decoded bytes equal the original");
      assert.ok(ms < 5_000, `validated in ${Math.round(ms)} ms`);
    }
  });

  it(`refuses ${ATTACHMENT_BYTES / MiB} MiB of malformed base64 with MESSAGE_INVALID_BASE64, not a crash`, () => {
    const flat = randomBytes(ATTACHMENT_BYTES).toString("base64");
    const malformed = [
      `${flat.slice(0, flat.length / 2)}!${flat.slice(flat.length / 2 + 1)}`, // a bad character in the middle
      `${flat}A`, // one character too many at the very end
      `${flat.slice(0, -4)}QQ=`, // bad padding at the end
      `${flat.slice(0, 1000)}====${flat.slice(1000)}`, // padding in the middle
    ];
    for (const content of malformed) {
      const error = invalidBase64(content);
      assert.equal(error.code, "MESSAGE_INVALID_BASE64");
      assert.equal(error.field, "attachments[0].content");
    }
  });
});

describe("claim-check JSON: large strings stay in the blob's bytes, the meaning stays JSON.parse's", () => {
  const bytes = randomBytes(150_000);
  const base64 = bytes.toString("base64"); // 200 000 characters: over the 64 KiB cut
  const wrapped = base64.replace(/.{76}/g, "$&\r\n");
  const message = (content: unknown, extra: Record<string, unknown> = {}) => ({ to: "a@example.test", subject: "s", text: "t", ...extra, attachments: [{ filename: "a.bin", content }] });
  /** parseClaimCheckJson with every LargeJsonString made a string: must equal JSON.parse. */
  const materialized = (text: string): unknown => JSON.parse(JSON.stringify(parseClaimCheckJson(Buffer.from(text)), (_key, value: unknown) => (value instanceof LargeJsonString ? value.toString() : value)));
  const contentOf = (text: string): unknown => ((parseClaimCheckJson(Buffer.from(text)) as { attachments: Array<{ content: unknown }> }).attachments[0] as { content: unknown }).content;

  it("decodes attachment content from the bytes, JSON escapes included (\\r\\n, \\/, \\u002B)", () => {
    const texts = [
      JSON.stringify(message(base64)),
      JSON.stringify(message(wrapped)), // JSON.stringify writes the line breaks as \r\n escapes
      JSON.stringify(message(base64)).replace(/\//g, "\\/"), // PHP's json_encode escapes every /
      JSON.stringify(message(base64)).replace(/\+/g, "\\u002B"),
    ];
    for (const text of texts) {
      const content = contentOf(text);
      assert.ok(content instanceof LargeJsonString, "large content stays in the blob");
      assert.ok(content.decodeBase64()?.equals(bytes), text.slice(0, 80));
      assert.deepEqual(materialized(text), JSON.parse(text));
    }
  });

  it("refuses large content that is not base64, and keeps small content a plain string", () => {
    for (const bad of [`${base64}!`, `${base64}A`, `${base64.slice(0, 1000)}==${base64.slice(1000)}`, `${base64}\"`]) {
      const content = contentOf(JSON.stringify(message(bad)));
      assert.ok(content instanceof LargeJsonString);
      assert.equal(content.decodeBase64(), undefined);
    }
    assert.equal(contentOf(JSON.stringify(message("QUJD"))), "QUJD");
  });

  it("gives a large value anywhere else back as the string itself, and leaves keys alone", () => {
    const long = "x".repeat(100_000);
    const texts = [
      JSON.stringify(message("QUJD", { text: long, html: `<p>${long}\u00e9</p>` })),
      JSON.stringify({ ...message("QUJD"), headers: { [long]: "v", "X-Long": long } }),
      JSON.stringify({ ...message("QUJD"), nested: [[{ content: long }]] }),
      `{"__proto__":${JSON.stringify(long)},"to":"a@example.test"}`,
      JSON.stringify(long),
    ];
    for (const text of texts) {
      const parsed = parseClaimCheckJson(Buffer.from(text));
      assert.deepEqual(materialized(text), JSON.parse(text));
      assert.ok(!JSON.stringify(parsed, (_k, v: unknown) => (v instanceof LargeJsonString ? "LARGE" : v)).includes("LARGE"), "only attachment content stays large");
    }
    const proto = parseClaimCheckJson(Buffer.from(`{"__proto__":${JSON.stringify(long)}}`)) as object;
    assert.equal(Object.getPrototypeOf(proto), Object.prototype, "__proto__ stays an own data property");
  });

  it("throws where JSON.parse throws: raw control characters, bad escapes, unterminated strings", () => {
    const long = "y".repeat(100_000);
    for (const text of [`{"text":"${long}\u0001"}`, `{"text":"${long}\\x"}`, `{"text":"${long}`, `{"text":"${long}\\u12"}`, `{"a":"${long}" "b":1}`]) {
      assert.throws(() => JSON.parse(text), SyntaxError, "JSON.parse refuses it");
      assert.throws(() => parseClaimCheckJson(Buffer.from(text)), SyntaxError, text.slice(-20));
    }
    const deep = `${"[".repeat(20_000)}"${long}"${"]".repeat(20_000)}`;
    // Deep nesting is walked without recursion (JSON.stringify, recursive, could not even compare it).
    let node = parseClaimCheckJson(Buffer.from(deep));
    let depth = 0;
    for (; Array.isArray(node); depth++) node = node[0] as unknown;
    assert.equal(depth, 20_000);
    assert.equal(node, long);
  });
});

describe(`a ${ATTACHMENT_BYTES / MiB} MiB attachment through queue-mailer enqueue --attach and a worker process`, () => {
  const local = useLocalStack("qm-large-");
  let dir: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "qm-large-files-"));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it("arrives byte-exact, a malformed claim check is poisoned with MESSAGE_INVALID_BASE64, and the worker's peak RSS stays bounded", { timeout: 180_000 }, async () => {
    const { stack } = local;
    stack.smtp.messages.length = 0;
    const env = { ...stack.env, NODE_EXTRA_CA_CERTS: stack.caPath };
    // The worker's own footprint (Node, tsx, the Azure SDKs, one pooled SMTP connection), from a
    // worker process that sends one small message: the bound below is on growth beyond it.
    const small = await spawnCli(["enqueue", "--to", "ada@example.test", "--subject", "Small", "--text", "x"], { env });
    assert.equal(small.status, 0, small.stderr);
    const baseline = peakOf(await spawnCli(["worker", "--drain"], { env, timeoutMs: 60_000 }), 1, 0);
    stack.smtp.messages.length = 0;

    const file = join(dir, "invoice.bin");
    const bytes = randomBytes(ATTACHMENT_BYTES);
    writeFileSync(file, bytes);

    const enqueued = await spawnCli(["enqueue", "--to", "ada@example.test", "--subject", "Large", "--text", "see attachment", "--attach", file], { env, timeoutMs: 120_000 });
    assert.equal(enqueued.status, 0, enqueued.stderr);
    const result = JSON.parse(enqueued.stdout) as { enqueued: boolean; claimCheck?: string };
    assert.ok(result.claimCheck, "over 64 KiB: it travelled as a claim check");

    // A producer that skipped validation: its claim check holds 20 MiB of base64 with one bad
    // character at the end, so the worker must scan it all and refuse it.
    const storage = loadStorageConfig(env);
    const container = await openContainer(storage, storage.attachmentContainer);
    const malformed = JSON.stringify(withAttachment(`${randomBytes(ATTACHMENT_BYTES).toString("base64")}!`));
    await container.getBlockBlobClient("claim-checks/malformed.json").upload(malformed, Buffer.byteLength(malformed));
    const { queue, poison } = await openMailQueues(storage);
    await queue.sendMessage(Buffer.from(JSON.stringify({ claimCheck: "claim-checks/malformed.json" })).toString("base64"));

    const started = performance.now();
    const peak = peakOf(await spawnCli(["worker", "--drain"], { env, timeoutMs: 150_000 }), 1, 1);
    const seconds = (performance.now() - started) / 1000;

    const [record] = (await poison.peekMessages({ numberOfMessages: 2 })).peekedMessageItems.map((m) => JSON.parse(Buffer.from(m.messageText, "base64").toString("utf8")) as { reason: { code: string } });
    assert.equal(record?.reason.code, "MESSAGE_INVALID_BASE64");

    assert.equal(stack.smtp.messages.length, 1);
    const delivered = stack.smtp.messages[0];
    assert.ok(delivered);
    assert.equal(sha256(attachmentBytes(delivered.raw, "invoice.bin")), sha256(bytes), "the attachment arrived byte-exact");

    // The bound, on growth over the small-message worker: both 20 MiB claim checks are in flight in
    // one batch. Each needs its blob in one buffer (26.7 MiB of JSON) and its decoded attachment
    // (20 MiB), about 94 MiB for the two, plus the SMTP stream's 48 KiB slices and allocator slack:
    // measured 120-135 MiB here. 180 MiB is well under what the former shape needed (about 260 MiB
    // measured: the blob as text, each base64 string parsed out of it, and nodemailer's encoding
    // of the whole attachment into one string and one wrapped copy).
    const growth = peak - baseline;
    console.log(`# ${ATTACHMENT_BYTES / MiB} MiB attachment + ${ATTACHMENT_BYTES / MiB} MiB malformed claim check: worker peak RSS ${(peak / MiB).toFixed(0)} MiB, ${(growth / MiB).toFixed(0)} MiB over a small-message worker (${(baseline / MiB).toFixed(0)} MiB); drain took ${seconds.toFixed(1)} s`);
    assert.ok(growth < 180 * MiB, `worker peak RSS grew ${(growth / MiB).toFixed(0)} MiB`);
  });
});
