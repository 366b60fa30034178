// Is this message a delivery status notification, and if so: which of our messages bounced, for
// whom, and how badly. Reads RFC 3464 reports (`multipart/report; report-type=delivery-status` with a
// `message/delivery-status` part) from any MTA, Exchange Online's NDRs and Gmail's (both RFC 3464
// underneath, with their own text and headers), and as a last resort the `X-Failed-Recipients`
// header of MTAs that send plain-text bounces (Exim).
//
// mailparser does the MIME work (boundaries, transfer encodings, charsets, nesting); with
// `keepDeliveryStatus` it hands over the delivery-status part as an attachment instead of folding it
// into the text. The inside of that part is groups of header-style fields separated by blank lines
// (RFC 3464 2.1: the per-message fields, then one group per recipient), which no library exposes as
// groups: `fieldGroups` below reads them (unfolding continuation lines, names case-insensitive).
//
// Pure: no storage, no network. Matching the original Message-ID to our send is the caller's (see
// findSentByMessageId in shared/send/sendLedger.ts).
import { simpleParser, type Attachment, type ParsedMail } from "mailparser";
import { MailerError } from "../errors.js";

export type BounceAction = "failed" | "delayed";
/** hard: 5.x.x, the address does not work; soft: 4.x.x or a delay, it may work later. */
export type BounceKind = "hard" | "soft";
export type BounceFormat = "exchange" | "gmail" | "rfc3464" | "x-failed-recipients";

export interface BouncedRecipient {
  /**
   * The address we sent to, lower-cased: the report's Original-Recipient when it gives one (the
   * address as we wrote it in RCPT TO, before forwarding or alias expansion), else Final-Recipient.
   * This is what the sender's suppression check compares with a message's recipients.
   */
  address: string;
  /** Final-Recipient, lower-cased: where delivery finally failed. */
  finalRecipient: string;
  action: BounceAction;
  /** Enhanced status code (RFC 3463), e.g. "5.1.1". */
  status: string;
  kind: BounceKind;
  /** Diagnostic-Code without its type ("smtp;"), e.g. "550 5.1.1 User unknown". */
  diagnostic?: string;
  remoteMta?: string;
}

export interface BounceReport {
  format: BounceFormat;
  /**
   * Message-ID of the message that bounced, with angle brackets (as our Message-ID header has it),
   * or undefined when the report does not say.
   */
  originalMessageId: string | undefined;
  /** Where originalMessageId was found; the attached original is the most trustworthy. */
  originalMessageIdFrom: "attached-message" | "attached-headers" | "x-original-message-id" | "in-reply-to" | "references" | undefined;
  /** The failed and delayed recipients (a report's "delivered" or "relayed" ones are left out). */
  recipients: BouncedRecipient[];
  /** The report's Date header; else the `receivedAt` option; else now. */
  reportedAt: Date;
  /** The report's own Message-ID (for logs). */
  reportMessageId: string | undefined;
  reportingMta: string | undefined;
  subject: string | undefined;
}

export type BounceParse = { bounce: true; report: BounceReport } | { bounce: false; reason: string };

export const BOUNCE_MALFORMED = "BOUNCE_MALFORMED";

const DSN_TYPES = new Set(["message/delivery-status", "message/global-delivery-status"]);
const ORIGINAL_MESSAGE_TYPES = new Set(["message/rfc822", "message/global"]);
const ORIGINAL_HEADER_TYPES = new Set(["text/rfc822-headers", "message/global-headers"]);
const ACTIONS = new Set(["failed", "delayed", "delivered", "relayed", "expanded"]);
/** RFC 3463: class.subject.detail; the class must be 2, 4 or 5. */
const STATUS = /(?:^|[\s;-])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])/;

/**
 * Reads one raw message (as fetched over IMAP). Resolves `{ bounce: false, reason }` for anything
 * that is not a delivery status notification (ordinary mail, auto-replies, read receipts, delivery
 * confirmations) and rejects with a MailerError `BOUNCE_MALFORMED` for a report that says it is one
 * but cannot be read (no recipients, no status): leave such a message where it is and log it.
 */
export async function parseBounce(raw: Buffer | string, options: { receivedAt?: Date } = {}): Promise<BounceParse> {
  const mail = await simpleParser(raw, { keepDeliveryStatus: true, skipHtmlToText: true, skipTextToHtml: true, skipTextLinks: true, skipImageLinks: true });
  const contentType = headerObject(mail, "content-type");
  const reportType = contentType?.value === "multipart/report" ? contentType.params["report-type"]?.toLowerCase() : undefined;
  if (reportType !== undefined && reportType !== "delivery-status") {
    // disposition-notification (read receipts), feedback-report (abuse complaints), tlsrpt, …
    return { bounce: false, reason: `a multipart/report of type ${reportType}, not a delivery status notification` };
  }
  const dsnParts = mail.attachments.filter((a) => DSN_TYPES.has(a.contentType.toLowerCase()));
  const failedHeader = headerText(mail, "x-failed-recipients");
  const exchangeNdr = isExchangeNdr(mail);
  if (reportType === undefined && dsnParts.length === 0 && failedHeader === undefined && !exchangeNdr) {
    return { bounce: false, reason: "not a delivery status notification (no multipart/report, message/delivery-status part or X-Failed-Recipients header)" };
  }
  const what = describe(mail);

  let recipients: BouncedRecipient[];
  let perMessage = new Map<string, string>();
  if (dsnParts.length > 0) {
    const groups = dsnParts.flatMap((part) => fieldGroups(part.content.toString("utf8")));
    // The per-message group is the one without Final-Recipient (RFC 3464 puts it first and requires
    // Reporting-MTA in it); every other group describes one recipient.
    const recipientGroups = groups.filter((g) => g.has("final-recipient") || g.has("action") || g.has("status") || g.has("original-recipient"));
    perMessage = groups.find((g) => !recipientGroups.includes(g)) ?? new Map();
    if (recipientGroups.length === 0) throw malformed(`${what}: its delivery-status part names no recipient`);
    const all = recipientGroups.map((group, index) => recipientOf(group, index, what));
    recipients = all.filter((r): r is BouncedRecipient => r !== undefined);
    if (recipients.length === 0) {
      return { bounce: false, reason: "a delivery status notification without failed or delayed recipients (a delivery or relay confirmation)" };
    }
  } else if (failedHeader !== undefined) {
    recipients = fromFailedRecipientsHeader(failedHeader, mail.text ?? "", what);
  } else {
    throw malformed(`${what}: ${exchangeNdr ? "an Exchange non-delivery report" : "a multipart/report of type delivery-status"} without a message/delivery-status part`);
  }

  const original = await originalMessageIdOf(mail, perMessage);
  const reportingMta = fieldValue(perMessage.get("reporting-mta"));
  const date = mail.date !== undefined && !Number.isNaN(mail.date.getTime()) ? mail.date : undefined;
  return {
    bounce: true,
    report: {
      format: formatOf(mail, exchangeNdr, reportingMta, dsnParts.length > 0),
      originalMessageId: original?.messageId,
      originalMessageIdFrom: original?.from,
      recipients,
      reportedAt: date ?? options.receivedAt ?? new Date(),
      reportMessageId: mail.messageId,
      reportingMta,
      subject: mail.subject,
    },
  };
}

function malformed(message: string): MailerError {
  return new MailerError(BOUNCE_MALFORMED, message, {
    kind: "permanent",
    hint: "The message looks like a bounce but cannot be read as one; it is left in the bounce folder. Look at it by hand and suppress the address with `queue-mailer suppression add` if needed.",
  });
}

/** For error messages: which report this is. */
function describe(mail: ParsedMail): string {
  const from = mail.from?.value[0]?.address;
  return `report ${mail.messageId ?? "(no Message-ID)"}${from ? ` from ${from}` : ""}${mail.subject ? ` "${mail.subject.slice(0, 100)}"` : ""}`;
}

function recipientOf(group: Map<string, string>, index: number, what: string): BouncedRecipient | undefined {
  const where = `${what}, recipient ${index + 1}`;
  const action = group.get("action")?.toLowerCase().split(/[\s(]/)[0] ?? "";
  if (!ACTIONS.has(action)) throw malformed(`${where}: Action ${JSON.stringify(group.get("action") ?? "")} is not one of failed, delayed, delivered, relayed, expanded`);
  if (action !== "failed" && action !== "delayed") return undefined;
  const final = addressOf(group.get("final-recipient"));
  if (final === undefined) throw malformed(`${where}: no usable Final-Recipient (${JSON.stringify(group.get("final-recipient") ?? "missing")})`);
  const original = addressOf(group.get("original-recipient"));
  const diagnostic = fieldValue(group.get("diagnostic-code"));
  // Status is required; a report that left it out may still carry the code in the diagnostic.
  const status = statusOf(group.get("status") ?? "") ?? statusOf(diagnostic ?? "");
  if (status === undefined) throw malformed(`${where}: Status ${JSON.stringify(group.get("status") ?? "missing")} is not an enhanced status code like 5.1.1`);
  if (status.startsWith("2.")) throw malformed(`${where}: Action ${action} with the success status ${status}`);
  const remoteMta = fieldValue(group.get("remote-mta"));
  return {
    address: original ?? final,
    finalRecipient: final,
    action,
    status,
    // A delay is never final, whatever its code; a failure is as permanent as its class says.
    kind: action === "failed" && status.startsWith("5.") ? "hard" : "soft",
    ...(diagnostic === undefined ? {} : { diagnostic: diagnostic.slice(0, 1000) }),
    ...(remoteMta === undefined ? {} : { remoteMta }),
  };
}

/**
 * Plain-text bounces (Exim and others) list the failed addresses in X-Failed-Recipients and send it
 * only for permanent failures; the status comes from the text when it has one.
 */
function fromFailedRecipientsHeader(header: string, text: string, what: string): BouncedRecipient[] {
  const addresses = header.split(",").map((a) => addressOf(a)).filter((a): a is string => a !== undefined);
  if (addresses.length === 0) throw malformed(`${what}: X-Failed-Recipients names no address (${JSON.stringify(header)})`);
  const status = statusOf(text) ?? "5.0.0";
  const diagnostic = /^\s*((?:[45]\d\d[ -]).*)$/m.exec(text)?.[1]?.trim();
  return addresses.map((address) => ({
    address,
    finalRecipient: address,
    action: "failed",
    status,
    kind: status.startsWith("4.") ? "soft" : "hard",
    ...(diagnostic === undefined ? {} : { diagnostic: diagnostic.slice(0, 1000) }),
  }));
}

/** `rfc822; <User@Example.com>` → `user@example.com`; undefined when there is no address in it. */
function addressOf(field: string | undefined): string | undefined {
  if (field === undefined) return undefined;
  const value = (field.includes(";") ? field.slice(field.indexOf(";") + 1) : field).trim().replace(/^<(.*)>$/, "$1").trim();
  return /^[^\s@<>]+@[^\s@<>]+$/.test(value) ? value.toLowerCase() : undefined;
}

/** The value after `type;` (Diagnostic-Code, Remote-MTA, Reporting-MTA). */
function fieldValue(field: string | undefined): string | undefined {
  if (field === undefined) return undefined;
  const value = (/^[\w-]+\s*;/.test(field) ? field.slice(field.indexOf(";") + 1) : field).trim();
  return value === "" ? undefined : value;
}

function statusOf(text: string): string | undefined {
  const match = STATUS.exec(text);
  return match ? `${match[1]}.${Number(match[2])}.${Number(match[3])}` : undefined;
}

/**
 * RFC 3464's body: groups of `Name: value` fields separated by blank lines. Continuation lines (that
 * start with white space) are unfolded; names are lower-cased; the first of a repeated field counts.
 */
export function fieldGroups(text: string): Array<Map<string, string>> {
  const groups: Array<Map<string, string>> = [];
  let current = new Map<string, string>();
  let last: string | undefined;
  for (const line of text.split(/\r?\n/)) {
    if (line.trim() === "") {
      if (current.size > 0) groups.push(current);
      current = new Map();
      last = undefined;
    } else if (/^[ \t]/.test(line)) {
      if (last !== undefined) current.set(last, `${current.get(last) ?? ""} ${line.trim()}`.trim());
    } else {
      const match = /^([!-9;-~]+)[ \t]*:(.*)$/.exec(line);
      const name = match?.[1]?.toLowerCase();
      if (name === undefined || current.has(name)) {
        last = undefined;
        continue;
      }
      current.set(name, (match?.[2] ?? "").trim());
      last = name;
    }
  }
  if (current.size > 0) groups.push(current);
  return groups;
}

/**
 * The bounced message's Message-ID: from the attached original (whole message, then headers only),
 * Gmail's X-Original-Message-ID, then the report's In-Reply-To and References (Exchange sets both
 * to the original's).
 */
async function originalMessageIdOf(mail: ParsedMail, perMessage: Map<string, string>): Promise<{ messageId: string; from: NonNullable<BounceReport["originalMessageIdFrom"]> } | undefined> {
  for (const [types, from] of [[ORIGINAL_MESSAGE_TYPES, "attached-message"], [ORIGINAL_HEADER_TYPES, "attached-headers"]] as const) {
    for (const part of mail.attachments.filter((a: Attachment) => types.has(a.contentType.toLowerCase()))) {
      const messageId = await messageIdOfHeaderBlock(part.content);
      if (messageId !== undefined) return { messageId, from };
    }
  }
  const xOriginal = messageIdToken(perMessage.get("x-original-message-id"));
  if (xOriginal !== undefined) return { messageId: xOriginal, from: "x-original-message-id" };
  const inReplyTo = messageIdToken(headerText(mail, "in-reply-to"));
  if (inReplyTo !== undefined) return { messageId: inReplyTo, from: "in-reply-to" };
  // mailparser gives References as a list when it holds several ids; the original is the last.
  const referencesHeader = mail.headers.get("references");
  const references = (Array.isArray(referencesHeader) ? referencesHeader.join(" ") : typeof referencesHeader === "string" ? referencesHeader : "").match(/<[^<>\s]+>/g);
  const last = references?.[references.length - 1];
  return last === undefined ? undefined : { messageId: last, from: "references" };
}

/** The Message-ID in a message or header block, read by mailparser from the headers alone. */
async function messageIdOfHeaderBlock(content: Buffer): Promise<string | undefined> {
  const text = content.toString("utf8");
  const end = text.search(/\r?\n\r?\n/);
  const headers = await simpleParser(`${end < 0 ? text : text.slice(0, end)}\r\n\r\n`, { skipHtmlToText: true, skipTextToHtml: true });
  return messageIdToken(headers.messageId);
}

/** The first `<…>` in a header value, or a bare id wrapped in brackets. */
function messageIdToken(value: string | undefined): string | undefined {
  if (value === undefined) return undefined;
  const bracketed = /<[^<>\s]+>/.exec(value)?.[0];
  if (bracketed !== undefined) return bracketed;
  const bare = value.trim();
  return /^[^\s<>]+@[^\s<>]+$/.test(bare) ? `<${bare}>` : undefined;
}

function isExchangeNdr(mail: ParsedMail): boolean {
  if (mail.headers.has("x-ms-exchange-message-is-ndr")) return true;
  // Older Exchange servers: the NDR's text, with Exchange's own headers (not a forwarded copy).
  const fromExchange = [...mail.headers.keys()].some((k) => k.startsWith("x-ms-exchange-"));
  return fromExchange && /^Undeliverable:/i.test(mail.subject ?? "") && /Delivery has failed to these recipients or groups/i.test(mail.text ?? "");
}

function formatOf(mail: ParsedMail, exchangeNdr: boolean, reportingMta: string | undefined, hasDsn: boolean): BounceFormat {
  const from = mail.from?.value[0]?.address?.toLowerCase() ?? "";
  if (/^mailer-daemon@(?:googlemail|google)\.com$/.test(from) || /(?:^|\.)googlemail\.com$/i.test(reportingMta ?? "")) return "gmail";
  if (exchangeNdr || /\.(?:outlook|exchangelabs)\.com$/i.test(reportingMta ?? "")) return "exchange";
  return hasDsn ? "rfc3464" : "x-failed-recipients";
}

function headerObject(mail: ParsedMail, name: string): { value: string; params: Record<string, string> } | undefined {
  const value = mail.headers.get(name) as { value?: unknown; params?: Record<string, string> } | undefined;
  return typeof value?.value === "string" ? { value: value.value.toLowerCase(), params: value.params ?? {} } : undefined;
}

/** A header as text (the first, if repeated), or undefined when absent. */
function headerText(mail: ParsedMail, name: string): string | undefined {
  const value = mail.headers.get(name);
  if (value === undefined) return undefined;
  const first = Array.isArray(value) ? value[0] : value;
  return typeof first === "string" ? first : typeof first === "object" && first !== null && "text" in first ? String((first as { text: unknown }).text) : String(first);
}
