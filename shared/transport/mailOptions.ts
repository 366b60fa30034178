// The one mapping from a validated message to what nodemailer composes, shared by every transport
// so that SMTP and Graph send the same MIME: parsed mailboxes (never the producer's strings, so
// nothing is re-parsed), our derived Message-ID, the custom headers, both alternatives.
import { createHash } from "node:crypto";
import type { Readable } from "node:stream";
import type Mail from "nodemailer/lib/mailer";
import type { Mailbox } from "../message/address.js";
import type { EmailMessage } from "../message/schema.js";

export type MailOptions = Mail.Options;

/**
 * Message-ID from the message's idempotency key, so a duplicate that slips through carries the same
 * Message-ID and mail servers and clients can recognise it.
 */
export function messageIdFor(id: string, mailbox: string): string {
  const domain = mailbox.split("@")[1] ?? "queue-mailer.invalid";
  return `<qm.${createHash("sha256").update(id).digest("base64url").slice(0, 32)}@${domain}>`;
}

const mailboxOf = ({ name, address }: Mailbox) => ({ name, address });

/** `content` lets a transport stream attachments instead of handing over the buffer. */
export function mailOptionsFor(message: EmailMessage, mailbox: string, content: (bytes: Buffer) => Buffer | Readable = (bytes) => bytes): MailOptions {
  return {
    messageId: messageIdFor(message.id, mailbox),
    from: mailboxOf(message.from),
    to: message.to.map(mailboxOf),
    cc: message.cc.map(mailboxOf),
    bcc: message.bcc.map(mailboxOf),
    replyTo: message.replyTo.map(mailboxOf),
    subject: message.subject,
    headers: message.headers,
    attachments: message.attachments.map((a) => ({ filename: a.filename, content: content(a.content ?? Buffer.alloc(0)), ...(a.contentType === undefined ? {} : { contentType: a.contentType }) })),
    ...(message.text === undefined ? {} : { text: message.text }),
    ...(message.html === undefined ? {} : { html: message.html }),
  };
}
