// A local stand-in for Microsoft Graph's mail endpoints (graph.microsoft.com + the Outlook upload
// URLs), for the tests and `npm run local` with TRANSPORT=graph. It reproduces what a sender must cope
// with, from Microsoft Learn ("user: sendMail", "Send Outlook messages in MIME format", "attachment:
// createUploadSession", "Attach large files to Outlook messages", "Microsoft Graph throttling limits",
// "Microsoft Graph error responses") and from errors reported against the real service. It is not a
// mail server: nothing is delivered, each sent message is recorded.
//
// Endpoints (v1.0; ids in paths may be URL-encoded; a mailbox is named by UPN or object id):
// - POST /v1.0/users/{id}/sendMail → 202, empty body. `Content-Type: text/plain`: the body is the
//   base64 of the whole MIME message (not base64 → 400 ErrorMimeContentInvalidBase64String "Invalid
//   base64 string for MIME content."); `application/json`: `{ message, saveToSentItems }` with subject,
//   body, from, toRecipients/ccRecipients/bccRecipients, internetMessageHeaders (names must start with
//   x- or X-, else 400 InvalidInternetMessageHeader), attachments (#microsoft.graph.fileAttachment with
//   contentBytes). A JSON message is rendered to MIME with nodemailer so both forms are recorded alike.
// - POST /v1.0/users/{id}/messages (MIME or JSON) → 201 draft `{ id, ... }`;
//   POST .../messages/{mid}/attachments (fileAttachment, contentBytes) → 201 attachment;
//   POST .../messages/{mid}/attachments/createUploadSession `{ AttachmentItem: { attachmentType: "file",
//   name, size, contentType? } }` → 201 `{ uploadUrl, expirationDateTime, nextExpectedRanges: ["0-"] }`;
//   POST .../messages/{mid}/send (Content-Length required, 411 otherwise) → 202: the draft is sent
//   (recorded with via "uploadSession") and removed. Drafts, attachments and upload sessions need the
//   application/delegated permission Mail.ReadWrite (Learn: user-post-messages, message-post-
//   attachments, attachment-createuploadsession); sendMail and send need Mail.Send.
// - PUT {uploadUrl}: the URL carries its own credential (`authtoken`); the Outlook host refuses an
//   Authorization header with 401 InvalidAudienceForResource (a Graph token's audience is not the
//   Outlook API; reported in msgraph-sdk-java#409). `Content-Range: bytes a-b/total` and a body of
//   b-a+1 bytes, in order from byte 0: a gap or overlap → 416 invalidRange; total ≠ the session's size
//   → 400. Intermediate chunk → 200 `{ ExpirationDateTime, nextExpectedRanges: ["<next>"] }` (the
//   capital E is Outlook's, as in Learn's example); the last one → 201, empty body, `Location` of the
//   attachment. DELETE {uploadUrl} cancels (204).
//
// Limits (Learn, "Outlook service limits": per app per mailbox):
// - Request bodies over 4 MB (4 * 1024 * 1024 bytes) → 413 (Learn documents the status for MIME over
//   4 MB; the body's code is not documented, RequestEntityTooLarge is what clients report).
// - More than 4 requests in flight for one mailbox → 429 ApplicationThrottled "Application is over its
//   MailboxConcurrency limit." with Retry-After; 10,000 requests per 10 minutes and 150 MB of request
//   bodies per 5 minutes ("IncomingBytes") → 429 likewise. `maxInFlight` records the most requests a
//   mailbox ever had in flight at once (the throttled one included), so a test sees an over-eager sender.
// - Upload chunks: at most 4 MB each (Learn: "up to 4 MB each time"), and, stricter than Outlook
//   documents, a multiple of 320 KiB except the last (OneDrive's rule, which Graph SDK upload tasks
//   follow; a sender that keeps it works with both). Upload sessions are for attachments of 3 MB
//   (3,000,000 bytes) to 150 MB: smaller → 400 ErrorAttachmentSizeShouldNotBeLessThanMinimumSize.
// - A message (draft + attachments) over `maxMessageBytes` (Exchange's default 35 MB) → 400
//   ErrorMessageSizeExceeded "The message exceeds the maximum supported size.".
//
// Errors: `{ "error": { "code", "message", "innerError": { "date", "request-id", "client-request-id" } } }`,
// with `request-id` and `client-request-id` response headers (the client's client-request-id is
// echoed). Order of checks: injected failNext answer; 413; 401 InvalidAuthenticationToken ("Access
// token is empty.", "Lifetime validation failed, the token is expired.", "Access token validation
// failure. Invalid audience.", "Access token validation failure."); 404 ErrorInvalidUser for a mailbox
// that is not registered; 403 ErrorAccessDenied "Access is denied. Check credentials and try again."
// (application access policy via restrictTo, missing permission, a delegated token for another user);
// 404 MailboxNotEnabledForRESTAPI; 429 (throttle(), concurrency, rates); then the operation's own
// checks: 400 ErrorInvalidRecipients (no recipients, or an address set with setInvalidRecipients),
// 403 ErrorSendAsDenied (From is not the mailbox and no grantSendAs), 404 ErrorItemNotFound.
//
// Not modelled: /me paths, $batch, GET of messages or attachments, Sent Items.
import { randomBytes, randomUUID, createHash } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createServer } from "node:https";
import type { AddressInfo, Socket } from "node:net";
import { simpleParser } from "mailparser";
import type { AddressObject, ParsedMail } from "mailparser";
import MailComposer from "nodemailer/lib/mail-composer";
import type Mail from "nodemailer/lib/mailer";
import { parseHeaders } from "./smtpSink.js";

/** Graph refuses request bodies over 4 MB. */
export const GRAPH_REQUEST_LIMIT_BYTES = 4 * 1024 * 1024;
/** Upload chunks (except the last) must be multiples of this (320 KiB). */
export const UPLOAD_CHUNK_MULTIPLE_BYTES = 320 * 1024;
/** Largest upload chunk Outlook takes ("up to 4 MB each time"). */
export const UPLOAD_CHUNK_MAX_BYTES = 4 * 1024 * 1024;
/** Smallest attachment an upload session is for (Learn: "between 3 MB and 150 MB"). */
export const UPLOAD_SESSION_MIN_BYTES = 3_000_000;
/** Largest attachment an upload session is for. */
export const UPLOAD_SESSION_MAX_BYTES = 150 * 1024 * 1024;

/** Which Graph permission an operation needs. */
export type GraphPermission = "Mail.Send" | "Mail.ReadWrite";

/** Why a token is refused: the first three answer 401, the last two 403 (see oauthServer's AccessTokenProblem). */
export type GraphTokenCheck = { ok: true } | { ok: false; reason: string; problem: "invalid" | "expired" | "audience" | "permission" | "user" };

export interface GraphLimits {
  /** Default 4. */
  concurrentRequestsPerMailbox: number;
  /** Default 10,000 per `requestWindowMs`. */
  requestsPerWindow: number;
  /** Default 10 minutes. */
  requestWindowMs: number;
  /** Default 150 MB (150 * 1024 * 1024) of request bodies per `uploadWindowMs`. */
  uploadBytesPerWindow: number;
  /** Default 5 minutes. */
  uploadWindowMs: number;
}

export interface GraphMailServerOptions {
  /** PEM for HTTPS (a certificate for 127.0.0.1 from the local CA). */
  tls: { key: string; cert: string };
  /**
   * Checks a bearer token for `mailbox` (the UPN) and the permission the operation needs; the
   * token value must never be logged or echoed.
   */
  verifyToken(token: string, mailbox: string, permission: GraphPermission): Promise<GraphTokenCheck>;
  /** Mailboxes (UPNs) that exist; any other user in a path is 404 ErrorInvalidUser. */
  mailboxes: string[];
  /** Default 127.0.0.1. */
  host?: string;
  /** Default 0 (any free port). */
  port?: number;
  limits?: Partial<GraphLimits>;
  /** Largest message (draft + attachments) accepted; default 35 MB (Exchange Online's default). */
  maxMessageBytes?: number;
  /** How long an upload URL stays valid; default 1 hour. */
  uploadSessionTtlMs?: number;
  /** Time each admitted request is held before it is answered (Graph takes its time); default 0. */
  latencyMs?: number;
}

/** A recorded attachment and where it came from. */
export interface GraphAttachment {
  filename: string | undefined;
  contentType: string;
  content: Buffer;
  /** "mime": inside the MIME; "json": in the JSON message; "attachment": POST .../attachments; "uploadSession": PUT chunks. */
  source: "mime" | "json" | "attachment" | "uploadSession";
}

export interface GraphMessage {
  /** The mailbox (UPN) it was sent as. */
  mailbox: string;
  /** The MIME as the sender gave it (a JSON message: as rendered here); a draft's attachments added later are in `attachments` only. */
  raw: Buffer;
  /** Lower-cased names, unfolded values, in message order (like the SMTP sink's). */
  headers: Record<string, string[]>;
  messageId: string | undefined;
  /** Address of the From header (the mailbox when the sender set none). */
  from: string;
  subject: string | undefined;
  to: string[];
  cc: string[];
  /** Graph takes Bcc from the MIME header (or bccRecipients) and delivers to them. */
  bcc: string[];
  text: string | undefined;
  html: string | undefined;
  attachments: GraphAttachment[];
  /** "sendMail": one request; "uploadSession": a draft, its attachments, then /send. */
  via: "sendMail" | "uploadSession";
  /** The form the message (or draft) arrived in. */
  format: "mime" | "json";
  saveToSentItems: boolean;
  receivedAt: Date;
}

export type GraphRequestKind = "sendMail" | "createDraft" | "addAttachment" | "createUploadSession" | "uploadChunk" | "cancelUploadSession" | "send" | "unknown";

export interface GraphRequestRecord {
  method: string;
  kind: GraphRequestKind;
  /** Lower-cased UPN (or the path's id when no registered mailbox matches). */
  mailbox: string | undefined;
  status: number;
  /** Graph's error code for a failed request. */
  code?: string;
  /** Request body size in bytes. */
  bytes: number;
  /** Milliseconds since the epoch, sub-millisecond precision. */
  startedAt: number;
  endedAt: number;
}

export interface GraphMailServer {
  /** `https://127.0.0.1:<port>` (GRAPH_URL; paths start with /v1.0). */
  url: string;
  host: string;
  port: number;
  messages: GraphMessage[];
  requests: GraphRequestRecord[];
  /** Per lower-cased mailbox: the most requests it had in flight at once (throttled ones included). */
  maxInFlight: Record<string, number>;
  /** Resolves with all messages so far once at least `count` were sent; fails after `timeoutMs`. */
  waitForMessages(count: number, timeoutMs?: number): Promise<GraphMessage[]>;
  /** Returns the unsubscribe function. */
  onMessage(listener: (message: GraphMessage) => void): () => void;
  /** Forgets recorded messages, requests and maxInFlight (drafts and sessions stay). */
  resetStats(): void;
  /** Adds a mailbox (UPN). */
  addMailbox(address: string): void;
  /** An application access policy: only these mailboxes (undefined: all). Others → 403 ErrorAccessDenied. */
  restrictTo(mailboxes: string[] | undefined): void;
  /** A mailbox Graph cannot use (no Exchange Online licence, on-premises): 404 MailboxNotEnabledForRESTAPI. */
  setRestEnabled(mailbox: string, enabled: boolean): void;
  /** Recipients Exchange cannot resolve: 400 ErrorInvalidRecipients. */
  setInvalidRecipients(addresses: string[]): void;
  /** Lets `mailbox` send with these From addresses (Send As); others → 403 ErrorSendAsDenied. */
  grantSendAs(mailbox: string, addresses: string[]): void;
  /** The next `count` requests (any kind) get this answer. Defaults per status: 429 TooManyRequests and 503/504 with Retry-After: 1. */
  failNext(count: number, status: number, body?: unknown, headers?: Record<string, string>): void;
  /** The next `count` authenticated requests for `mailbox` get 429 ApplicationThrottled with this Retry-After. */
  throttle(mailbox: string, options?: { retryAfterSeconds?: number; count?: number; limit?: string }): void;
  setLatency(ms: number): void;
  close(): Promise<void>;
}

const DEFAULT_LIMITS: GraphLimits = {
  concurrentRequestsPerMailbox: 4,
  requestsPerWindow: 10_000,
  requestWindowMs: 10 * 60_000,
  uploadBytesPerWindow: 150 * 1024 * 1024,
  uploadWindowMs: 5 * 60_000,
};

const ACCESS_DENIED = "Access is denied. Check credentials and try again.";

/** An answer decided before or instead of the operation. */
class GraphAnswer {
  constructor(
    readonly status: number,
    readonly code: string,
    readonly message: string,
    readonly headers: Record<string, string> = {},
  ) {}
}

interface Mailbox {
  address: string;
  objectId: string;
  restEnabled: boolean;
  sendAs: Set<string>;
}

interface Draft {
  id: string;
  mailbox: string;
  format: "mime" | "json";
  raw: Buffer;
  attachments: GraphAttachment[];
}

interface UploadSession {
  id: string;
  draftId: string;
  mailbox: string;
  name: string;
  contentType: string;
  size: number;
  authToken: string;
  expiresAt: Date;
  chunks: Buffer[];
  received: number;
}

interface Route {
  kind: GraphRequestKind;
  /** The {id} of the path, decoded. */
  user?: string;
  messageId?: string;
  sessionId?: string;
}

/** A stable object id per UPN, like Entra's (same derivation as the local OAuth server's `oid`). */
function objectIdOf(address: string): string {
  const hex = createHash("sha256").update(address.toLowerCase()).digest("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-4${hex.slice(13, 16)}-8${hex.slice(17, 20)}-${hex.slice(20, 32)}`;
}

/** Exchange item ids look like base64 ("AAMkAD…=") and must be URL-encoded by clients. */
const itemId = () => `AAMkAD${randomBytes(24).toString("base64url")}AAA=`;

const decode = (segment: string) => {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
};

function routeOf(method: string, pathname: string): Route {
  const graph = /^\/v1\.0\/users\/([^/]+)\/(.+)$/i.exec(pathname);
  if (graph) {
    const user = decode(graph[1]!);
    const rest = graph[2]!;
    if (/^sendMail$/i.test(rest)) return { kind: method === "POST" ? "sendMail" : "unknown", user };
    if (/^messages$/i.test(rest)) return { kind: method === "POST" ? "createDraft" : "unknown", user };
    const item = /^messages\/([^/]+)\/(attachments|attachments\/createUploadSession|send)$/i.exec(rest);
    if (item && method === "POST") {
      const action = item[2]!.toLowerCase();
      const kind = action === "send" ? "send" : action === "attachments" ? "addAttachment" : "createUploadSession";
      return { kind, user, messageId: decode(item[1]!) };
    }
    return { kind: "unknown", user };
  }
  const upload = /^\/api\/v2\.0\/Users\('([^']+)'\)\/Messages\('([^']+)'\)\/AttachmentSessions\('([^']+)'\)$/i.exec(decode(pathname));
  if (upload) {
    const kind = method === "PUT" ? "uploadChunk" : method === "DELETE" ? "cancelUploadSession" : "unknown";
    return { kind, user: upload[1]!, messageId: upload[2]!, sessionId: upload[3]! };
  }
  return { kind: "unknown" };
}

/** The permission each operation needs (Learn, each API's permission table). */
const PERMISSION: Partial<Record<GraphRequestKind, GraphPermission>> = {
  sendMail: "Mail.Send",
  send: "Mail.Send",
  createDraft: "Mail.ReadWrite",
  addAttachment: "Mail.ReadWrite",
  createUploadSession: "Mail.ReadWrite",
};

const addressesOf = (field: AddressObject | AddressObject[] | undefined): string[] =>
  [field ?? []]
    .flat()
    .flatMap((group) => group.value)
    .flatMap((entry) => (entry.group ? entry.group : [entry]))
    .map((entry) => entry.address ?? "")
    .filter(Boolean);

/** Strict base64 (line breaks allowed), as Graph decodes MIME content. */
function decodeBase64(text: string): Buffer | undefined {
  const compact = text.replace(/[\r\n]/g, "");
  if (compact.length === 0 || compact.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(compact)) return undefined;
  return Buffer.from(compact, "base64");
}

interface JsonRecipient {
  emailAddress?: { address?: string; name?: string };
}
interface JsonMessage {
  subject?: string;
  body?: { contentType?: string; content?: string };
  from?: JsonRecipient;
  toRecipients?: JsonRecipient[];
  ccRecipients?: JsonRecipient[];
  bccRecipients?: JsonRecipient[];
  replyTo?: JsonRecipient[];
  internetMessageHeaders?: Array<{ name?: string; value?: string }>;
  attachments?: JsonAttachment[];
}
interface JsonAttachment {
  "@odata.type"?: string;
  name?: string;
  contentType?: string;
  contentBytes?: string;
  isInline?: boolean;
  contentId?: string;
}

const recipient = (r: JsonRecipient | undefined): Mail.Address | undefined =>
  r?.emailAddress?.address ? { name: r.emailAddress.name ?? "", address: r.emailAddress.address } : undefined;
const recipients = (list: JsonRecipient[] | undefined): Mail.Address[] => (list ?? []).map(recipient).filter((r): r is Mail.Address => r !== undefined);

/** A fileAttachment's bytes, or the 400 Graph gives for a malformed one. */
function fileAttachment(attachment: JsonAttachment): { filename: string; contentType: string; content: Buffer; isInline: boolean; contentId: string | undefined } {
  if (attachment["@odata.type"] !== "#microsoft.graph.fileAttachment") {
    throw new GraphAnswer(400, "ErrorInvalidParameter", `Only #microsoft.graph.fileAttachment is supported here; got '${String(attachment["@odata.type"])}'.`);
  }
  const content = typeof attachment.contentBytes === "string" ? decodeBase64(attachment.contentBytes) ?? (attachment.contentBytes === "" ? Buffer.alloc(0) : undefined) : undefined;
  if (!content || !attachment.name) throw new GraphAnswer(400, "ErrorInvalidParameter", "A file attachment needs a name and base64 contentBytes.");
  return { filename: attachment.name, contentType: attachment.contentType ?? "application/octet-stream", content, isInline: attachment.isInline === true, contentId: attachment.contentId };
}

/** Renders a Graph JSON message as MIME, as Exchange does before submitting it. */
async function mimeOfJson(message: JsonMessage, mailbox: string): Promise<Buffer> {
  const headers: Record<string, string> = {};
  for (const header of message.internetMessageHeaders ?? []) {
    // Graph takes only custom headers through internetMessageHeaders.
    if (!header.name || !/^x-/i.test(header.name)) {
      throw new GraphAnswer(400, "InvalidInternetMessageHeader", `The internet message header name '${header.name ?? ""}' should start with 'x-' or 'X-'.`);
    }
    headers[header.name] = header.value ?? "";
  }
  const body = message.body ?? {};
  const html = (body.contentType ?? "text").toLowerCase() === "html";
  const options: Mail.Options = {
    from: recipient(message.from) ?? mailbox,
    to: recipients(message.toRecipients),
    cc: recipients(message.ccRecipients),
    bcc: recipients(message.bccRecipients),
    replyTo: recipients(message.replyTo),
    subject: message.subject ?? "",
    ...(html ? { html: body.content ?? "" } : { text: body.content ?? "" }),
    headers,
    attachments: (message.attachments ?? []).map((a) => {
      const file = fileAttachment(a);
      return { filename: file.filename, contentType: file.contentType, content: file.content, ...(file.isInline && file.contentId ? { cid: file.contentId } : {}) };
    }),
  };
  const node = new MailComposer(options).compile();
  // Bcc stays in the MIME so that the recorded message shows it, like a MIME sendMail's.
  (node as unknown as { keepBcc: boolean }).keepBcc = true;
  return node.build();
}

export async function startGraphMailServer(options: GraphMailServerOptions): Promise<GraphMailServer> {
  const limits: GraphLimits = { ...DEFAULT_LIMITS, ...options.limits };
  const maxMessageBytes = options.maxMessageBytes ?? 35 * 1024 * 1024;
  const sessionTtlMs = options.uploadSessionTtlMs ?? 60 * 60_000;
  let latencyMs = options.latencyMs ?? 0;

  const mailboxes = new Map<string, Mailbox>();
  const addMailbox = (address: string) => {
    const key = address.toLowerCase();
    if (!mailboxes.has(key)) mailboxes.set(key, { address, objectId: objectIdOf(address), restEnabled: true, sendAs: new Set() });
  };
  options.mailboxes.forEach(addMailbox);
  const mailboxNamed = (id: string | undefined): Mailbox | undefined =>
    id === undefined ? undefined : mailboxes.get(id.toLowerCase()) ?? [...mailboxes.values()].find((m) => m.objectId === id.toLowerCase());

  let allowedMailboxes: Set<string> | undefined;
  let invalidRecipients = new Set<string>();
  const drafts = new Map<string, Draft>();
  const sessions = new Map<string, UploadSession>();
  const injected: Array<{ status: number; body: unknown; headers: Record<string, string> | undefined }> = [];
  const throttles = new Map<string, Array<{ retryAfterSeconds: number; limit: string }>>();
  const inFlight = new Map<string, number>();
  const requestTimes = new Map<string, number[]>();
  const uploadBytes = new Map<string, Array<{ at: number; bytes: number }>>();

  const messages: GraphMessage[] = [];
  const requests: GraphRequestRecord[] = [];
  const maxInFlight: Record<string, number> = {};
  const listeners = new Set<(message: GraphMessage) => void>();
  const timers = new Set<NodeJS.Timeout>();
  const sockets = new Set<Socket>();

  const now = () => performance.timeOrigin + performance.now();
  const sleep = (ms: number) =>
    new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        timers.delete(timer);
        resolve();
      }, ms);
      timers.add(timer);
    });

  /** Reads the whole body; keeps at most `keep` bytes (the rest is read and dropped, so a 413 still reaches the client). */
  const readBody = (req: IncomingMessage, keep: number): Promise<{ body: Buffer; size: number }> =>
    new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      let size = 0;
      req.on("data", (chunk: Buffer) => {
        if (size + chunk.length <= keep) chunks.push(chunk);
        size += chunk.length;
      });
      req.on("end", () => resolve({ body: Buffer.concat(chunks), size }));
      req.on("error", reject);
    });

  /** Per mailbox: a 429 when a limit is exceeded (the request is counted either way, as Graph does). */
  function rateLimit(key: string, bytes: number, atArrival: number): GraphAnswer | undefined {
    const t = Date.now();
    const times = (requestTimes.get(key) ?? []).filter((at) => at > t - limits.requestWindowMs);
    times.push(t);
    requestTimes.set(key, times);
    const uploads = (uploadBytes.get(key) ?? []).filter((u) => u.at > t - limits.uploadWindowMs);
    uploads.push({ at: t, bytes });
    uploadBytes.set(key, uploads);
    const throttled = (limit: string, retryAfterSeconds: number) =>
      new GraphAnswer(429, "ApplicationThrottled", `Application is over its ${limit} limit.`, { "retry-after": String(retryAfterSeconds) });
    const queued = throttles.get(key)?.shift();
    if (queued) return throttled(queued.limit, queued.retryAfterSeconds);
    if (atArrival > limits.concurrentRequestsPerMailbox) return throttled("MailboxConcurrency", 1);
    // The wording of this one is not documented; the code and the 429 are.
    if (times.length > limits.requestsPerWindow) return throttled("MailboxRequests", Math.ceil((times[0]! + limits.requestWindowMs - t) / 1000));
    if (uploads.reduce((sum, u) => sum + u.bytes, 0) > limits.uploadBytesPerWindow) return throttled("IncomingBytes", Math.ceil((uploads[0]!.at + limits.uploadWindowMs - t) / 1000));
    return undefined;
  }

  /** Checks a message about to be sent as `mailbox`; returns what to record. */
  async function accept(mailbox: Mailbox, raw: Buffer, extra: GraphAttachment[], meta: { via: GraphMessage["via"]; format: GraphMessage["format"]; saveToSentItems: boolean }): Promise<GraphMessage> {
    let parsed: ParsedMail;
    try {
      parsed = await simpleParser(raw, { skipHtmlToText: true, skipTextToHtml: true, skipTextLinks: true, skipImageLinks: true });
    } catch {
      throw new GraphAnswer(400, "ErrorMimeContentInvalid", "The MIME content is invalid.");
    }
    const to = addressesOf(parsed.to);
    const cc = addressesOf(parsed.cc);
    const bcc = addressesOf(parsed.bcc);
    const all = [...to, ...cc, ...bcc];
    if (all.length === 0) throw new GraphAnswer(400, "ErrorInvalidRecipients", "At least one recipient isn't valid., A message can't be sent because it contains no recipients.");
    const unresolved = all.find((address) => invalidRecipients.has(address.toLowerCase()));
    if (unresolved) throw new GraphAnswer(400, "ErrorInvalidRecipients", `At least one recipient isn't valid., Recipient '${unresolved}' isn't resolved. All recipients must be resolved before a message can be submitted.`);
    const from = addressesOf(parsed.from)[0] ?? mailbox.address;
    if (from.toLowerCase() !== mailbox.address.toLowerCase() && !mailbox.sendAs.has(from.toLowerCase())) {
      throw new GraphAnswer(403, "ErrorSendAsDenied", "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.");
    }
    const size = raw.length + extra.reduce((sum, a) => sum + a.content.length, 0);
    if (size > maxMessageBytes) throw new GraphAnswer(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.");
    return {
      mailbox: mailbox.address,
      raw,
      headers: parseHeaders(raw),
      messageId: parsed.messageId,
      from,
      subject: parsed.subject,
      to,
      cc,
      bcc,
      text: parsed.text,
      html: parsed.html === false ? undefined : parsed.html,
      attachments: [
        ...parsed.attachments.map((a): GraphAttachment => ({ filename: a.filename, contentType: a.contentType, content: a.content, source: meta.format === "json" ? "json" : "mime" })),
        ...extra,
      ],
      ...meta,
      receivedAt: new Date(),
    };
  }

  function record(message: GraphMessage): void {
    messages.push(message);
    for (const listener of [...listeners]) listener(message);
  }

  /** The message of a sendMail or draft request, as MIME, with its form. */
  async function messageOf(req: IncomingMessage, body: Buffer, mailbox: Mailbox, wrapped: boolean): Promise<{ raw: Buffer; format: "mime" | "json"; saveToSentItems: boolean }> {
    const type = (req.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase();
    if (type === "text/plain") {
      const raw = decodeBase64(body.toString("latin1"));
      if (!raw) throw new GraphAnswer(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.");
      return { raw, format: "mime", saveToSentItems: true };
    }
    if (type === "application/json") {
      let json: unknown;
      try {
        json = JSON.parse(body.toString("utf8"));
      } catch {
        throw new GraphAnswer(400, "BadRequest", "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid JSON format.");
      }
      // sendMail wraps the message ({ message, saveToSentItems }); a draft is the message itself.
      const envelope = (json ?? {}) as { message?: JsonMessage; saveToSentItems?: unknown };
      const message = wrapped ? envelope.message : (json as JsonMessage);
      if (!message || typeof message !== "object") throw new GraphAnswer(400, "ErrorInvalidParameter", "The value of the parameter 'Message' is empty.");
      const saveToSentItems = !(envelope.saveToSentItems === false || envelope.saveToSentItems === "false");
      return { raw: await mimeOfJson(message, mailbox.address), format: "json", saveToSentItems };
    }
    throw new GraphAnswer(415, "UnsupportedMediaType", `Content-Type '${type}' is not supported: use application/json, or text/plain for base64 MIME.`);
  }

  function draftOf(route: Route, mailbox: Mailbox): Draft {
    const draft = drafts.get(route.messageId ?? "");
    if (!draft || draft.mailbox !== mailbox.address) throw new GraphAnswer(404, "ErrorItemNotFound", "The specified object was not found in the store.");
    return draft;
  }

  const url = () => origin;
  const userSegment = (mailbox: Mailbox) => encodeURIComponent(mailbox.address);

  /** The operation itself, once the request is authenticated and admitted. */
  async function operate(route: Route, req: IncomingMessage, body: Buffer, mailbox: Mailbox): Promise<{ status: number; json?: unknown; headers?: Record<string, string> }> {
    switch (route.kind) {
      case "sendMail": {
        const { raw, format, saveToSentItems } = await messageOf(req, body, mailbox, true);
        record(await accept(mailbox, raw, [], { via: "sendMail", format, saveToSentItems }));
        return { status: 202 };
      }
      case "createDraft": {
        const { raw, format } = await messageOf(req, body, mailbox, false);
        const id = itemId();
        drafts.set(id, { id, mailbox: mailbox.address, format, raw, attachments: [] });
        const parsed = await simpleParser(raw, { skipHtmlToText: true, skipTextToHtml: true });
        return {
          status: 201,
          json: {
            "@odata.context": `${url()}/v1.0/$metadata#users('${userSegment(mailbox)}')/messages/$entity`,
            id,
            createdDateTime: new Date().toISOString(),
            isDraft: true,
            subject: parsed.subject ?? "",
            internetMessageId: parsed.messageId,
            hasAttachments: parsed.attachments.length > 0,
          },
        };
      }
      case "addAttachment": {
        const draft = draftOf(route, mailbox);
        let attachment: JsonAttachment;
        try {
          attachment = JSON.parse(body.toString("utf8")) as JsonAttachment;
        } catch {
          throw new GraphAnswer(400, "BadRequest", "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid JSON format.");
        }
        const file = fileAttachment(attachment);
        const id = itemId();
        draft.attachments.push({ filename: file.filename, contentType: file.contentType, content: file.content, source: "attachment" });
        return {
          status: 201,
          json: {
            "@odata.context": `${url()}/v1.0/$metadata#users('${userSegment(mailbox)}')/messages('${encodeURIComponent(draft.id)}')/attachments/$entity`,
            "@odata.type": "#microsoft.graph.fileAttachment",
            id,
            name: file.filename,
            contentType: file.contentType,
            size: file.content.length,
            isInline: file.isInline,
            lastModifiedDateTime: new Date().toISOString(),
          },
        };
      }
      case "createUploadSession": {
        const draft = draftOf(route, mailbox);
        let parameters: { AttachmentItem?: { attachmentType?: string; name?: string; size?: number; contentType?: string } };
        try {
          parameters = JSON.parse(body.toString("utf8"));
        } catch {
          throw new GraphAnswer(400, "BadRequest", "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid JSON format.");
        }
        const item = parameters.AttachmentItem;
        if (!item || String(item.attachmentType).toLowerCase() !== "file" || !item.name || typeof item.size !== "number" || !Number.isInteger(item.size)) {
          throw new GraphAnswer(400, "ErrorInvalidParameter", "AttachmentItem needs attachmentType 'file', a name and an integer size.");
        }
        if (item.size < UPLOAD_SESSION_MIN_BYTES) {
          throw new GraphAnswer(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize", "Attachment size must be greater than the minimum size.");
        }
        if (item.size > UPLOAD_SESSION_MAX_BYTES) throw new GraphAnswer(400, "ErrorAttachmentSizeLimitExceeded", "The attachment exceeds the maximum size of an upload session (150 MB).");
        const session: UploadSession = {
          id: itemId(),
          draftId: draft.id,
          mailbox: mailbox.address,
          name: item.name,
          contentType: item.contentType ?? "application/octet-stream",
          size: item.size,
          authToken: randomBytes(32).toString("base64url"),
          expiresAt: new Date(Date.now() + sessionTtlMs),
          chunks: [],
          received: 0,
        };
        sessions.set(session.id, session);
        const uploadUrl = `${url()}/api/v2.0/Users('${userSegment(mailbox)}')/Messages('${encodeURIComponent(draft.id)}')/AttachmentSessions('${encodeURIComponent(session.id)}')?authtoken=${session.authToken}`;
        return {
          status: 201,
          json: { "@odata.context": `${url()}/v1.0/$metadata#microsoft.graph.uploadSession`, uploadUrl, expirationDateTime: session.expiresAt.toISOString(), nextExpectedRanges: ["0-"] },
        };
      }
      case "send": {
        // Learn: "Content-Length: 0. Required." for this body-less POST.
        if (req.headers["content-length"] === undefined && req.headers["transfer-encoding"] === undefined) {
          throw new GraphAnswer(411, "LengthRequired", "Content-Length is required.");
        }
        const draft = draftOf(route, mailbox);
        record(await accept(mailbox, draft.raw, draft.attachments, { via: "uploadSession", format: draft.format, saveToSentItems: true }));
        drafts.delete(draft.id);
        for (const [id, session] of sessions) if (session.draftId === draft.id) sessions.delete(id);
        return { status: 202 };
      }
      default:
        throw new GraphAnswer(400, "BadRequest", `Resource not found for the segment '${route.kind}'.`);
    }
  }

  /** PUT/DELETE on an upload URL: authenticated by its own token, never by a bearer. */
  function upload(route: Route, req: IncomingMessage, body: Buffer, size: number, query: URLSearchParams): { status: number; json?: unknown; headers?: Record<string, string> } {
    const session = sessions.get(route.sessionId ?? "");
    if (req.headers.authorization !== undefined) {
      // The request URL is named without its query: the authtoken is a credential.
      throw new GraphAnswer(401, "InvalidAudienceForResource", `The audience claim value is invalid for current resource. Audience claim is 'https://graph.microsoft.com', request url is '${origin}${req.url?.split("?")[0] ?? ""}'.`);
    }
    if (!session || session.draftId !== route.messageId || query.get("authtoken") !== session.authToken) {
      throw new GraphAnswer(404, "ErrorItemNotFound", "The upload session was not found, or the URL's authtoken does not belong to it.");
    }
    if (session.expiresAt.getTime() <= Date.now()) throw new GraphAnswer(401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.");
    if (route.kind === "cancelUploadSession") {
      sessions.delete(session.id);
      return { status: 204 };
    }
    const range = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(String(req.headers["content-range"] ?? "").trim());
    if (!range) throw new GraphAnswer(400, "invalidRequest", "The Content-Range header is missing or malformed; expected 'bytes {start}-{end}/{total}'.");
    const [start, end, total] = [Number(range[1]), Number(range[2]), Number(range[3])];
    if (total !== session.size) throw new GraphAnswer(400, "invalidRequest", `Declared total size for this fragment (${total}) is different from that of the upload session (${session.size}).`);
    if (end < start || end >= total) throw new GraphAnswer(416, "invalidRange", "The specified byte range is invalid or unavailable.");
    if (start < session.received) throw new GraphAnswer(416, "invalidRange", "Uploaded fragment overlaps with existing data.");
    if (start > session.received) throw new GraphAnswer(416, "invalidRange", "Uploaded fragment is out of order.");
    if (size !== end - start + 1) throw new GraphAnswer(400, "invalidRequest", `The body has ${size} bytes but Content-Range names ${end - start + 1}.`);
    if (size > UPLOAD_CHUNK_MAX_BYTES) throw new GraphAnswer(413, "RequestEntityTooLarge", "An upload fragment may carry at most 4 MB.");
    const last = end === total - 1;
    if (!last && size % UPLOAD_CHUNK_MULTIPLE_BYTES !== 0) {
      throw new GraphAnswer(400, "invalidRequest", `Fragments other than the last must be a multiple of 320 KiB (327,680 bytes); this one has ${size} bytes.`);
    }
    session.chunks.push(body);
    session.received = end + 1;
    if (!last) {
      return {
        status: 200,
        json: {
          "@odata.context": `${origin}/api/v2.0/$metadata#Users('${encodeURIComponent(session.mailbox)}')/Messages('${encodeURIComponent(session.draftId)}')/AttachmentSessions/$entity`,
          ExpirationDateTime: session.expiresAt.toISOString(),
          nextExpectedRanges: [String(session.received)],
        },
      };
    }
    sessions.delete(session.id);
    const draft = drafts.get(session.draftId);
    draft?.attachments.push({ filename: session.name, contentType: session.contentType, content: Buffer.concat(session.chunks), source: "uploadSession" });
    const attachmentId = itemId();
    return { status: 201, headers: { location: `${origin}/api/v2.0/Users('${encodeURIComponent(session.mailbox)}')/Messages('${encodeURIComponent(session.draftId)}')/Attachments('${encodeURIComponent(attachmentId)}')` } };
  }

  /** Checks the bearer token for the operation; returns the 401/403 answer when it does not pass. */
  async function authenticate(req: IncomingMessage, route: Route, mailbox: Mailbox | undefined): Promise<GraphAnswer | undefined> {
    const header = req.headers.authorization ?? "";
    const token = /^Bearer\s+(\S+)$/i.exec(header)?.[1];
    const challenge = { "www-authenticate": `Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", client_id="00000003-0000-0000-c000-000000000000"` };
    if (!token) return new GraphAnswer(401, "InvalidAuthenticationToken", "Access token is empty.", challenge);
    const permission = PERMISSION[route.kind] ?? "Mail.Send";
    let check: GraphTokenCheck;
    try {
      check = await options.verifyToken(token, mailbox?.address ?? route.user ?? "", permission);
    } catch {
      return new GraphAnswer(503, "serviceNotAvailable", "The token could not be validated right now.", { "retry-after": "1" });
    }
    if (check.ok) return undefined;
    switch (check.problem) {
      case "expired":
        return new GraphAnswer(401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.", challenge);
      case "audience":
        return new GraphAnswer(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience.", challenge);
      case "invalid":
        return new GraphAnswer(401, "InvalidAuthenticationToken", token.split(".").length === 3 ? "Access token validation failure." : "CompactToken parsing failed with error code: 80049217", challenge);
      default:
        return new GraphAnswer(403, "ErrorAccessDenied", ACCESS_DENIED);
    }
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const startedAt = now();
    const requestId = randomUUID();
    const clientRequestId = typeof req.headers["client-request-id"] === "string" ? req.headers["client-request-id"] : requestId;
    const parsedUrl = new URL(req.url ?? "/", origin);
    const route = routeOf(req.method ?? "GET", parsedUrl.pathname);
    const mailbox = mailboxNamed(route.user);
    const key = mailbox?.address.toLowerCase() ?? route.user?.toLowerCase();
    let atArrival = 0;
    if (key !== undefined) {
      atArrival = (inFlight.get(key) ?? 0) + 1;
      inFlight.set(key, atArrival);
      maxInFlight[key] = Math.max(maxInFlight[key] ?? 0, atArrival);
    }
    let done = false;
    const leave = () => {
      if (done || key === undefined) return;
      done = true;
      inFlight.set(key, (inFlight.get(key) ?? 1) - 1);
    };
    res.once("close", leave);

    const send = (status: number, json: unknown, headers: Record<string, string> = {}, code?: string, bytes = 0) => {
      leave();
      requests.push({ method: req.method ?? "", kind: route.kind, mailbox: key, status, ...(code === undefined ? {} : { code }), bytes, startedAt, endedAt: now() });
      const payload = json === undefined ? "" : typeof json === "string" ? json : JSON.stringify(json);
      res.writeHead(status, {
        "request-id": requestId,
        "client-request-id": clientRequestId,
        ...(json === undefined ? {} : { "content-type": typeof json === "string" ? "text/plain" : "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8" }),
        "content-length": String(Buffer.byteLength(payload)),
        ...headers,
      });
      res.end(payload);
    };
    const fail = (answer: GraphAnswer, bytes: number) =>
      send(answer.status, { error: { code: answer.code, message: answer.message, innerError: { date: new Date().toISOString().slice(0, 19), "request-id": requestId, "client-request-id": clientRequestId } } }, answer.headers, answer.code, bytes);

    let size = 0;
    try {
      const read = await readBody(req, GRAPH_REQUEST_LIMIT_BYTES);
      size = read.size;
      const injection = injected.shift();
      if (injection) {
        const body = injection.body as { error?: { code?: unknown } } | undefined;
        return send(injection.status, injection.body ?? undefined, injection.headers, typeof body?.error?.code === "string" ? body.error.code : undefined, size);
      }
      if (size > GRAPH_REQUEST_LIMIT_BYTES) throw new GraphAnswer(413, "RequestEntityTooLarge", "The maximum request length supported is 4MB.");
      if (route.kind === "uploadChunk" || route.kind === "cancelUploadSession") {
        const limited = rateLimit(key!, size, atArrival);
        if (limited) throw limited;
        if (latencyMs > 0) await sleep(latencyMs);
        const answer = upload(route, req, read.body, size, parsedUrl.searchParams);
        return send(answer.status, answer.json, answer.headers, undefined, size);
      }
      // Graph wants a token for anything; with one, a path it does not know is a 400.
      if (route.kind === "unknown" && req.headers.authorization !== undefined) {
        throw new GraphAnswer(400, "BadRequest", `Resource not found for the segment '${parsedUrl.pathname.split("/").filter(Boolean).pop() ?? ""}'.`);
      }
      const refused = await authenticate(req, route, mailbox);
      if (refused) throw refused;
      if (!mailbox) throw new GraphAnswer(404, "ErrorInvalidUser", `The requested user '${route.user ?? ""}' is invalid.`);
      if (allowedMailboxes && !allowedMailboxes.has(mailbox.address.toLowerCase())) throw new GraphAnswer(403, "ErrorAccessDenied", ACCESS_DENIED);
      if (!mailbox.restEnabled) throw new GraphAnswer(404, "MailboxNotEnabledForRESTAPI", "REST API is not yet supported for this mailbox.");
      const limited = rateLimit(key!, size, atArrival);
      if (limited) throw limited;
      if (latencyMs > 0) await sleep(latencyMs);
      const answer = await operate(route, req, read.body, mailbox);
      return send(answer.status, answer.json, answer.headers, undefined, size);
    } catch (error) {
      if (res.headersSent || res.destroyed) return;
      if (error instanceof GraphAnswer) return fail(error, size);
      return fail(new GraphAnswer(500, "generalException", `Graph double error: ${error instanceof Error ? error.message : String(error)}`), size);
    }
  }

  const server = createServer({ key: options.tls.key, cert: options.tls.cert }, (req, res) => {
    void handle(req, res);
  });
  server.on("connection", (socket: Socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
  });
  // A client that resets mid-request must not crash the process the double runs in.
  server.on("clientError", (_err, socket) => socket.destroy());
  server.on("tlsClientError", () => {});

  const host = options.host ?? "127.0.0.1";
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 0, host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;
  const origin = `https://${host.includes(":") ? `[${host}]` : host}:${port}`;

  const onMessage = (listener: (message: GraphMessage) => void): (() => void) => {
    listeners.add(listener);
    return () => void listeners.delete(listener);
  };

  const defaultFailure = (status: number): { body: unknown; headers: Record<string, string> } => {
    const innerError = { date: new Date().toISOString().slice(0, 19), "request-id": randomUUID(), "client-request-id": randomUUID() };
    if (status === 429) return { body: { error: { code: "TooManyRequests", message: "Please retry again later.", innerError } }, headers: { "retry-after": "1" } };
    if (status === 503) return { body: { error: { code: "serviceNotAvailable", message: "The service is temporarily unavailable. Please retry after a while.", innerError } }, headers: { "retry-after": "1" } };
    if (status === 504) return { body: { error: { code: "UnknownError", message: "", innerError } }, headers: { "retry-after": "1" } };
    return { body: { error: { code: status >= 500 ? "generalException" : "BadRequest", message: `Injected HTTP ${status}.`, innerError } }, headers: {} };
  };

  return {
    url: origin,
    host,
    port,
    messages,
    requests,
    maxInFlight,
    onMessage,
    waitForMessages(count, timeoutMs = 5_000) {
      if (messages.length >= count) return Promise.resolve([...messages]);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          unsubscribe();
          const last = requests.slice(-5).map((r) => `${r.method} ${r.kind} ${r.status}${r.code ? ` ${r.code}` : ""}`);
          reject(new Error(`graph double: timed out after ${timeoutMs} ms waiting for ${count} message(s); ${messages.length} sent; last requests: ${last.join("; ") || "none"}`));
        }, timeoutMs);
        const unsubscribe = onMessage(() => {
          if (messages.length < count) return;
          clearTimeout(timer);
          unsubscribe();
          resolve([...messages]);
        });
      });
    },
    resetStats() {
      messages.length = 0;
      requests.length = 0;
      for (const name of Object.keys(maxInFlight)) delete maxInFlight[name];
    },
    addMailbox,
    restrictTo(list) {
      allowedMailboxes = list ? new Set(list.map((m) => m.toLowerCase())) : undefined;
    },
    setRestEnabled(address, enabled) {
      addMailbox(address);
      mailboxes.get(address.toLowerCase())!.restEnabled = enabled;
    },
    setInvalidRecipients(addresses) {
      invalidRecipients = new Set(addresses.map((a) => a.toLowerCase()));
    },
    grantSendAs(address, fromAddresses) {
      addMailbox(address);
      for (const from of fromAddresses) mailboxes.get(address.toLowerCase())!.sendAs.add(from.toLowerCase());
    },
    failNext(count, status, body, headers) {
      for (let i = 0; i < count; i++) {
        const fallback = defaultFailure(status);
        injected.push({ status, body: body === undefined ? fallback.body : body, headers: headers ?? fallback.headers });
      }
    },
    throttle(address, { retryAfterSeconds = 1, count = 1, limit = "MailboxConcurrency" } = {}) {
      const key = address.toLowerCase();
      const queue = throttles.get(key) ?? [];
      for (let i = 0; i < count; i++) queue.push({ retryAfterSeconds, limit });
      throttles.set(key, queue);
    },
    setLatency(ms) {
      latencyMs = ms;
    },
    close() {
      for (const timer of timers) clearTimeout(timer);
      timers.clear();
      return new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
      });
    },
  };
}
