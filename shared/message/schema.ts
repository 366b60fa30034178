// Schema v1 of a queue message. Producers can validate against the published copy in
// schema/email-message.v1.json (kept equal to this object by a test); validateMessage adds the
// checks JSON Schema cannot express (addresses, header injection, base64, recipient count).
import type { Mailbox } from "./address.js";

export const MAX_RECIPIENTS = 500;
export const MAX_ID_LENGTH = 256;
/** A template name: one folder (TEMPLATE_DIR) or blob prefix (TEMPLATE_CONTAINER), never a path. */
export const TEMPLATE_NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$";
/** ISO 8601 date and time with a UTC offset (RFC 3339). */
export const TIMESTAMP_PATTERN = "^\\d{4}-\\d{2}-\\d{2}T\\d{2}:\\d{2}(:\\d{2}(\\.\\d{1,9})?)?(Z|[+-]\\d{2}:\\d{2})$";

// JSON Schema cannot express the address grammar; validateMessage enforces it (shared/message/address.ts).
const mailboxDescription =
  "Exactly one mailbox: a@example.com or Display Name <a@example.com> (quote a name holding . , : ; @ or parentheses). Refused: several addresses, groups, comments, quoted local parts, IP literals. See README, 'The message'.";

const addressList = {
  oneOf: [
    { type: "string", minLength: 1, description: mailboxDescription },
    { type: "array", minItems: 1, items: { type: "string", minLength: 1, description: mailboxDescription } },
  ],
} as const;

export const emailMessageSchema = {
  $schema: "https://json-schema.org/draft/2020-12/schema",
  $id: "https://github.com/queue-mailer/queue-mailer/schema/email-message.v1.json",
  title: "queue-mailer email message (v1)",
  type: "object",
  additionalProperties: false,
  required: ["to"],
  // Either a subject with text and/or html (v1), or a template with its data (rendered at send time).
  oneOf: [
    { required: ["subject"], anyOf: [{ required: ["text"] }, { required: ["html"] }], not: { required: ["template"] } },
    { required: ["template"], not: { anyOf: [{ required: ["subject"] }, { required: ["text"] }, { required: ["html"] }] } },
  ],
  properties: {
    id: { type: "string", minLength: 1, maxLength: MAX_ID_LENGTH, description: "Idempotency key; defaults to the queue message id." },
    from: { type: "string", minLength: 1, description: `Defaults to MAIL_FROM. ${mailboxDescription}` },
    to: addressList,
    cc: addressList,
    bcc: addressList,
    replyTo: addressList,
    subject: { type: "string", maxLength: 998 },
    text: { type: "string" },
    html: { type: "string" },
    template: { type: "string", pattern: TEMPLATE_NAME_PATTERN, description: "Instead of subject/text/html: a template in TEMPLATE_DIR or TEMPLATE_CONTAINER (<name>/subject.*, <name>/html.*, optional <name>/text.*)." },
    data: { type: "object", description: "The template's variables. Values are HTML-escaped in html and made one line in the subject." },
    sendAt: { type: "string", format: "date-time", pattern: TIMESTAMP_PATTERN, description: "Not sent before this moment (ISO 8601 with offset)." },
    expiresAt: { type: "string", format: "date-time", pattern: TIMESTAMP_PATTERN, description: "Not sent after this moment: poisoned with MESSAGE_EXPIRED instead." },
    headers: {
      type: "object",
      description: "Custom headers (X-…); structural headers come from the fields above.",
      additionalProperties: { type: "string" },
    },
    attachments: {
      type: "array",
      items: {
        type: "object",
        additionalProperties: false,
        required: ["filename"],
        oneOf: [{ required: ["content"] }, { required: ["blob"] }],
        properties: {
          filename: { type: "string", minLength: 1, maxLength: 255 },
          contentType: { type: "string", minLength: 3 },
          content: { type: "string", description: "Base64." },
          blob: { type: "string", minLength: 1, maxLength: 1024, description: "Instead of content: the name of a blob in ATTACHMENT_CONTAINER (never a URL)." },
        },
      },
    },
  },
} as const;

/** A message as producers write it. */
export interface EmailMessageInput {
  id?: string;
  from?: string;
  to: string | string[];
  cc?: string | string[];
  bcc?: string | string[];
  replyTo?: string | string[];
  subject: string;
  text?: string;
  html?: string;
  /** ISO 8601 with offset. */
  sendAt?: string;
  /** ISO 8601 with offset. */
  expiresAt?: string;
  headers?: Record<string, string>;
  attachments?: Array<{ filename: string; contentType?: string; content?: string; blob?: string }>;
}

/** A message that names a template: subject and bodies come from the template at send time. */
export type TemplateMessageInput = Omit<EmailMessageInput, "subject" | "text" | "html"> & {
  template: string;
  data?: Record<string, unknown>;
};

/** Anything a producer may enqueue. */
export type ProducerMessageInput = EmailMessageInput | TemplateMessageInput;

/**
 * A queue message too large for a queue (64 KiB) travels as a claim check: the message JSON is a
 * blob in ATTACHMENT_CONTAINER and the queue holds only `{ "claimCheck": "<blob name>" }`.
 */
export interface ClaimCheck {
  claimCheck: string;
}

export interface EmailAttachment {
  filename: string;
  contentType?: string;
  /** Present once loaded (inline base64, or read from the blob). */
  content?: Buffer;
  /** Blob name in ATTACHMENT_CONTAINER, until loaded. */
  blob?: string;
}

/** A validated message, normalised for sending. Addresses are parsed mailboxes, sent as they are. */
export interface EmailMessage {
  id: string;
  from: Mailbox;
  to: Mailbox[];
  cc: Mailbox[];
  bcc: Mailbox[];
  replyTo: Mailbox[];
  subject: string;
  text?: string;
  html?: string;
  headers: Record<string, string>;
  attachments: EmailAttachment[];
  /** Not sent before. */
  sendAt?: Date;
  /** Not sent after: poisoned with MESSAGE_EXPIRED. */
  expiresAt?: Date;
  /** Set only on a message validated before rendering (by a producer): subject and bodies are empty. */
  template?: { name: string; data: Record<string, unknown> };
}
