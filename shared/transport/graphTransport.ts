// Step 5, the Graph way: the same MIME nodemailer builds for SMTP (text and HTML alternatives,
// attachments, custom headers, our derived Message-ID), handed to Microsoft Graph's
// `POST /users/{mailbox}/sendMail` as base64 (Content-Type text/plain). A message whose request
// would pass Graph's 4 MB limit goes as a draft (its MIME without the attachments), then each
// attachment (small ones inline, large ones through an upload session in chunks), then `send`.
//
// Limits: at most GRAPH_MAX_CONCURRENCY sends per mailbox at once, across instances (leased slots
// in Table storage, in-process waiters queue first). Like SMTP's pooled connections, a slot is kept
// for the next send for up to SLOT_REUSE_MS instead of being claimed and released per message
// (which cost a table round trip each way and, with a release still on its way, a retry wait);
// after that it is given back, so other instances get their turn. A 429 or a 503/504 with
// Retry-After is a deferred error: the sender pauses the whole mailbox until then.
import MailComposer from "nodemailer/lib/mail-composer";
import type { GraphConfig } from "../config.js";
import { MailerError, toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
import type { EmailMessage } from "../message/schema.js";
import type { ConnectionLease, ConnectionSlots } from "../send/connectionSlots.js";
import type { MailboxPause } from "../send/mailboxPause.js";
import type { TokenProvider } from "../token/tokenProvider.js";
import { classifyGraphResponse, graphNetworkError } from "./graphErrors.js";
import { mailOptionsFor, type MailOptions } from "./mailOptions.js";
import type { SendResult, Transport } from "./transport.js";

/** Graph refuses request bodies over 4 MB; keep a margin for the request line and headers. */
export const GRAPH_REQUEST_LIMIT_BYTES = 4 * 1024 * 1024 - 64 * 1024;
/**
 * Attachments at or above this go through an upload session (Graph: "3 MB"); below it, the base64
 * JSON of an inline attachment stays under the 4 MB request limit.
 */
const INLINE_ATTACHMENT_LIMIT_BYTES = 3_000_000;
/** Upload chunks: multiples of 320 KiB, under Outlook's 4 MB per request. */
export const UPLOAD_CHUNK_BYTES = 10 * 320 * 1024;
const REQUEST_TIMEOUT_MS = 60_000;
/** How long one claim of a table slot serves consecutive sends before it is given back. */
const SLOT_REUSE_MS = 5_000;
/** A slot nobody here needs is given back after this long. */
const SLOT_IDLE_MS = 200;

interface GraphRequest {
  method: "POST" | "PUT";
  path: string;
  body: string | Buffer;
  contentType: string;
  /** Upload session URLs carry their own credential: Graph refuses an Authorization header there. */
  url?: string;
  headers?: Record<string, string>;
}

/** Bounds concurrent sends in this process before they compete for the shared table slots. */
function semaphore(size: number) {
  let free = size;
  const waiting: Array<() => void> = [];
  return async function hold<T>(work: () => Promise<T>): Promise<T> {
    if (free > 0) free -= 1;
    else await new Promise<void>((resolve) => waiting.push(resolve));
    try {
      return await work();
    } finally {
      const next = waiting.shift();
      if (next) next();
      else free += 1;
    }
  };
}

async function mimeOf(options: MailOptions): Promise<Buffer> {
  const node = new MailComposer(options).compile();
  // Graph takes Bcc from the MIME headers (it removes the header before delivery); nodemailer
  // drops it by default because SMTP carries Bcc in the envelope only.
  (node as unknown as { keepBcc: boolean }).keepBcc = true;
  return node.build();
}

export function createGraphTransport(
  graph: GraphConfig,
  mailbox: string,
  tokens: TokenProvider,
  logger: Logger,
  limits: { concurrency?: ConnectionSlots; pause?: Pick<MailboxPause, "pausedForMs"> } = {},
): Transport {
  const userPath = `/v1.0/users/${encodeURIComponent(mailbox)}`;
  const local = semaphore(graph.maxConcurrency);
  // Slots this process holds but is not using right now, newest last.
  const spare: Array<{ lease: ConnectionLease; claimedAt: number }> = [];
  let idleTimer: NodeJS.Timeout | undefined;

  async function takeSlot(): Promise<{ lease: ConnectionLease; claimedAt: number } | undefined> {
    if (!limits.concurrency) return undefined;
    const held = spare.pop();
    if (held) return held;
    return { lease: await limits.concurrency.acquire(), claimedAt: Date.now() };
  }

  function giveBackSlot(slot: { lease: ConnectionLease; claimedAt: number } | undefined): void {
    if (!slot) return;
    if (Date.now() - slot.claimedAt >= SLOT_REUSE_MS) {
      slot.lease.release();
      return;
    }
    spare.push(slot);
    clearTimeout(idleTimer);
    idleTimer = setTimeout(() => {
      for (const idle of spare.splice(0)) idle.lease.release();
    }, SLOT_IDLE_MS);
    idleTimer.unref();
  }

  async function call(request: GraphRequest, renewed = false): Promise<{ status: number; text: string; headers: Headers }> {
    const command = `${request.method} ${request.url ? "<upload session>" : request.path.replace(userPath, "/users/{mailbox}")}`;
    const headers: Record<string, string> = { "content-type": request.contentType, ...request.headers };
    if (!request.url) headers["authorization"] = `Bearer ${(await tokens.getToken()).token}`;
    let response: Response;
    let text: string;
    try {
      response = await fetch(request.url ?? `${graph.url}${request.path}`, { method: request.method, headers, body: request.body, signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
      text = await response.text();
    } catch (error) {
      throw graphNetworkError(error, command);
    }
    if (response.ok) return { status: response.status, text, headers: response.headers };
    const failure = classifyGraphResponse(response.status, text, response.headers, command);
    if (failure.code === "GRAPH_AUTH_REJECTED" && !renewed && !request.url) {
      // Like SMTP's 535: the token may be stale or its permissions changed. Renew once.
      await tokens.renew();
      return call(request, true);
    }
    throw failure;
  }

  async function sendWhole(mime: Buffer): Promise<void> {
    await call({ method: "POST", path: `${userPath}/sendMail`, body: mime.toString("base64"), contentType: "text/plain" });
  }

  /** Draft from the MIME without attachments, then the attachments, then send. */
  async function sendAsDraft(options: MailOptions, message: EmailMessage): Promise<void> {
    const draftMime = await mimeOf({ ...options, attachments: [] });
    const draft = await call({ method: "POST", path: `${userPath}/messages`, body: draftMime.toString("base64"), contentType: "text/plain" });
    const id = (JSON.parse(draft.text) as { id?: string }).id;
    if (!id) throw new MailerError("GRAPH_BAD_RESPONSE", "Graph created a draft without an id", { kind: "transient", command: "POST /users/{mailbox}/messages" });
    const messagePath = `${userPath}/messages/${encodeURIComponent(id)}`;
    for (const attachment of message.attachments) {
      const content = attachment.content ?? Buffer.alloc(0);
      const contentType = attachment.contentType ?? "application/octet-stream";
      if (content.length < INLINE_ATTACHMENT_LIMIT_BYTES) {
        await call({
          method: "POST",
          path: `${messagePath}/attachments`,
          contentType: "application/json",
          body: JSON.stringify({ "@odata.type": "#microsoft.graph.fileAttachment", name: attachment.filename, contentType, contentBytes: content.toString("base64") }),
        });
        continue;
      }
      const session = await call({
        method: "POST",
        path: `${messagePath}/attachments/createUploadSession`,
        contentType: "application/json",
        body: JSON.stringify({ AttachmentItem: { attachmentType: "file", name: attachment.filename, size: content.length, contentType } }),
      });
      const uploadUrl = (JSON.parse(session.text) as { uploadUrl?: string }).uploadUrl;
      if (!uploadUrl) throw new MailerError("GRAPH_BAD_RESPONSE", "Graph created an upload session without an uploadUrl", { kind: "transient", command: "POST .../createUploadSession" });
      for (let start = 0; start < content.length; start += UPLOAD_CHUNK_BYTES) {
        const chunk = content.subarray(start, Math.min(content.length, start + UPLOAD_CHUNK_BYTES));
        await call({
          method: "PUT",
          path: "",
          url: uploadUrl,
          contentType: "application/octet-stream",
          body: chunk,
          headers: { "content-range": `bytes ${start}-${start + chunk.length - 1}/${content.length}` },
        });
      }
    }
    await call({ method: "POST", path: `${messagePath}/send`, body: "", contentType: "application/json" });
  }

  return {
    async send(message) {
      const mail = mailOptionsFor(message, mailbox);
      return local(async () => {
        const slot = await takeSlot();
        try {
          // A throttle met while this send waited for its slot (here or on another instance)
          // holds it too; a draft already being uploaded is finished rather than abandoned.
          const pausedMs = (await limits.pause?.pausedForMs()) ?? 0;
          if (pausedMs > 0) {
            throw new MailerError("MAILBOX_PAUSED", `${mailbox} is paused for another ${Math.ceil(pausedMs / 1000)} s: Graph throttled it`, { kind: "deferred", retryAfterSeconds: Math.ceil(pausedMs / 1000) });
          }
          const mime = await mimeOf(mail);
          // base64 grows the body by 4/3.
          if (Math.ceil(mime.length / 3) * 4 <= GRAPH_REQUEST_LIMIT_BYTES) await sendWhole(mime);
          else await sendAsDraft(mail, message);
        } catch (error) {
          const failure = toMailerError(error);
          logger.log(failure.kind === "transient" || failure.kind === "deferred" ? "warn" : "error", "graph.failed", { id: message.id, error: failure.toJSON() });
          throw failure;
        } finally {
          giveBackSlot(slot);
        }
        const recipients = [...message.to, ...message.cc, ...message.bcc].map((m) => m.address);
        // 202 Accepted: Graph queued it for delivery; it has no per-recipient answer.
        return { messageId: String(mail.messageId), response: "202 Accepted", accepted: recipients, rejected: [] } satisfies SendResult;
      });
    },
    async verify() {
      // Mail.Send allows sending only, so the probe cannot read the mailbox. It checks what the
      // token grants (aud Graph, Mail.Send in roles, or scp if delegated), then asks sendMail to
      // send an empty request: Graph authenticates, authorises and resolves the mailbox first and
      // only then refuses the empty payload with 400, so a 400 proves everything but the message,
      // and nothing can be sent.
      const token = await tokens.renew();
      const claims = decodeClaims(token.token);
      const granted = [...(Array.isArray(claims["roles"]) ? (claims["roles"] as string[]) : []), ...String(claims["scp"] ?? "").split(" ")];
      const audience = String(claims["aud"] ?? "");
      if (audience && !/graph\.microsoft|00000003-0000-0000-c000-000000000000/i.test(audience) && !audience.startsWith(graph.url)) {
        throw new MailerError("GRAPH_AUTH_REJECTED", `the token is for ${audience}, not Microsoft Graph`, { kind: "config", hint: "Set TOKEN_SCOPE to https://graph.microsoft.com/.default (or leave it unset with TRANSPORT=graph)." });
      }
      if (!granted.includes("Mail.Send")) {
        throw new MailerError("GRAPH_ACCESS_DENIED", "the token carries no Mail.Send permission", {
          kind: "config",
          hint: "Grant the app the Microsoft Graph application permission Mail.Send and admin consent (delegated Mail.Send for AUTH_METHOD=password).",
        });
      }
      try {
        await call({ method: "POST", path: `${userPath}/sendMail`, body: "{}", contentType: "application/json" });
      } catch (error) {
        const failure = toMailerError(error);
        // The expected answer: the empty request itself was refused.
        if (failure.code === "GRAPH_REJECTED" && /^400\b/.test(failure.response ?? "")) return;
        throw failure;
      }
      throw new MailerError("GRAPH_BAD_RESPONSE", "Graph accepted an empty sendMail request", { kind: "transient", command: "POST /users/{mailbox}/sendMail" });
    },
    async close() {
      clearTimeout(idleTimer);
      for (const idle of spare.splice(0)) idle.lease.release();
    },
  };
}


/** The token's claims, for the probe only; the signature is Graph's business. */
function decodeClaims(token: string): Record<string, unknown> {
  try {
    return JSON.parse(Buffer.from(token.split(".")[1] ?? "", "base64url").toString("utf8")) as Record<string, unknown>;
  } catch {
    return {};
  }
}
