// Queue text → validated EmailMessage: the published JSON Schema, validateMessage/parseMessage and
// decodeQueueText. Every rejection is asserted by its stable `code` (and `field`), never by wording.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";
import Ajv2020Module from "ajv/dist/2020.js";
import { MailerError } from "../shared/errors.js";
import { MAX_ID_LENGTH, MAX_RECIPIENTS, emailMessageSchema } from "../shared/message/schema.js";
import { MessageError, parseMessage, validateMessage, type MessageErrorCode } from "../shared/message/validate.js";
import { decodeQueueText } from "../shared/queue/decode.js";

// ---------------------------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------------------------

const DEFAULTS = { from: "Queue Mailer <noreply@contoso.test>", id: "queue-message-0001" };
const SCHEMA_FILE = new URL("../schema/email-message.v1.json", import.meta.url);

/** The smallest valid message, with overrides (an override of `undefined` removes the field). */
function message(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  const result: Record<string, unknown> = { to: "ada@example.com", subject: "Hello", text: "Hi Ada", ...overrides };
  for (const [key, value] of Object.entries(result)) if (value === undefined) delete result[key];
  return result;
}

/** A valid message with one attachment, with overrides applied to the attachment. */
function withAttachment(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  const attachment: Record<string, unknown> = { filename: "report.txt", contentType: "text/plain", content: "aGVsbG8=", ...overrides };
  for (const [key, value] of Object.entries(attachment)) if (value === undefined) delete attachment[key];
  return message({ attachments: [attachment] });
}

/** A valid message with one custom header. */
function withHeader(name: string, value: unknown): Record<string, unknown> {
  return message({ headers: { [name]: value } });
}

function addresses(count: number, prefix: string): string[] {
  return Array.from({ length: count }, (_, index) => `${prefix}${index}@example.com`);
}

/** Runs `run`, which must throw a MessageError, and returns that error. */
function rejectionOf(run: () => unknown): MessageError {
  try {
    run();
  } catch (error) {
    assert.ok(error instanceof MessageError, `expected a MessageError, got ${String(error)}`);
    return error;
  }
  return assert.fail("expected a MessageError, but the message was accepted");
}

function isRejected(json: unknown): boolean {
  try {
    validateMessage(json, DEFAULTS);
    return false;
  } catch {
    return true;
  }
}

// ---------------------------------------------------------------------------------------------
// The corpus: valid messages and invalid ones with the code (and field) each must produce
// ---------------------------------------------------------------------------------------------

interface ValidCase {
  name: string;
  message: Record<string, unknown>;
}

interface InvalidCase {
  name: string;
  message: unknown;
  code: MessageErrorCode;
  /** The `field` the error must name; undefined for errors about the message as a whole. */
  field?: string;
  /** Extra check on the human text, where it carries a number worth pinning. */
  text?: RegExp;
}

const validCases: ValidCase[] = [
  { name: "minimal to, subject, text", message: message() },
  { name: "html only", message: message({ text: undefined, html: "<p>Hi Ada</p>" }) },
  { name: "text and html", message: message({ html: "<p>Hi Ada</p>" }) },
  {
    name: "address arrays in to, cc, bcc, replyTo",
    message: message({
      to: ["ada@example.com", "Alan Turing <alan@example.com>"],
      cc: ["grace@example.com"],
      bcc: ["audit@example.com"],
      replyTo: ["support@example.com"],
    }),
  },
  { name: "display name with a quoted comma is one address", message: message({ to: '"Hopper, Grace" <grace@example.com>' }) },
  { name: "explicit from", message: message({ from: "Billing <billing@contoso.test>" }) },
  { name: "explicit id", message: message({ id: "order-42-confirmation" }) },
  { name: `id of exactly ${MAX_ID_LENGTH} characters`, message: message({ id: "i".repeat(MAX_ID_LENGTH) }) },
  { name: "attachment", message: withAttachment() },
  { name: "attachment without contentType", message: withAttachment({ contentType: undefined }) },
  { name: "custom X- headers", message: message({ headers: { "X-Campaign": "spring", "X-Trace": "a\tb" } }) },
  { name: "unicode subject with a TAB", message: message({ subject: "Grüße\tfrom 東京 👋" }) },
  { name: "CR and LF in text and html bodies", message: message({ text: "line 1\r\nline 2\n", html: "<p>1</p>\r\n<p>2</p>" }) },
  { name: "unicode address (SMTPUTF8)", message: message({ to: "José <josé@exämple.com>" }) },
  {
    name: `exactly ${MAX_RECIPIENTS} recipients across to, cc, bcc`,
    message: message({ to: addresses(200, "to"), cc: addresses(200, "cc"), bcc: addresses(100, "bcc") }),
  },
];

const invalidCases: InvalidCase[] = [
  // The message as a whole
  { name: "an array", message: [message()], code: "MESSAGE_NOT_OBJECT" },
  { name: "null", message: null, code: "MESSAGE_NOT_OBJECT" },
  { name: "a string", message: "to: ada@example.com", code: "MESSAGE_NOT_OBJECT" },
  { name: "a number", message: 42, code: "MESSAGE_NOT_OBJECT" },
  { name: "unknown field (case matters: Subject)", message: message({ Subject: "Hello" }), code: "MESSAGE_UNKNOWN_FIELD", field: "Subject" },
  { name: "unknown attachment field", message: withAttachment({ data: "aGVsbG8=" }), code: "MESSAGE_UNKNOWN_FIELD", field: "attachments[0].data" },
  { name: "no to", message: message({ to: undefined }), code: "MESSAGE_MISSING_FIELD", field: "to" },
  { name: "no subject", message: message({ subject: undefined }), code: "MESSAGE_MISSING_FIELD", field: "subject" },
  { name: "attachment without content", message: withAttachment({ content: undefined }), code: "MESSAGE_MISSING_FIELD", field: "attachments[0].content" },
  { name: "attachment without filename", message: withAttachment({ filename: undefined }), code: "MESSAGE_MISSING_FIELD", field: "attachments[0].filename" },
  { name: "no text and no html", message: message({ text: undefined }), code: "MESSAGE_NO_BODY" },

  // Types
  { name: "to: 5", message: message({ to: 5 }), code: "MESSAGE_INVALID_TYPE", field: "to" },
  { name: "to: []", message: message({ to: [] }), code: "MESSAGE_INVALID_TYPE", field: "to" },
  { name: "to: [5]", message: message({ to: [5] }), code: "MESSAGE_INVALID_TYPE", field: "to[0]" },
  { name: "cc: null", message: message({ cc: null }), code: "MESSAGE_INVALID_TYPE", field: "cc" },
  { name: "subject: 3", message: message({ subject: 3 }), code: "MESSAGE_INVALID_TYPE", field: "subject" },
  { name: "text: null", message: message({ text: null }), code: "MESSAGE_INVALID_TYPE", field: "text" },
  { name: "headers: []", message: message({ headers: [] }), code: "MESSAGE_INVALID_TYPE", field: "headers" },
  { name: "header value not a string", message: withHeader("X-Count", 3), code: "MESSAGE_INVALID_TYPE", field: 'headers["X-Count"]' },
  { name: "attachments: {}", message: message({ attachments: {} }), code: "MESSAGE_INVALID_TYPE", field: "attachments" },

  // Lengths
  { name: `id of ${MAX_ID_LENGTH + 1} characters`, message: message({ id: "i".repeat(MAX_ID_LENGTH + 1) }), code: "MESSAGE_FIELD_TOO_LONG", field: "id", text: /got 257/ },
  { name: "empty id", message: message({ id: "" }), code: "MESSAGE_FIELD_TOO_LONG", field: "id" },
  { name: "subject of 999 characters", message: message({ subject: "s".repeat(999) }), code: "MESSAGE_FIELD_TOO_LONG", field: "subject" },

  // Header injection: any CR, LF or NUL in a header field is refused, never stripped
  { name: "CRLF in subject", message: message({ subject: "Hi\r\nBcc: victim@example.com" }), code: "MESSAGE_HEADER_INJECTION", field: "subject" },
  { name: "NUL in subject", message: message({ subject: "Hi\u0000" }), code: "MESSAGE_HEADER_INJECTION", field: "subject" },
  { name: "LF in to", message: message({ to: "ada@example.com\nBcc: victim@example.com" }), code: "MESSAGE_HEADER_INJECTION", field: "to" },
  { name: "CR in a to array item", message: message({ to: ["ada@example.com", "alan@example.com\r"] }), code: "MESSAGE_HEADER_INJECTION", field: "to[1]" },
  { name: "LF in from", message: message({ from: "billing@contoso.test\nX-Evil: 1" }), code: "MESSAGE_HEADER_INJECTION", field: "from" },
  {
    name: "CRLF in a display name",
    message: message({ to: '"Grace\r\nBcc: victim@example.com" <grace@example.com>' }),
    code: "MESSAGE_HEADER_INJECTION",
    field: "to",
  },
  { name: "TAB in an address", message: message({ cc: "ada@example.com\t" }), code: "MESSAGE_HEADER_INJECTION", field: "cc" },
  { name: "CRLF in a custom header value", message: withHeader("X-Campaign", "spring\r\nBcc: victim@example.com"), code: "MESSAGE_HEADER_INJECTION", field: 'headers["X-Campaign"]' },
  { name: "LF in an attachment filename", message: withAttachment({ filename: "report\n.txt" }), code: "MESSAGE_HEADER_INJECTION", field: "attachments[0].filename" },
  { name: "CR in an attachment contentType", message: withAttachment({ contentType: "text/plain\r" }), code: "MESSAGE_HEADER_INJECTION", field: "attachments[0].contentType" },
  { name: "NUL in id", message: message({ id: "order-42\u0000" }), code: "MESSAGE_HEADER_INJECTION", field: "id" },
  { name: "LF in id", message: message({ id: "order-42\n" }), code: "MESSAGE_HEADER_INJECTION", field: "id" },

  // Addresses
  // Issue 15: the wording changed with the strict parser (it names what was found, not a count).
  { name: "two addresses in one to string", message: message({ to: "a@b.example, c@d.example" }), code: "MESSAGE_INVALID_ADDRESS", field: "to", text: /more than one address/ },
  { name: "a group in one to string", message: message({ to: "Team: a@b.example, c@d.example;" }), code: "MESSAGE_INVALID_ADDRESS", field: "to", text: /group syntax/ },
  { name: "not-an-address", message: message({ to: "not-an-address" }), code: "MESSAGE_INVALID_ADDRESS", field: "to" },
  { name: "a@ (no domain)", message: message({ to: "a@" }), code: "MESSAGE_INVALID_ADDRESS", field: "to" },
  { name: "@b.com (no local part)", message: message({ to: "@b.com" }), code: "MESSAGE_INVALID_ADDRESS", field: "to" },
  { name: "empty string in cc", message: message({ cc: [""] }), code: "MESSAGE_INVALID_ADDRESS", field: "cc[0]" },
  { name: "bad replyTo", message: message({ replyTo: "support" }), code: "MESSAGE_INVALID_ADDRESS", field: "replyTo" },
  { name: "bad from", message: message({ from: "billing@" }), code: "MESSAGE_INVALID_ADDRESS", field: "from" },
  {
    name: `${MAX_RECIPIENTS + 1} recipients across to, cc, bcc`,
    message: message({ to: addresses(200, "to"), cc: addresses(200, "cc"), bcc: addresses(101, "bcc") }),
    code: "MESSAGE_TOO_MANY_RECIPIENTS",
    field: "to",
    text: /501 recipients/,
  },

  // Custom headers
  { name: "header name with a space", message: withHeader("Bad Name", "x"), code: "MESSAGE_INVALID_HEADER", field: 'headers["Bad Name"]' },
  { name: "header name with a colon", message: withHeader("X-A:B", "x"), code: "MESSAGE_INVALID_HEADER", field: 'headers["X-A:B"]' },
  { name: "From header", message: withHeader("From", "ceo@contoso.test"), code: "MESSAGE_FORBIDDEN_HEADER", field: 'headers["From"]' },
  { name: "bcc header (lower case)", message: withHeader("bcc", "victim@example.com"), code: "MESSAGE_FORBIDDEN_HEADER", field: 'headers["bcc"]' },
  { name: "Content-Type header", message: withHeader("Content-Type", "text/html"), code: "MESSAGE_FORBIDDEN_HEADER", field: 'headers["Content-Type"]' },
  { name: "CONTENT-TYPE header (upper case)", message: withHeader("CONTENT-TYPE", "text/html"), code: "MESSAGE_FORBIDDEN_HEADER", field: 'headers["CONTENT-TYPE"]' },

  // Attachment content
  { name: "attachment content not base64", message: withAttachment({ content: "not base64!!" }), code: "MESSAGE_INVALID_BASE64", field: "attachments[0].content" },
  { name: "attachment content with bad padding", message: withAttachment({ content: "aGVsbG8" }), code: "MESSAGE_INVALID_BASE64", field: "attachments[0].content" },
];

// Attachment bounds from the schema, the field path of attachment type errors, and __proto__.
invalidCases.push(
  {
    name: "attachment filename of 256 characters",
    message: withAttachment({ filename: "f".repeat(256) }),
    code: "MESSAGE_FIELD_TOO_LONG",
    field: "attachments[0].filename",
  },
  {
    name: "attachment contentType of 2 characters",
    message: withAttachment({ contentType: "ab" }),
    code: "MESSAGE_FIELD_TOO_LONG", // the length-bounds code, as for an empty id
    field: "attachments[0].contentType",
  },
  {
    name: "attachment content: 5",
    message: withAttachment({ content: 5 }),
    code: "MESSAGE_INVALID_TYPE",
    field: "attachments[0].content",
  },
  {
    name: "__proto__ header name",
    message: JSON.parse('{"to":"a@example.com","subject":"s","text":"t","headers":{"__proto__":"x"}}'),
    code: "MESSAGE_INVALID_HEADER",
    field: 'headers["__proto__"]',
  },
);

// ---------------------------------------------------------------------------------------------
// Published schema
// ---------------------------------------------------------------------------------------------

describe("published schema (schema/email-message.v1.json)", () => {
  const published: unknown = JSON.parse(readFileSync(SCHEMA_FILE, "utf8"));
  // ajv is CommonJS; under NodeNext its default import is module.exports, whose .default is the class.
  const Ajv2020 = Ajv2020Module.default;
  // date-time is checked by the schema's own pattern; ajv only needs to know the format name.
  const ajv = new Ajv2020({ allErrors: true, formats: { "date-time": true } });
  const schemaAccepts = ajv.compile(published as object);
  const corpus: Array<{ name: string; message: unknown }> = [...validCases, ...invalidCases];

  test("equals emailMessageSchema", () => {
    assert.deepEqual(published, emailMessageSchema, "schema/email-message.v1.json is stale: run node --import tsx scripts/writeSchema.ts");
  });

  test(`the corpus is big enough to mean something (${corpus.length} messages)`, () => {
    assert.ok(corpus.length >= 15);
  });

  test("accepts every valid message in the corpus (which validateMessage accepts too)", () => {
    for (const { name, message } of validCases) {
      assert.doesNotThrow(() => validateMessage(message, DEFAULTS), `validateMessage rejects "${name}"`);
      assert.ok(schemaAccepts(message), `the schema rejects "${name}": ${ajv.errorsText(schemaAccepts.errors)}`);
    }
  });

  test("every message the schema rejects, validateMessage rejects too", () => {
    const acceptedAnyway = corpus
      .filter(({ message }) => !schemaAccepts(message))
      .filter(({ message }) => !isRejected(message))
      .map(({ name }) => name);
    assert.deepEqual(acceptedAnyway, [], "validateMessage accepts messages the published schema rejects");
  });

  // Also keeps the test above from passing vacuously: the schema must actually reject things.
  test("rejects the structural mistakes itself, so producers validating against it catch them early", () => {
    const structural = new Set<MessageErrorCode>([
      "MESSAGE_NOT_OBJECT", "MESSAGE_UNKNOWN_FIELD", "MESSAGE_MISSING_FIELD", "MESSAGE_INVALID_TYPE", "MESSAGE_NO_BODY", "MESSAGE_FIELD_TOO_LONG",
    ]);
    const missed = invalidCases
      .filter(({ code }) => structural.has(code))
      .filter(({ message }) => schemaAccepts(message))
      .map(({ name }) => name);
    assert.deepEqual(missed, [], "the published schema accepts structurally invalid messages");
  });
});

// ---------------------------------------------------------------------------------------------
// validateMessage / parseMessage: valid messages
// ---------------------------------------------------------------------------------------------

describe("validateMessage: valid messages", () => {
  test("minimal {to, subject, text} is normalised with defaults", () => {
    assert.deepEqual(validateMessage(message(), DEFAULTS), {
      id: DEFAULTS.id,
      from: { name: "Queue Mailer", address: "noreply@contoso.test" },
      to: [{ name: "", address: "ada@example.com" }],
      cc: [],
      bcc: [],
      replyTo: [],
      subject: "Hello",
      text: "Hi Ada",
      headers: {},
      attachments: [],
    });
  });

  test("html only: no text key at all", () => {
    const result = validateMessage(message({ text: undefined, html: "<p>Hi</p>" }), DEFAULTS);
    assert.equal(result.html, "<p>Hi</p>");
    assert.equal("text" in result, false);
  });

  // Issue 15: addresses come back parsed ({ name, address }, what is sent), no longer as written.
  test("address arrays are parsed into mailboxes, in order", () => {
    const result = validateMessage(
      message({ to: ["ada@example.com", "Alan Turing <alan@example.com>"], cc: ["grace@example.com"], bcc: "audit@example.com", replyTo: ["support@example.com"] }),
      DEFAULTS,
    );
    assert.deepEqual(result.to, [{ name: "", address: "ada@example.com" }, { name: "Alan Turing", address: "alan@example.com" }]);
    assert.deepEqual(result.cc, [{ name: "", address: "grace@example.com" }]);
    assert.deepEqual(result.bcc, [{ name: "", address: "audit@example.com" }]);
    assert.deepEqual(result.replyTo, [{ name: "", address: "support@example.com" }]);
  });

  test('a quoted comma in a display name is ONE address: "Hopper, Grace" <grace@example.com>', () => {
    const to = '"Hopper, Grace" <grace@example.com>';
    assert.deepEqual(validateMessage(message({ to }), DEFAULTS).to, [{ name: "Hopper, Grace", address: "grace@example.com" }]);
  });

  test("from defaults to defaults.from; an explicit from wins", () => {
    assert.deepEqual(validateMessage(message(), DEFAULTS).from, { name: "Queue Mailer", address: "noreply@contoso.test" });
    assert.deepEqual(validateMessage(message({ from: "billing@contoso.test" }), DEFAULTS).from, { name: "", address: "billing@contoso.test" });
  });

  test("id defaults to defaults.id; an explicit id wins", () => {
    assert.equal(validateMessage(message(), DEFAULTS).id, DEFAULTS.id);
    assert.equal(validateMessage(message({ id: "order-42" }), DEFAULTS).id, "order-42");
  });

  test("attachments decode base64 to the exact bytes, line breaks allowed", () => {
    const bytes = Buffer.from([0x00, 0xff, 0x10, 0x80, 0x7f, 0x0d, 0x0a, 0x00]);
    const encoded = bytes.toString("base64");
    const wrapped = Buffer.from("x".repeat(100)).toString("base64").replace(/.{76}/g, "$&\r\n");
    const result = validateMessage(
      message({
        attachments: [
          { filename: "binary.bin", contentType: "application/octet-stream", content: encoded },
          { filename: "wrapped.txt", content: wrapped },
          { filename: "empty.txt", content: "" },
        ],
      }),
      DEFAULTS,
    );
    assert.deepEqual(result.attachments, [
      { filename: "binary.bin", contentType: "application/octet-stream", content: bytes },
      { filename: "wrapped.txt", content: Buffer.from("x".repeat(100)) },
      { filename: "empty.txt", content: Buffer.alloc(0) },
    ]);
  });

  test("custom X- headers pass through (TAB allowed in a value)", () => {
    const headers = { "X-Campaign": "spring-2025", "X-Trace": "a\tb", "x-lower-case": "ok" };
    assert.deepEqual(validateMessage(message({ headers }), DEFAULTS).headers, headers);
  });

  test("unicode subject with a TAB", () => {
    const subject = "Grüße\tfrom 東京 👋";
    assert.equal(validateMessage(message({ subject }), DEFAULTS).subject, subject);
  });

  test("CR and LF in text and html bodies are fine", () => {
    const result = validateMessage(message({ text: "line 1\r\nline 2\n", html: "<p>1</p>\r\n<p>2</p>" }), DEFAULTS);
    assert.equal(result.text, "line 1\r\nline 2\n");
    assert.equal(result.html, "<p>1</p>\r\n<p>2</p>");
  });

  test("parseMessage parses JSON text the same way", () => {
    const json = message({ cc: ["grace@example.com"] });
    assert.deepEqual(parseMessage(JSON.stringify(json), DEFAULTS), validateMessage(json, DEFAULTS));
  });

  for (const { name, message: valid } of validCases) {
    test(`corpus: ${name}`, () => {
      assert.doesNotThrow(() => validateMessage(valid, DEFAULTS));
    });
  }
});

// ---------------------------------------------------------------------------------------------
// validateMessage / parseMessage: invalid messages
// ---------------------------------------------------------------------------------------------

describe("validateMessage: invalid messages", () => {
  test("MESSAGE_NOT_JSON: parseMessage on truncated JSON", () => {
    const error = rejectionOf(() => parseMessage("{", DEFAULTS));
    assert.equal(error.code, "MESSAGE_NOT_JSON");
    assert.equal(error.field, undefined);
  });

  test("MESSAGE_NOT_OBJECT: parseMessage on JSON that is not an object", () => {
    for (const text of ["[]", "null", '"hello"']) {
      assert.equal(rejectionOf(() => parseMessage(text, DEFAULTS)).code, "MESSAGE_NOT_OBJECT", text);
    }
  });

  for (const { name, message: invalid, code, field, text } of invalidCases) {
    test(`${code}: ${name}`, () => {
      const error = rejectionOf(() => validateMessage(invalid, DEFAULTS));
      assert.equal(error.code, code, error.message);
      assert.equal(error.field, field, error.message);
      if (text !== undefined) assert.match(error.message, text);
    });
  }

});

describe("validateMessage: every rejection is a permanent MessageError", () => {
  test("class, kind, code and a hint, for every invalid message and for unparsable text", () => {
    const runs: Array<() => unknown> = [
      () => parseMessage("{", DEFAULTS),
      () => parseMessage("not json at all", DEFAULTS),
      ...invalidCases.map(({ message: invalid }) => () => validateMessage(invalid, DEFAULTS)),
    ];
    for (const run of runs) {
      const error = rejectionOf(run);
      assert.ok(error instanceof MailerError);
      assert.equal(error.name, "MessageError");
      assert.equal(error.kind, "permanent", error.code);
      assert.match(error.code, /^MESSAGE_[A-Z0-9_]+$/);
      assert.ok(error.hint);
      assert.equal(error.toJSON().kind, "permanent");
    }
  });
});

// ---------------------------------------------------------------------------------------------
// decodeQueueText
// ---------------------------------------------------------------------------------------------

describe("decodeQueueText", () => {
  const json = JSON.stringify(message({ subject: "Grüße 👋" }));
  const base64 = (text: string) => Buffer.from(text, "utf8").toString("base64");

  test("raw JSON is returned unchanged", () => {
    assert.equal(decodeQueueText(json), json);
  });

  test("raw JSON with leading whitespace is returned unchanged, and still parses", () => {
    const padded = `  \n\t${json}`;
    assert.equal(decodeQueueText(padded), padded);
    assert.equal(parseMessage(decodeQueueText(padded), DEFAULTS).subject, "Grüße 👋");
  });

  test("base64 of JSON is decoded (UTF-8), with or without surrounding whitespace", () => {
    assert.equal(decodeQueueText(base64(json)), json);
    assert.equal(decodeQueueText(`${base64(json)}\n`), json);
    assert.equal(decodeQueueText(base64(`  ${json}`)), `  ${json}`);
  });

  test("base64 of something that is not a JSON object is returned as received", () => {
    for (const text of [base64("hello world!"), base64("[1,2,3]"), base64("true")]) {
      assert.equal(decodeQueueText(text), text);
    }
  });

  test("text that is not base64 is returned unchanged", () => {
    for (const text of ["not base64!!", "hello world", "abc", "", "{", "null"]) {
      assert.equal(decodeQueueText(text), text);
    }
  });

  test("end to end: base64 queue text → validated message", () => {
    const result = parseMessage(decodeQueueText(base64(json)), DEFAULTS);
    assert.equal(result.subject, "Grüße 👋");
    assert.deepEqual(result.to, [{ name: "", address: "ada@example.com" }]);
  });

  test("end to end: base64 of non-JSON fails as MESSAGE_NOT_JSON on the text as received", () => {
    const error = rejectionOf(() => parseMessage(decodeQueueText(base64("hello world!")), DEFAULTS));
    assert.equal(error.code, "MESSAGE_NOT_JSON");
  });
});
