// Delivery guarantees under hostile input: a corpus of broken, malicious and oversized queue
// messages goes through the real worker on a real local stack (Azurite, oidc-provider, smtp-server),
// interleaved with good messages. Every hostile message must be poisoned once, at once, with its
// own reason and its text kept exactly; every good one between them must be delivered once; the
// worker must not crash, and nothing it logs or poisons may carry a token, assertion or key.
//
// Queue texts go on the queue with queue.sendMessage(text), not through enqueueEmail, so that the
// exact text (raw JSON or base64 JSON) is what is under test. Two limits of the transport shape the
// corpus: the Storage SDK cannot send CR, LF or other C0 controls in a message text unchanged (its
// XML body drops them), so control characters appear as JSON escapes (\r, \u0000) in raw texts or
// inside base64 texts; and a queue message holds at most 64 KiB, so the big cases live in blobs in
// ATTACHMENT_CONTAINER (claim checks and attachments by reference).
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import type { ContainerClient } from "@azure/storage-blob";
import type { QueueClient } from "@azure/storage-queue";
import { startLocalStack, LOCAL_MAILBOX, type LocalStack } from "../cli/local/localStack.js";
import type { SinkMessage } from "../cli/local/smtpSink.js";
import { loadStorageConfig } from "../shared/config.js";
import { enqueueEmail, type EnqueueResult } from "../shared/enqueueEmail.js";
import type { EmailMessageInput } from "../shared/message/schema.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import type { PoisonRecord } from "../shared/queue/outcome.js";
import { openContainer } from "../shared/storage/storageClients.js";
import { capturingLogger, drain, type CapturedLogger } from "./support/harness.js";

interface HostileCase {
  name: string;
  /** The queue text exactly as put on the queue. */
  text: string;
  /** The reason.code its poison record must carry. */
  code: string;
}

// ---------------------------------------------------------------------------------------------
// Building queue texts.

/** Raw JSON as Storage Explorer or `az storage message put` would write it. DEL is escaped like the
 * C0 controls JSON.stringify already escapes, so that every raw text is plain XML-safe text. */
const raw = (value: unknown): string => JSON.stringify(value).replace(/\u007f/g, "\\u007f");
/** Base64 of JSON (or of any text), as the SDKs and the Functions host write it. */
const b64 = (value: unknown): string => Buffer.from(typeof value === "string" ? value : JSON.stringify(value), "utf8").toString("base64");

/** A valid message with `patch` applied; a patch value of undefined removes the field. */
function message(patch: Record<string, unknown> = {}): Record<string, unknown> {
  const base: Record<string, unknown> = { to: "ada@example.test", subject: "Hostile", text: "body" };
  for (const [key, value] of Object.entries(patch)) {
    if (value === undefined) delete base[key];
    else base[key] = value;
  }
  return base;
}
const attachment = (patch: Record<string, unknown>): Record<string, unknown> => ({ attachments: [{ filename: "a.txt", content: "QUJD", ...patch }] });
const header = (name: string, value: unknown): Record<string, unknown> => ({ headers: { "X-Ok": "fine", [name]: value } });

// Blobs the corpus refers to; uploaded in before().
const BLOB = {
  overLimit: "hostile/over-limit.bin", // MAX_MESSAGE_BYTES + 1
  twoHundredK: "hostile/200k.bin",
  junk: "hostile/junk.bin",
  fiveThousand: "hostile/claim-5000-recipients.json",
  claimNotJson: "hostile/claim-not-json.json",
  claimInjection: "hostile/claim-injection.json",
  claimNested: "hostile/claim-nested.json",
  claimArray: "hostile/claim-array.json",
  claimOversized: "hostile/claim-oversized.json",
  goodAttachment: "good/receipt.txt",
} as const;

const MAX_MESSAGE_BYTES = 300_000;
const junkBytes = Buffer.from(Array.from({ length: 512 }, (_, i) => (i * 197 + 0xff) % 256));
const recipients = (count: number, prefix: string): string[] => Array.from({ length: count }, (_, i) => `${prefix}${i}@example.test`);

const corpus: HostileCase[] = [
  // Not JSON, or JSON but not an object.
  { name: "truncated JSON", text: '{"to":"ada@example.test","subject":"Hi","text":"x"', code: "MESSAGE_NOT_JSON" },
  { name: "trailing comma", text: '{"to":"ada@example.test","subject":"Hi","text":"x",}', code: "MESSAGE_NOT_JSON" },
  { name: "single quotes", text: "{'to':'ada@example.test','subject':'Hi','text':'x'}", code: "MESSAGE_NOT_JSON" },
  { name: "empty text", text: "", code: "MESSAGE_NOT_JSON" },
  { name: "whitespace only", text: "   \t  ", code: "MESSAGE_NOT_JSON" },
  { name: "binary junk", text: "\u00ff\u00fe\ufffd\u20ac\u00a0\u2039junk\u203a\u00ad", code: "MESSAGE_NOT_JSON" },
  { name: "base64 of binary junk", text: junkBytes.toString("base64"), code: "MESSAGE_NOT_JSON" },
  { name: "base64 of truncated JSON", text: b64('{"to":"ada@example.test","subject":'), code: "MESSAGE_NOT_JSON" },
  // Base64 is only taken when it decodes to an object; otherwise the text is judged as received.
  { name: "base64 of a JSON array", text: b64([message()]), code: "MESSAGE_NOT_JSON" },
  { name: "JSON null", text: "null", code: "MESSAGE_NOT_OBJECT" },
  { name: "bare number", text: "42", code: "MESSAGE_NOT_OBJECT" },
  { name: "JSON true", text: "true", code: "MESSAGE_NOT_OBJECT" },
  { name: "JSON array of a valid message", text: raw([message()]), code: "MESSAGE_NOT_OBJECT" },
  { name: "JSON string", text: '"send an email to ada@example.test"', code: "MESSAGE_NOT_OBJECT" },
  { name: "20 000 levels of nested arrays", text: `{"to":${"[".repeat(20_000)}${"]".repeat(20_000)},"subject":"s","text":"t"}`, code: "MESSAGE_INVALID_TYPE" },

  // Unknown fields.
  { name: "unknown top-level field", text: b64(message({ priority: "urgent" })), code: "MESSAGE_UNKNOWN_FIELD" },
  { name: "__proto__ at top level", text: '{"__proto__":{"isAdmin":true},"to":"ada@example.test","subject":"s","text":"t"}', code: "MESSAGE_UNKNOWN_FIELD" },
  { name: "unknown attachment field (url)", text: b64(message(attachment({ url: "https://169.254.169.254/latest/meta-data" }))), code: "MESSAGE_UNKNOWN_FIELD" },
  { name: "claimCheck next to message fields", text: raw(message({ claimCheck: BLOB.claimInjection })), code: "MESSAGE_UNKNOWN_FIELD" },

  // Wrong types.
  { name: "to is a number", text: raw(message({ to: 42 })), code: "MESSAGE_INVALID_TYPE" },
  { name: "to is an object", text: b64(message({ to: { address: "ada@example.test" } })), code: "MESSAGE_INVALID_TYPE" },
  { name: "to is an empty array", text: raw(message({ to: [] })), code: "MESSAGE_INVALID_TYPE" },
  { name: "to is null", text: raw(message({ to: null })), code: "MESSAGE_INVALID_TYPE" },
  { name: "cc is an array of numbers", text: b64(message({ cc: [1, 2] })), code: "MESSAGE_INVALID_TYPE" },
  { name: "bcc is a boolean", text: raw(message({ bcc: true })), code: "MESSAGE_INVALID_TYPE" },
  { name: "subject is a number", text: raw(message({ subject: 42 })), code: "MESSAGE_INVALID_TYPE" },
  { name: "subject is 1e999", text: '{"to":"ada@example.test","subject":1e999,"text":"t"}', code: "MESSAGE_INVALID_TYPE" },
  { name: "text is an object", text: b64(message({ text: { plain: "hi" } })), code: "MESSAGE_INVALID_TYPE" },
  { name: "html is an array", text: raw(message({ html: ["<p>hi</p>"] })), code: "MESSAGE_INVALID_TYPE" },
  { name: "headers is an array", text: raw(message({ headers: [["X-A", "1"]] })), code: "MESSAGE_INVALID_TYPE" },
  { name: "header value is a number", text: b64(message(header("X-Count", 5))), code: "MESSAGE_INVALID_TYPE" },
  { name: "attachments is an object", text: raw(message({ attachments: { filename: "a.txt", content: "QUJD" } })), code: "MESSAGE_INVALID_TYPE" },
  { name: "attachments holds strings", text: b64(message({ attachments: ["a.txt"] })), code: "MESSAGE_INVALID_TYPE" },
  { name: "attachment filename is a number", text: b64(message(attachment({ filename: 7 }))), code: "MESSAGE_INVALID_TYPE" },
  { name: "id is a number", text: raw(message({ id: 12345 })), code: "MESSAGE_INVALID_TYPE" },
  { name: "from is null", text: raw(message({ from: null })), code: "MESSAGE_INVALID_TYPE" },
  { name: "claimCheck is a number", text: '{"claimCheck":5}', code: "MESSAGE_INVALID_TYPE" },
  { name: "attachment with both content and blob", text: raw(message(attachment({ blob: BLOB.goodAttachment }))), code: "MESSAGE_INVALID_TYPE" },

  // Missing fields.
  { name: "no to", text: b64(message({ to: undefined })), code: "MESSAGE_MISSING_FIELD" },
  { name: "no subject", text: raw(message({ subject: undefined })), code: "MESSAGE_MISSING_FIELD" },
  { name: "no text or html", text: b64(message({ text: undefined })), code: "MESSAGE_NO_BODY" },
  { name: "attachment without filename", text: raw(message({ attachments: [{ content: "QUJD" }] })), code: "MESSAGE_MISSING_FIELD" },
  { name: "attachment without content or blob", text: b64(message({ attachments: [{ filename: "a.txt" }] })), code: "MESSAGE_MISSING_FIELD" },

  // Header injection: any C0 control or DEL in a header field (TAB only in subject and header values).
  { name: "subject CRLF Bcc", text: b64(message({ subject: "Hi\r\nBcc: everyone@example.test" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "subject LF", text: raw(message({ subject: "Hi\nBcc: everyone@example.test" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "subject CR", text: raw(message({ subject: "Hi\rBcc: everyone@example.test" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "subject NUL", text: raw(message({ subject: "Hi\u0000there" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "subject BEL", text: raw(message({ subject: "Ding\u0007" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "subject ESC (terminal escape)", text: b64(message({ subject: "\u001b[31mred\u001b[0m" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "subject DEL", text: raw(message({ subject: "Del\u007f" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "to CRLF", text: b64(message({ to: "ada@example.test\r\nBcc: everyone@example.test" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "to display name CRLF", text: raw(message({ to: '"Ada\r\nBcc: everyone@example.test" <ada@example.test>' })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "to TAB", text: b64(message({ to: "ada@example.test\t" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "from LF", text: b64(message({ from: `${LOCAL_MAILBOX}\nX-Spoofed: 1` })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "cc item CR", text: raw(message({ cc: ["linus@example.test", "grace@example.test\rBcc: everyone@example.test"] })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "bcc NUL", text: b64(message({ bcc: "audit@example.test\u0000" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "replyTo LF", text: raw(message({ replyTo: "support@example.test\nX-Injected: 1" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "custom header value CRLF", text: b64(message(header("X-Tag", "a\r\nBcc: everyone@example.test"))), code: "MESSAGE_HEADER_INJECTION" },
  { name: "custom header value as \\u000d\\u000a escapes", text: '{"to":"ada@example.test","subject":"s","text":"t","headers":{"X-Tag":"a\\u000d\\u000aBcc: everyone@example.test"}}', code: "MESSAGE_HEADER_INJECTION" },
  { name: "attachment filename CRLF", text: raw(message(attachment({ filename: "a.txt\r\nContent-Type: text/html" }))), code: "MESSAGE_HEADER_INJECTION" },
  { name: "attachment contentType CRLF", text: b64(message(attachment({ contentType: "text/plain\r\nX-Injected: 1" }))), code: "MESSAGE_HEADER_INJECTION" },
  { name: "id CRLF", text: raw(message({ id: "order-1\r\nBcc: everyone@example.test" })), code: "MESSAGE_HEADER_INJECTION" },
  { name: "id TAB", text: b64(message({ id: "order\t1" })), code: "MESSAGE_HEADER_INJECTION" },

  // Header names.
  { name: "header name with a space", text: raw(message(header("Bad Name", "x"))), code: "MESSAGE_INVALID_HEADER" },
  { name: "header name with a colon", text: b64(message(header("X:Y", "x"))), code: "MESSAGE_INVALID_HEADER" },
  { name: "empty header name", text: raw(message(header("", "x"))), code: "MESSAGE_INVALID_HEADER" },
  { name: "header name with CRLF", text: b64(message(header("X-A\r\nBcc", "everyone@example.test"))), code: "MESSAGE_INVALID_HEADER" },
  { name: "header name __proto__", text: '{"to":"ada@example.test","subject":"s","text":"t","headers":{"__proto__":"x"}}', code: "MESSAGE_INVALID_HEADER" },
  { name: "non-ASCII header name", text: raw(message(header("X-\u00dcml\u00e4ut", "x"))), code: "MESSAGE_INVALID_HEADER" },
  { name: "header From", text: raw(message(header("From", "ceo@contoso.test"))), code: "MESSAGE_FORBIDDEN_HEADER" },
  { name: "header bcc (lower case)", text: b64(message(header("bcc", "everyone@example.test"))), code: "MESSAGE_FORBIDDEN_HEADER" },
  { name: "header Content-Type", text: raw(message(header("Content-Type", "multipart/mixed; boundary=x"))), code: "MESSAGE_FORBIDDEN_HEADER" },
  { name: "header DKIM-Signature", text: b64(message(header("DKIM-Signature", "v=1; a=rsa-sha256; d=contoso.test"))), code: "MESSAGE_FORBIDDEN_HEADER" },
  { name: "header Received", text: raw(message(header("Received", "from trusted.contoso.test"))), code: "MESSAGE_FORBIDDEN_HEADER" },
  { name: "header MESSAGE-ID (upper case)", text: b64(message(header("MESSAGE-ID", "<forged@contoso.test>"))), code: "MESSAGE_FORBIDDEN_HEADER" },
  { name: "header Return-Path", text: raw(message(header("Return-Path", "<bounce@evil.test>"))), code: "MESSAGE_FORBIDDEN_HEADER" },

  // Addresses.
  { name: "two addresses in one string", text: raw(message({ to: "ada@example.test, grace@example.test" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "group syntax in one string", text: b64(message({ to: "friends: ada@example.test, grace@example.test;" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "not-an-address", text: b64(message({ to: "not-an-address" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "a@ (no domain)", text: raw(message({ to: "a@" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "@b.com (no local part)", text: b64(message({ to: "@b.com" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "a@b..c (empty label)", text: raw(message({ to: "a@b..c" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "empty to", text: raw(message({ to: "" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "IP literal domain", text: raw(message({ to: "root@[127.0.0.1]" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "address over 254 characters", text: b64(message({ to: `${"a".repeat(250)}@example.test` })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "from is not an address", text: raw(message({ from: "attacker" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "one bad cc in an array", text: b64(message({ cc: ["linus@example.test", "linus@"] })), code: "MESSAGE_INVALID_ADDRESS" },
  // Issue 15: strings nodemailer's lenient parser used to repair into some other recipient.
  { name: "space inside an address (a b@x)", text: raw(message({ to: "a b@example.test" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "comment between two addresses", text: b64(message({ to: "a@example.test (comment) b@example.test" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "two angle addresses", text: raw(message({ cc: ['"x" <a@example.test> <b@example.test>'] })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "doubled angle brackets", text: b64(message({ bcc: "<<a@example.test>>" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "extra closing angle bracket", text: raw(message({ replyTo: "x <a@example.test>>" })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "unclosed angle bracket in from", text: b64(message({ from: `<${LOCAL_MAILBOX}` })), code: "MESSAGE_INVALID_ADDRESS" },
  { name: "bidi override in a local part", text: raw(message({ to: "gnp\u202e@example.test" })), code: "MESSAGE_INVALID_ADDRESS" },

  // Recipient count.
  { name: "501 recipients over to, cc and bcc", text: raw(message({ to: recipients(200, "t"), cc: recipients(200, "c"), bcc: recipients(101, "b") })), code: "MESSAGE_TOO_MANY_RECIPIENTS" },
  { name: "5000 recipients in to (claim check)", text: raw({ claimCheck: BLOB.fiveThousand }), code: "MESSAGE_TOO_MANY_RECIPIENTS" },

  // Lengths.
  { name: "id of 257 characters", text: b64(message({ id: "i".repeat(257) })), code: "MESSAGE_FIELD_TOO_LONG" },
  { name: "empty id", text: raw(message({ id: "" })), code: "MESSAGE_FIELD_TOO_LONG" },
  { name: "subject of 999 characters", text: raw(message({ subject: "s".repeat(999) })), code: "MESSAGE_FIELD_TOO_LONG" },
  { name: "attachment filename of 256 characters", text: b64(message(attachment({ filename: `${"f".repeat(252)}.txt` }))), code: "MESSAGE_FIELD_TOO_LONG" },

  // Base64 of attachments.
  { name: "base64 with invalid characters", text: raw(message(attachment({ content: "not base64!!" }))), code: "MESSAGE_INVALID_BASE64" },
  { name: "base64 with wrong padding (QUJD=)", text: b64(message(attachment({ content: "QUJD=" }))), code: "MESSAGE_INVALID_BASE64" },
  { name: "base64 with wrong padding (QQ=)", text: raw(message(attachment({ content: "QQ=" }))), code: "MESSAGE_INVALID_BASE64" },
  { name: "base64url alphabet", text: raw(message(attachment({ content: "-_-_" }))), code: "MESSAGE_INVALID_BASE64" },
  { name: "data: URI instead of base64", text: b64(message(attachment({ content: "data:text/plain;base64,QUJD" }))), code: "MESSAGE_INVALID_BASE64" },

  // Size.
  { name: "attachment blob of MAX_MESSAGE_BYTES + 1", text: raw(message(attachment({ content: undefined, blob: BLOB.overLimit }))), code: "MESSAGE_TOO_LARGE" },
  { name: "the same 200 KB blob attached twice", text: b64(message({ attachments: [{ filename: "a.bin", blob: BLOB.twoHundredK }, { filename: "b.bin", blob: BLOB.twoHundredK }] })), code: "MESSAGE_TOO_LARGE" },
  { name: "claim check with 400 KB of inline base64", text: raw({ claimCheck: BLOB.claimOversized }), code: "MESSAGE_TOO_LARGE" },

  // Blobs that do not exist; names that are URLs or paths (SSRF, traversal).
  { name: "attachment blob that does not exist", text: raw(message(attachment({ content: undefined, blob: "missing/file.bin" }))), code: "MESSAGE_BLOB_NOT_FOUND" },
  { name: "claim check that does not exist", text: b64({ claimCheck: "claim-checks/missing.json" }), code: "MESSAGE_BLOB_NOT_FOUND" },
  { name: "attachment blob is a metadata URL", text: raw(message(attachment({ content: undefined, blob: "https://169.254.169.254/x" }))), code: "MESSAGE_INVALID_BLOB_NAME" },
  { name: "attachment blob ../secrets/x", text: b64(message(attachment({ content: undefined, blob: "../secrets/x" }))), code: "MESSAGE_INVALID_BLOB_NAME" },
  { name: "attachment blob /etc/passwd", text: raw(message(attachment({ content: undefined, blob: "/etc/passwd" }))), code: "MESSAGE_INVALID_BLOB_NAME" },
  { name: "attachment blob a//b", text: b64(message(attachment({ content: undefined, blob: "a//b" }))), code: "MESSAGE_INVALID_BLOB_NAME" },
  { name: "attachment blob a/./b", text: raw(message(attachment({ content: undefined, blob: "a/./b" }))), code: "MESSAGE_INVALID_BLOB_NAME" },
  { name: "attachment blob percent-encoded ..", text: b64(message(attachment({ content: undefined, blob: "%2e%2e/secrets/x" }))), code: "MESSAGE_INVALID_BLOB_NAME" },
  { name: "attachment blob with a SAS query", text: raw(message(attachment({ content: undefined, blob: "x.bin?sv=2024-01-01&sig=abc" }))), code: "MESSAGE_INVALID_BLOB_NAME" },
  { name: "empty attachment blob name", text: raw(message(attachment({ content: undefined, blob: "" }))), code: "MESSAGE_INVALID_BLOB_NAME" },
  { name: "claim check is a metadata URL", text: raw({ claimCheck: "http://169.254.169.254/metadata/identity/oauth2/token" }), code: "MESSAGE_INVALID_BLOB_NAME" },
  { name: "claim check leaves the container", text: b64({ claimCheck: "../other-container/x.json" }), code: "MESSAGE_INVALID_BLOB_NAME" },

  // Claim checks whose blob is hostile.
  { name: "claim-check blob that is not JSON", text: raw({ claimCheck: BLOB.claimNotJson }), code: "MESSAGE_NOT_JSON" },
  { name: "claim check pointing at a binary blob", text: b64({ claimCheck: BLOB.junk }), code: "MESSAGE_NOT_JSON" },
  { name: "claim-check blob holding an array", text: raw({ claimCheck: BLOB.claimArray }), code: "MESSAGE_NOT_OBJECT" },
  { name: "claim-check blob with header injection", text: b64({ claimCheck: BLOB.claimInjection }), code: "MESSAGE_HEADER_INJECTION" },
  { name: "claim check pointing at another claim check", text: raw({ claimCheck: BLOB.claimNested }), code: "MESSAGE_UNKNOWN_FIELD" },

  // Valid messages the server refuses: From must be the mailbox (Exchange's SendAs check, mirrored by the sink).
  { name: "spoofed From", text: b64(message({ from: "ceo@contoso.test" })), code: "SMTP_SEND_AS_DENIED" },
  { name: "spoofed From behind the mailbox as display name", text: raw(message({ from: `"${LOCAL_MAILBOX}" <ceo@contoso.test>` })), code: "SMTP_SEND_AS_DENIED" },
];

// ---------------------------------------------------------------------------------------------
// The stack.

let stack: LocalStack;
let workDir: string;
let queue: QueueClient;
let poison: QueueClient;
let container: ContainerClient;
const loggers: CapturedLogger[] = [];
const poisonSeen: PoisonRecord[] = [];

function newLogger(): CapturedLogger {
  const logger = capturingLogger();
  loggers.push(logger);
  return logger;
}

async function upload(name: string, content: Buffer | string): Promise<void> {
  const body = typeof content === "string" ? Buffer.from(content, "utf8") : content;
  await container.getBlockBlobClient(name).uploadData(body);
}

before(async () => {
  workDir = mkdtempSync(join(tmpdir(), "qm-hostile-"));
  stack = await startLocalStack({ caDir: ".test-ca", workDir, outboxDir: join(workDir, "outbox") });
  ({ queue, poison } = await openMailQueues(loadStorageConfig(stack.env)));
  container = await openContainer(loadStorageConfig(stack.env), "mail-attachments");
  await container.createIfNotExists();
  await upload(BLOB.overLimit, Buffer.alloc(MAX_MESSAGE_BYTES + 1, 0x41));
  await upload(BLOB.twoHundredK, Buffer.alloc(200_000, 0x42));
  await upload(BLOB.junk, junkBytes);
  await upload(BLOB.fiveThousand, JSON.stringify(message({ to: recipients(5000, "r") })));
  await upload(BLOB.claimNotJson, '{"to":"ada@example.test","subject":"Hi","text":');
  await upload(BLOB.claimInjection, JSON.stringify(message({ subject: "Hi\r\nBcc: everyone@example.test" })));
  await upload(BLOB.claimNested, JSON.stringify({ claimCheck: BLOB.claimInjection }));
  await upload(BLOB.claimArray, JSON.stringify([message()]));
  await upload(BLOB.claimOversized, JSON.stringify(message(attachment({ content: Buffer.alloc(400_000, 0x43).toString("base64") }))));
  await upload(BLOB.goodAttachment, "Total: 42.00\n");
});

after(async () => {
  await stack?.stop();
  if (workDir) rmSync(workDir, { recursive: true, force: true });
});

beforeEach(async () => {
  await Promise.all([queue.clearMessages(), poison.clearMessages()]);
  stack.smtp.messages.length = 0;
});

/** Every poison entry, taken off the poison queue (peek stops at 32). */
async function takePoison(): Promise<PoisonRecord[]> {
  const records: PoisonRecord[] = [];
  for (;;) {
    const { receivedMessageItems } = await poison.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 300 });
    if (receivedMessageItems.length === 0) break;
    for (const item of receivedMessageItems) records.push(JSON.parse(Buffer.from(item.messageText, "base64").toString("utf8")) as PoisonRecord);
  }
  poisonSeen.push(...records);
  return records;
}

const subjectOf = (m: SinkMessage): string => m.headers["subject"]?.[0] ?? "";

/**
 * Enqueue good, hostile, good, …, hostile, good; drain with the real worker; check the outcome in
 * counts: each hostile text poisoned once with its code and kept exactly, each good one delivered
 * once, nothing retried or left behind.
 */
async function runCorpus(cases: HostileCase[], good: (index: number) => EmailMessageInput, env: Record<string, string>) {
  assert.equal(new Set(cases.map((c) => c.text)).size, cases.length, "every hostile text is distinct (records are matched by text)");
  const goodSent: Array<{ input: EmailMessageInput; result: EnqueueResult }> = [];
  const enqueueGood = async () => {
    const input = good(goodSent.length);
    goodSent.push({ input, result: await enqueueEmail({ queue, attachments: container }, input) });
  };
  await enqueueGood();
  for (const hostile of cases) {
    await queue.sendMessage(hostile.text);
    await enqueueGood();
  }

  const logger = newLogger();
  const summary = await drain(env, logger); // returning at all means the worker did not crash
  const records = await takePoison();
  const outcome = { sent: summary.sent, poisoned: summary.poisoned, retried: summary.retried, waited: summary.waited, duplicates: summary.duplicates, circuitOpen: summary.circuitOpen?.code };
  assert.deepEqual(outcome, { sent: goodSent.length, poisoned: cases.length, retried: 0, waited: 0, duplicates: 0, circuitOpen: undefined }, `worker summary (poison codes seen: ${records.map((r) => r.reason.code).join(", ")})`);

  // One poison record per hostile case, with its code, one attempt, the text exactly as sent.
  assert.equal(records.length, cases.length, "one poison record per hostile message");
  const wrong: string[] = [];
  for (const hostile of cases) {
    const matching = records.filter((r) => r.original === hostile.text);
    if (matching.length !== 1) {
      wrong.push(`${hostile.name}: ${matching.length} records with its exact text`);
      continue;
    }
    const [record] = matching;
    if (record?.reason.code !== hostile.code) wrong.push(`${hostile.name}: expected ${hostile.code}, got ${record?.reason.code} (${record?.reason.message})`);
    if (record?.attempts !== 1) wrong.push(`${hostile.name}: attempts ${record?.attempts}`);
    if (Number.isNaN(Date.parse(record?.failedAt ?? ""))) wrong.push(`${hostile.name}: failedAt ${record?.failedAt}`);
  }
  assert.deepEqual(wrong, [], "every hostile message poisoned once, at once, with its own reason");
  assert.equal(logger.lines.filter((line) => line.includes('"message.poisoned"')).length, cases.length, "one message.poisoned log line per hostile message");
  assert.equal(logger.lines.filter((line) => line.includes('"worker.settle_failed"')).length, 0);

  // Exactly the good subjects, each once; nothing from the hostile side reached the server.
  const delivered = stack.smtp.messages;
  assert.deepEqual(delivered.map(subjectOf).sort(), goodSent.map((g) => g.input.subject).sort(), "the sink got exactly the good messages, each once");
  for (const m of delivered) {
    assert.equal(m.mailFrom, LOCAL_MAILBOX);
    assert.equal(m.headers["bcc"], undefined);
    assert.ok(!m.rcptTo.some((r) => /evil\.test$/i.test(r) || r === "everyone@example.test"), `no hostile recipient: ${m.rcptTo.join(", ")}`);
  }
  assert.equal((await queue.getProperties()).approximateMessagesCount, 0, "the queue is empty");
  assert.equal((await queue.peekMessages({ numberOfMessages: 1 })).peekedMessageItems.length, 0);
  return { goodSent, delivered, records, logger };
}

function deliveredWith(delivered: SinkMessage[], subject: string): SinkMessage {
  const found = delivered.filter((m) => subjectOf(m) === subject);
  assert.equal(found.length, 1, `one delivery of "${subject}"`);
  return found[0] as SinkMessage;
}

// ---------------------------------------------------------------------------------------------
// Good messages, some of them unusual on purpose.

const claimCheckLines = Array.from({ length: 2200 }, (_, i) => `claim-check line ${String(i).padStart(5, "0")} of the long body`);
const smuggling = "before\r\n.\r\nMAIL FROM:<ceo@contoso.test>\r\nRCPT TO:<victim@evil.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n.\r\nafter";

function goodMessage(index: number, to = `good${index}@example.test`): EmailMessageInput {
  const subject = `Good ${String(index).padStart(3, "0")}`;
  switch (index) {
    case 0: // over 64 KiB: travels as a claim check
      return { to, subject, text: claimCheckLines.join("\r\n") };
    case 1:
      return { to, subject, text: "see attachment", attachments: [{ filename: "receipt.txt", contentType: "text/plain", blob: BLOB.goodAttachment }] };
    case 2: // CR and LF are fine in bodies
      return { to, subject, text: "Line 1\r\nLine 2\nLine 3\rLine 4", html: "<p>one</p>\n<p>two</p>\r\n<p>three</p>" };
    case 3: // SMTP smuggling attempt in the body: must arrive as one message, dot-stuffed
      return { to, subject, text: smuggling };
    case 4: // exactly the recipient limit
      return { to: recipients(250, "to"), cc: recipients(150, "cc"), bcc: recipients(100, "bcc"), subject, text: "500 recipients" };
    case 5: // TAB is allowed in header values; a quoted display name may hold a comma
      return { to: `"Hopper, Grace" <${to}>`, subject, text: "x", headers: { "X-Tabbed": "a\tb" }, replyTo: "support@example.test" };
    default:
      return index % 3 === 0
        ? { to, cc: `cc${index}@example.test`, subject, html: `<p>Good ${index}</p>`, headers: { "X-Good": String(index) } }
        : index % 3 === 1
          ? { to, subject, text: `Body ${index} \u2013 gr\u00fc\u00dfe`, attachments: [{ filename: `n${index}.txt`, content: Buffer.from(`note ${index}`).toString("base64") }] }
          : { to: [to, `second${index}@example.test`], subject, text: `Body ${index}` };
  }
}

describe("hostile queue messages between good ones", () => {
  it(`poisons each of the ${corpus.length} hostile messages with its reason and delivers every good one between them`, async () => {
    assert.ok(corpus.length >= 55, `corpus has ${corpus.length} cases`);
    const env = { ...stack.env, MAX_MESSAGE_BYTES: String(MAX_MESSAGE_BYTES), ALLOWED_RECIPIENT_DOMAINS: "" };
    const { goodSent, delivered } = await runCorpus(corpus, goodMessage, env);

    // The claim check: switched to automatically, delivered with the whole body, blob removed after.
    const claim = goodSent[0];
    assert.ok(claim?.result.claimCheck, "the > 64 KiB message travelled as a claim check");
    const claimRaw = deliveredWith(delivered, claim.input.subject).raw.toString("utf8");
    assert.equal(claimRaw.split("claim-check line ").length - 1, claimCheckLines.length, "the whole body arrived");
    assert.ok(claimRaw.includes(claimCheckLines.at(-1) ?? "never"));
    assert.equal(await container.getBlobClient(claim.result.claimCheck).exists(), false, "claim-check blob deleted once sent");

    const withBlob = deliveredWith(delivered, goodSent[1]?.input.subject ?? "").raw.toString("utf8");
    assert.match(withBlob, /filename=receipt\.txt/);
    assert.ok(withBlob.includes(Buffer.from("Total: 42.00\n").toString("base64")), "blob attachment content is in the message");

    const multiLine = deliveredWith(delivered, goodSent[2]?.input.subject ?? "").raw.toString("utf8");
    for (const line of ["Line 1", "Line 2", "Line 3", "Line 4", "<p>three</p>"]) assert.ok(multiLine.includes(line), line);

    const smuggled = deliveredWith(delivered, goodSent[3]?.input.subject ?? "");
    assert.deepEqual(smuggled.rcptTo, ["good3@example.test"]);
    assert.ok(smuggled.raw.toString("utf8").includes(`\r\n\r\n${smuggling}\r\n`), "the body arrived whole: its lone dots were stuffed, not taken as end of data");
    assert.ok(!delivered.some((m) => /smuggled/.test(subjectOf(m))));

    assert.equal(deliveredWith(delivered, goodSent[4]?.input.subject ?? "").rcptTo.length, 500);
    assert.equal(deliveredWith(delivered, goodSent[5]?.input.subject ?? "").headers["x-tabbed"]?.[0], "a\tb");
  });

  it("with ALLOWED_RECIPIENT_DOMAINS=example.test and a 20 000-byte limit, poisons recipients elsewhere and oversized bodies", async () => {
    const cases: HostileCase[] = [
      { name: "to at evil.test", text: b64(message({ to: "x@evil.test" })), code: "MESSAGE_RECIPIENT_NOT_ALLOWED" },
      { name: "cc at evil.test", text: raw(message({ cc: ["a@example.test", "x@evil.test"] })), code: "MESSAGE_RECIPIENT_NOT_ALLOWED" },
      { name: "bcc with an allowed address as display name", text: b64(message({ bcc: '"a@example.test" <x@evil.test>' })), code: "MESSAGE_RECIPIENT_NOT_ALLOWED" },
      { name: "subdomain of the allowed domain", text: raw(message({ to: "x@evil.example.test" })), code: "MESSAGE_RECIPIENT_NOT_ALLOWED" },
      { name: "allowed domain as a prefix", text: b64(message({ to: "x@example.test.evil.test" })), code: "MESSAGE_RECIPIENT_NOT_ALLOWED" },
      { name: "homograph (Cyrillic a)", text: raw(message({ to: "x@ex\u0430mple.test" })), code: "MESSAGE_RECIPIENT_NOT_ALLOWED" },
      // Issue 15: group syntax is refused by validation now, before the sandbox looks at it.
      { name: "group with one outside recipient", text: raw(message({ to: "team: x@evil.test;" })), code: "MESSAGE_INVALID_ADDRESS" },
      { name: "inline attachment decoding over the limit", text: raw(message(attachment({ content: Buffer.alloc(21_000, 0x44).toString("base64") }))), code: "MESSAGE_TOO_LARGE" },
      { name: "text body over the limit", text: b64(message({ text: "x".repeat(20_001) })), code: "MESSAGE_TOO_LARGE" },
    ];
    const good = (index: number): EmailMessageInput => {
      const subject = `Sandboxed ${index}`;
      if (index === 0) return { to: "A@EXAMPLE.TEST", subject, text: "domain case does not matter" };
      if (index === 1) return { to: '"Evil, Inc." <a@example.test>', cc: "b@example.test", subject, text: "display names do not matter" };
      return { to: `s${index}@example.test`, subject, text: "x".repeat(19_000) };
    };
    const { delivered } = await runCorpus(cases, good, { ...stack.env, MAX_MESSAGE_BYTES: "20000", ALLOWED_RECIPIENT_DOMAINS: "example.test" });
    for (const m of delivered) assert.ok(m.rcptTo.every((r) => r.toLowerCase().endsWith("@example.test")), m.rcptTo.join(", "));
  });

  // Regressions for two bugs this corpus found: sandbox bypass through the address parser, and
  // claim-check blobs measured in base64 bytes. Since issue 15 these strings are not one mailbox
  // and validation refuses them outright (MESSAGE_INVALID_ADDRESS), so the sandbox never has to
  // guess which of the two addresses nodemailer would have picked.
  it(
    "keeps the sandbox when an outside address hides behind an allowed one in the same string",
    async () => {
      const code = "MESSAGE_INVALID_ADDRESS";
      const cases: HostileCase[] = [
        { name: "angle address, then an allowed address as text", text: b64(message({ to: "<x@evil.test> y@example.test" })), code },
        { name: "outside address, then an allowed one as text", text: raw(message({ to: "x@evil.test y@example.test" })), code },
        { name: "unclosed comment holding an allowed address", text: b64(message({ cc: "x@evil.test (y@example.test" })), code },
        { name: "display name, angle address, allowed text", text: raw(message({ bcc: ['"n" <x@evil.test> y@example.test'] })), code },
      ];
      const good = (index: number): EmailMessageInput => ({ to: `s${index}@example.test`, subject: `Sandbox guard ${index}`, text: "x" });
      await runCorpus(cases, good, { ...stack.env, ALLOWED_RECIPIENT_DOMAINS: "example.test" });
    },
  );

  it(
    "delivers a claim-check message within MAX_MESSAGE_BYTES whose JSON (base64 attachments) is larger than it",
    async () => {
      const content = Buffer.alloc(240_000, 0x45); // 240 000 decoded bytes, 320 000 as base64
      const input: EmailMessageInput = { to: "big@example.test", subject: "Big but within the limit", text: "x", attachments: [{ filename: "big.bin", content: content.toString("base64") }] };
      const result = await enqueueEmail({ queue, attachments: container }, input);
      assert.ok(result.claimCheck, "travelled as a claim check");
      const summary = await drain({ ...stack.env, MAX_MESSAGE_BYTES: String(MAX_MESSAGE_BYTES) }, newLogger());
      const records = await takePoison();
      assert.deepEqual(records.map((r) => `${r.reason.code}: ${r.reason.message}`), [], "not poisoned");
      assert.equal(summary.sent, 1);
      deliveredWith(stack.smtp.messages, input.subject);
    },
  );

  it("leaves no token, assertion, key, secret or XOAUTH2 string in logs or poison records", () => {
    const lines = loggers.flatMap((l) => l.lines);
    assert.ok(lines.some((line) => line.includes('"assertion.created"')), "debug logs were captured");
    assert.ok(lines.some((line) => line.includes('"token.acquired"')), "a token was fetched");
    assert.ok(poisonSeen.length >= corpus.length, "poison records were captured");
    const keyBody = stack.clientCertificate.privateKeyPem.split("\n")[1] ?? "never";
    // The corpus itself must not contain these shapes, or a hit below would mean nothing.
    const corpusText = corpus.map((c) => c.text).join("\n");
    assert.doesNotMatch(corpusText, /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\.|PRIVATE KEY|dXNlcj/);
    const text = `${lines.join("\n")}\n${JSON.stringify(poisonSeen)}`;
    assert.doesNotMatch(text, /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\./, "no JWT (token or assertion)");
    assert.doesNotMatch(text, /PRIVATE KEY/);
    assert.doesNotMatch(text, /dXNlcj/, "no XOAUTH2 initial response");
    assert.ok(!text.includes(keyBody), "no key material");
  });
});
