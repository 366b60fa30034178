// Step 2 of a message's path: queue text → a validated EmailMessage, or a MessageError whose code
// says exactly what is wrong. A message that fails here is never retried: it is the producer's bug.
import { MailerError } from "../errors.js";
import { parseMailbox, type Mailbox } from "./address.js";
import { LargeJsonString } from "./claimCheckJson.js";
import { MAX_ID_LENGTH, MAX_RECIPIENTS, TEMPLATE_NAME_PATTERN, TIMESTAMP_PATTERN, emailMessageSchema, type EmailMessage } from "./schema.js";

export type MessageErrorCode =
  | "MESSAGE_NOT_JSON"
  | "MESSAGE_NOT_OBJECT"
  | "MESSAGE_UNKNOWN_FIELD"
  | "MESSAGE_MISSING_FIELD"
  | "MESSAGE_INVALID_TYPE"
  | "MESSAGE_NO_BODY"
  | "MESSAGE_FIELD_TOO_LONG"
  | "MESSAGE_HEADER_INJECTION"
  | "MESSAGE_INVALID_ADDRESS"
  | "MESSAGE_TOO_MANY_RECIPIENTS"
  | "MESSAGE_INVALID_HEADER"
  | "MESSAGE_FORBIDDEN_HEADER"
  | "MESSAGE_INVALID_BASE64"
  | "MESSAGE_INVALID_BLOB_NAME"
  | "MESSAGE_BLOB_NOT_FOUND"
  | "MESSAGE_TOO_LARGE"
  | "MESSAGE_RECIPIENT_NOT_ALLOWED"
  | "MESSAGE_INVALID_DATE"
  | "MESSAGE_INVALID_TEMPLATE";

export class MessageError extends MailerError {
  readonly field: string | undefined;
  constructor(code: MessageErrorCode, message: string, field?: string) {
    super(code, message, { kind: "permanent", hint: "Fix the producer; this message will not be retried." });
    this.name = "MessageError";
    this.field = field;
  }
}

const knownFields = new Set(Object.keys(emailMessageSchema.properties));
const attachmentFields = new Set(Object.keys(emailMessageSchema.properties.attachments.items.properties));

// Headers that structure the message or the transfer come from the message fields or from us;
// letting a producer set them would allow spoofing or breaking the MIME tree.
const structuralHeaders = new Set([
  "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "mime-version",
  "return-path", "received", "dkim-signature", "content-type", "content-transfer-encoding",
  "content-disposition", "content-id", "content-description", "content-language", "content-location",
]);

// Any control character (C0 incl. CR, LF, NUL and DEL) in a header field means a bug or an
// injection attempt upstream: refused, never stripped. TAB is allowed only in header values.
// eslint-disable-next-line no-control-regex
const controlCharacters = /[\u0000-\u0008\u000a-\u001f\u007f]/;
// eslint-disable-next-line no-control-regex
const controlCharactersWithTab = /[\u0000-\u001f\u007f]/;

const headerName = /^[!-9;-~]+$/; // RFC 5322 ftext: printable ASCII except colon
// A blob *name* inside ATTACHMENT_CONTAINER: no scheme, no host, no "..", so a message can never
// make us fetch an arbitrary URL (SSRF) or leave the container.
const blobName = /^(?!.*(?:^|\/)\.\.?(?:\/|$))[A-Za-z0-9_][A-Za-z0-9._\-/]{0,1023}$/;

export function checkBlobName(field: string, name: string): string {
  if (!blobName.test(name) || name.includes("//")) {
    throw new MessageError("MESSAGE_INVALID_BLOB_NAME", `${field} must be a blob name in the attachments container (letters, digits, . _ - /), not a URL or path: ${JSON.stringify(name.slice(0, 100))}`, field);
  }
  return name;
}

// The base64 alphabet (RFC 4648 section 4, not base64url) as a lookup table by char code.
const base64Alphabet = new Uint8Array(128);
for (const char of "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") base64Alphabet[char.charCodeAt(0)] = 1;

/**
 * The number of bytes base64 text decodes to, or undefined when it is not padded base64. Line
 * breaks and other ASCII whitespace may appear anywhere (MIME wraps at 76). One pass over the
 * characters with no regular expression: the former regex recursed once per 4-character group and
 * overflowed the stack from about 4 MB, and this also avoids a whitespace-free copy of the text.
 */
export function base64DecodedLength(text: string): number | undefined {
  let data = 0;
  let padding = 0;
  for (let index = 0; index < text.length; index++) {
    const code = text.charCodeAt(index);
    if (code === 0x20 || (code >= 0x09 && code <= 0x0d)) continue;
    if (code === 0x3d) {
      padding += 1;
      continue;
    }
    if (padding > 0 || code >= 128 || base64Alphabet[code] === 0) return undefined;
    data += 1;
  }
  const partial = data % 4; // 0: complete groups; 2 or 3: a last group that needs == or =
  if (partial === 1 || padding !== (partial === 0 ? 0 : 4 - partial)) return undefined;
  return Math.floor(data / 4) * 3 + (partial === 0 ? 0 : partial - 1);
}

function describe(value: unknown): string {
  return Array.isArray(value) ? "an array" : value === null ? "null" : `a ${typeof value}`;
}

function checkHeaderText(field: string, value: string, allowTab = false): void {
  if ((allowTab ? controlCharacters : controlCharactersWithTab).test(value)) {
    throw new MessageError("MESSAGE_HEADER_INJECTION", `${field} contains a control character (CR, LF, NUL or similar); header fields must be one line`, field);
  }
}

function requireString(object: Record<string, unknown>, key: string, field = key): string | undefined {
  const value = object[key];
  if (value === undefined) return undefined;
  if (typeof value !== "string") throw new MessageError("MESSAGE_INVALID_TYPE", `${field} must be a string, got ${describe(value)}`, field);
  return value;
}

/**
 * One address as written ("Name, Inc." <a@b.c> or a@b.c) → the mailbox that will be sent. Only
 * strings that are exactly one mailbox are accepted (see address.ts); nodemailer is handed the
 * parsed result, never the string, so it has nothing left to repair or reinterpret.
 */
function checkAddress(field: string, value: string): Mailbox {
  checkHeaderText(field, value);
  const parsed = parseMailbox(value);
  if (!parsed.ok) {
    throw new MessageError("MESSAGE_INVALID_ADDRESS", `${field} is not one valid address (${parsed.reason}): ${JSON.stringify(value.slice(0, 200))}`, field);
  }
  return parsed.mailbox;
}

function addressList(object: Record<string, unknown>, field: string): Mailbox[] {
  const value = object[field];
  if (value === undefined) return [];
  if (typeof value === "string") return [checkAddress(field, value)];
  if (!Array.isArray(value) || value.length === 0) {
    throw new MessageError("MESSAGE_INVALID_TYPE", `${field} must be an address string or a non-empty array of them, got ${describe(value)}`, field);
  }
  return value.map((item, index) => {
    if (typeof item !== "string") throw new MessageError("MESSAGE_INVALID_TYPE", `${field}[${index}] must be a string, got ${describe(item)}`, `${field}[${index}]`);
    return checkAddress(`${field}[${index}]`, item);
  });
}

const timestamp = new RegExp(TIMESTAMP_PATTERN);
const templateName = new RegExp(TEMPLATE_NAME_PATTERN);

/** An ISO 8601 moment with an offset; a local time without one would mean different moments on different hosts. */
function optionalDate(object: Record<string, unknown>, field: string): Date | undefined {
  const value = requireString(object, field);
  if (value === undefined) return undefined;
  const parsed = timestamp.test(value) ? Date.parse(value) : Number.NaN;
  if (!Number.isFinite(parsed)) {
    throw new MessageError("MESSAGE_INVALID_DATE", `${field} must be an ISO 8601 date and time with an offset, e.g. 2030-01-31T09:00:00Z, got ${JSON.stringify(value.slice(0, 64))}`, field);
  }
  return new Date(parsed);
}

/** `template` and `data` of a message that names a template (see templates.ts), checked before any store is asked. */
export function templateFields(input: Record<string, unknown>): { name: string; data: Record<string, unknown> } | undefined {
  const name = requireString(input, "template");
  if (name === undefined) {
    if (input["data"] !== undefined) throw new MessageError("MESSAGE_INVALID_TEMPLATE", "data is given without template", "data");
    return undefined;
  }
  if (!templateName.test(name)) {
    throw new MessageError("MESSAGE_INVALID_TEMPLATE", `template must be a name of letters, digits, - and _ (at most 128), got ${JSON.stringify(name.slice(0, 64))}`, "template");
  }
  for (const field of ["subject", "text", "html"]) {
    if (input[field] !== undefined) throw new MessageError("MESSAGE_INVALID_TEMPLATE", `a message with a template gets ${field} from the template; leave ${field} out`, field);
  }
  const data = input["data"] ?? {};
  if (typeof data !== "object" || data === null || Array.isArray(data)) throw new MessageError("MESSAGE_INVALID_TYPE", `data must be an object, got ${describe(data)}`, "data");
  return { name, data: data as Record<string, unknown> };
}

/** Parse and validate queue text. `defaults` supplies From and the id when the message has none. */
export function parseMessage(text: string, defaults: { from: string; id: string }): EmailMessage {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new MessageError("MESSAGE_NOT_JSON", `message is not valid JSON: ${(error as Error).message}`);
  }
  return validateMessage(json, defaults);
}

export function validateMessage(json: unknown, defaults: { from: string; id: string }): EmailMessage {
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new MessageError("MESSAGE_NOT_OBJECT", `message must be a JSON object, got ${describe(json)}`);
  }
  const input = json as Record<string, unknown>;
  for (const key of Object.keys(input)) {
    if (!knownFields.has(key)) throw new MessageError("MESSAGE_UNKNOWN_FIELD", `unknown field ${JSON.stringify(key.slice(0, 64))}; allowed: ${[...knownFields].join(", ")}`, key);
  }
  if (input["to"] === undefined) throw new MessageError("MESSAGE_MISSING_FIELD", "to is required", "to");
  // A producer's message may still name a template (enqueueEmail validates it before it is
  // rendered); what is sent has always been rendered first (resolveMessage.ts).
  const template = templateFields(input);
  if (template === undefined && input["subject"] === undefined) throw new MessageError("MESSAGE_MISSING_FIELD", "subject is required", "subject");

  const id = requireString(input, "id") ?? defaults.id;
  if (id.length === 0 || id.length > MAX_ID_LENGTH) throw new MessageError("MESSAGE_FIELD_TOO_LONG", `id must be 1 to ${MAX_ID_LENGTH} characters, got ${id.length}`, "id");
  checkHeaderText("id", id);

  const subject = requireString(input, "subject") ?? "";
  checkHeaderText("subject", subject, true);
  if (subject.length > 998) throw new MessageError("MESSAGE_FIELD_TOO_LONG", `subject must be at most 998 characters, got ${subject.length}`, "subject");

  const text = requireString(input, "text");
  const html = requireString(input, "html");
  if (template === undefined && text === undefined && html === undefined) throw new MessageError("MESSAGE_NO_BODY", "message needs text or html (or both)");

  const from = checkAddress("from", requireString(input, "from") ?? defaults.from);
  const to = addressList(input, "to");
  const cc = addressList(input, "cc");
  const bcc = addressList(input, "bcc");
  const replyTo = addressList(input, "replyTo");
  const recipients = to.length + cc.length + bcc.length;
  if (recipients > MAX_RECIPIENTS) {
    throw new MessageError("MESSAGE_TOO_MANY_RECIPIENTS", `message has ${recipients} recipients; Exchange accepts at most ${MAX_RECIPIENTS} per message`, "to");
  }
  const sendAt = optionalDate(input, "sendAt");
  const expiresAt = optionalDate(input, "expiresAt");
  if (sendAt !== undefined && expiresAt !== undefined && expiresAt.getTime() <= sendAt.getTime()) {
    throw new MessageError("MESSAGE_INVALID_DATE", `expiresAt (${expiresAt.toISOString()}) is not after sendAt (${sendAt.toISOString()}): the message could never be sent`, "expiresAt");
  }

  const headers: Record<string, string> = {};
  if (input["headers"] !== undefined) {
    const raw = input["headers"];
    if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw new MessageError("MESSAGE_INVALID_TYPE", `headers must be an object of strings, got ${describe(raw)}`, "headers");
    for (const [name, value] of Object.entries(raw)) {
      const field = `headers[${JSON.stringify(name.slice(0, 64))}]`;
      if (!headerName.test(name) || name === "__proto__") throw new MessageError("MESSAGE_INVALID_HEADER", `${field}: a header name is printable ASCII without spaces or colons`, field);
      if (structuralHeaders.has(name.toLowerCase())) throw new MessageError("MESSAGE_FORBIDDEN_HEADER", `${field}: ${name} is set from the message fields, not from headers`, field);
      if (typeof value !== "string") throw new MessageError("MESSAGE_INVALID_TYPE", `${field} must be a string, got ${describe(value)}`, field);
      checkHeaderText(field, value, true);
      headers[name] = value;
    }
  }

  const attachments: EmailMessage["attachments"] = [];
  if (input["attachments"] !== undefined) {
    const raw = input["attachments"];
    if (!Array.isArray(raw)) throw new MessageError("MESSAGE_INVALID_TYPE", `attachments must be an array, got ${describe(raw)}`, "attachments");
    raw.forEach((item: unknown, index) => {
      const field = `attachments[${index}]`;
      if (typeof item !== "object" || item === null || Array.isArray(item)) throw new MessageError("MESSAGE_INVALID_TYPE", `${field} must be an object, got ${describe(item)}`, field);
      const attachment = item as Record<string, unknown>;
      for (const key of Object.keys(attachment)) {
        if (!attachmentFields.has(key)) throw new MessageError("MESSAGE_UNKNOWN_FIELD", `${field}: unknown field ${JSON.stringify(key.slice(0, 64))}`, `${field}.${key}`);
      }
      const filename = requireString(attachment, "filename", `${field}.filename`);
      // A claim check's large content arrives still in the blob's bytes (see claimCheckJson.ts).
      const large = attachment["content"] instanceof LargeJsonString ? attachment["content"] : undefined;
      const content = large === undefined ? requireString(attachment, "content", `${field}.content`) : "";
      const blob = requireString(attachment, "blob", `${field}.blob`);
      const contentType = requireString(attachment, "contentType", `${field}.contentType`);
      if (filename === undefined || filename.length === 0) throw new MessageError("MESSAGE_MISSING_FIELD", `${field}.filename is required`, `${field}.filename`);
      if (content === undefined && blob === undefined) throw new MessageError("MESSAGE_MISSING_FIELD", `${field}.content (base64) or ${field}.blob is required`, `${field}.content`);
      if (content !== undefined && blob !== undefined) throw new MessageError("MESSAGE_INVALID_TYPE", `${field} has both content and blob; give one`, `${field}.blob`);
      if (filename.length > 255) throw new MessageError("MESSAGE_FIELD_TOO_LONG", `${field}.filename must be at most 255 characters, got ${filename.length}`, `${field}.filename`);
      if (contentType !== undefined && contentType.length < 3) throw new MessageError("MESSAGE_FIELD_TOO_LONG", `${field}.contentType must be at least 3 characters (e.g. text/plain)`, `${field}.contentType`);
      checkHeaderText(`${field}.filename`, filename);
      if (contentType !== undefined) checkHeaderText(`${field}.contentType`, contentType);
      const type = contentType === undefined ? {} : { contentType };
      if (blob !== undefined) {
        attachments.push({ filename, blob: checkBlobName(`${field}.blob`, blob), ...type });
        return;
      }
      const invalid = () => new MessageError("MESSAGE_INVALID_BASE64", `${field}.content is not valid base64 (RFC 4648 alphabet A-Z a-z 0-9 + /, padded with =; line breaks allowed)`, `${field}.content`);
      if (large !== undefined) {
        const decoded = large.decodeBase64();
        if (decoded === undefined) throw invalid();
        attachments.push({ filename, content: decoded, ...type });
        return;
      }
      const encoded = content ?? "";
      const length = base64DecodedLength(encoded);
      if (length === undefined) throw invalid();
      // Node's decoder skips the whitespace itself: no whitespace-free copy of the text is made.
      const decoded = Buffer.from(encoded, "base64");
      if (decoded.length !== length) throw new MessageError("MESSAGE_INVALID_BASE64", `${field}.content decoded to ${decoded.length} bytes, expected ${length}`, `${field}.content`);
      attachments.push({ filename, content: decoded, ...type });
    });
  }

  return {
    id,
    from,
    to,
    cc,
    bcc,
    replyTo,
    subject,
    headers,
    attachments,
    ...(text === undefined ? {} : { text }),
    ...(html === undefined ? {} : { html }),
    ...(sendAt === undefined ? {} : { sendAt }),
    ...(expiresAt === undefined ? {} : { expiresAt }),
    ...(template === undefined ? {} : { template }),
  };
}
