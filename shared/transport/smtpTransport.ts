// SMTP submission with XOAUTH2 through one pooled nodemailer transport per process: connections
// are opened once and reused across messages and invocations, and each new connection asks the
// TokenProvider for the (shared, cached) token through nodemailer's oauth2 provisioning hook.
import { connect, type Socket } from "node:net";
import { Readable } from "node:stream";
import nodemailer from "nodemailer";
import SMTPConnection from "nodemailer/lib/smtp-connection";
import type { SmtpConfig } from "../config.js";
import type { Logger } from "../log.js";
import { needsSmtpUtf8, type Mailbox } from "../message/address.js";
import type { EmailMessage } from "../message/schema.js";
import { MessageError } from "../message/validate.js";
import type { TokenProvider } from "../token/tokenProvider.js";
import { toMailerError } from "../errors.js";
import { mailOptionsFor } from "./mailOptions.js";
import { classifySmtpError } from "./smtpErrors.js";
import type { SendResult, Transport } from "./transport.js";
import type { ConnectionSlots } from "../send/connectionSlots.js";

export interface SmtpTransportStats {
  tokenProvisions: number;
  tokenRenewals: number;
}

// The Message-ID is derived from the message id; it lives with the MIME mapping both transports share.
export { messageIdFor } from "./mailOptions.js";

/**
 * The first address of the message that needs SMTPUTF8 (a non-ASCII local part), named by field
 * and index as validation names them in arrays.
 */
function firstSmtpUtf8Address(message: EmailMessage): { field: string; mailbox: Mailbox } | undefined {
  if (needsSmtpUtf8(message.from)) return { field: "from", mailbox: message.from };
  for (const [field, list] of [["to", message.to], ["cc", message.cc], ["bcc", message.bcc], ["replyTo", message.replyTo]] as const) {
    const index = list.findIndex(needsSmtpUtf8);
    const mailbox = list[index];
    if (mailbox !== undefined) return { field: `${field}[${index}]`, mailbox };
  }
  return undefined;
}

const EXTENSIONS_PROBE = "X-QM-EXTENSIONS";

/**
 * The extensions the server announces after STARTTLS. nodemailer's pool does not expose them, and
 * it would send a non-ASCII address without the SMTPUTF8 keyword to a server that lacks it, so a
 * short connection of our own reads them: greeting, EHLO, STARTTLS, EHLO, QUIT. The list is read
 * through nodemailer's public custom-auth hook, which is handed it; nothing is sent in it. No AUTH,
 * so no token and no mailbox: it is not one of the mailbox's connections, and takes no
 * connection slot (the pool may hold them all, idle, for as long as it lives).
 */
function announcedExtensions(smtp: SmtpConfig): Promise<string[]> {
  return new Promise<string[]>((resolve, reject) => {
    let extensions: string[] = [];
    const connection = new SMTPConnection({
      host: smtp.host,
      port: smtp.port,
      secure: false,
      requireTLS: true,
      connectionTimeout: 30_000,
      greetingTimeout: 30_000,
      socketTimeout: 30_000,
      logger: false,
      customAuth: {
        [EXTENSIONS_PROBE]: (context) => {
          extensions = context.extensions;
          context.resolve();
        },
      },
    });
    connection.once("error", reject);
    connection.connect(() => {
      connection.login({ method: EXTENSIONS_PROBE }, (error) => {
        connection.quit();
        if (error) reject(error);
        else resolve(extensions);
      });
    });
  });
}

/**
 * Attachment bytes as a stream of 48 KiB slices (views, not copies). Given one Buffer, nodemailer's
 * base64 encoder turns the whole attachment into one string and then one wrapped copy of it at
 * once (two transient copies of 4/3 its size); slices keep that to one slice at a time.
 */
function attachmentStream(content: Buffer): Readable {
  const slice = 3 * 16 * 1024; // a multiple of 3: base64 of each slice needs no carry-over
  function* slices(): Generator<Buffer> {
    for (let offset = 0; offset < content.length; offset += slice) yield content.subarray(offset, offset + slice);
  }
  return Readable.from(slices(), { objectMode: false });
}

/** How long a connection with nothing to send stays open (holding one of the mailbox's connection slots). */
export const LANE_IDLE_MS = 1_000;

export function createSmtpTransport(
  smtp: SmtpConfig,
  tokens: TokenProvider,
  logger: Logger,
  options: { connectionSlots?: ConnectionSlots } = {},
): Transport & { stats: SmtpTransportStats } {
  const stats: SmtpTransportStats = { tokenProvisions: 0, tokenRenewals: 0 };
  // Connections are lanes: one per connection slot this instance holds (the mailbox's slots live
  // in Table storage, shared by every instance), each a nodemailer pool of one connection. A send
  // takes a free lane, or claims a slot for a new one, whichever comes first, so it never waits on a
  // connection that is still waiting for a slot while another lane of ours is free (with one pool of
  // N connections, nodemailer binds a queued message to the new connection it opens for it; two
  // instances could then each wait for a slot the other holds with an idle connection). A lane
  // with nothing to send for LANE_IDLE_MS closes and frees its slot for the other instances.
  interface Lane {
    transporter: ReturnType<typeof createLaneTransport>;
    busy: boolean;
    closed: boolean;
    idleTimer?: NodeJS.Timeout;
    sockets: Set<Socket>;
    lease: { release(): Promise<void> };
    /** Resolves when the lane's socket is gone and its slot released. */
    gone?: Promise<void>;
    markGone?: () => void;
  }
  const lanes = new Set<Lane>();
  const waiting: Array<{ resolve: (lane: Lane) => void; reject: (error: unknown) => void }> = [];
  const claims = new Set<AbortController>();
  let closedForGood = false;

  function openLane(lease: { release(): Promise<void> }): Lane {
    const lane: Lane = { busy: false, closed: false, sockets: new Set(), lease, transporter: undefined as unknown as ReturnType<typeof createLaneTransport> };
    lane.transporter = createLaneTransport(lane);
    lanes.add(lane);
    return lane;
  }
  const closing = new Set<Lane>();
  function closeLane(lane: Lane): Promise<void> {
    if (lane.gone) return lane.gone;
    const gone = new Promise<void>((resolve) => (lane.markGone = resolve));
    lane.gone = gone;
    closing.add(lane);
    void gone.then(() => closing.delete(lane));
    lane.closed = true;
    clearTimeout(lane.idleTimer);
    lanes.delete(lane);
    lane.transporter.close();
    // The slot is free once the socket is gone, not before: the server counts open connections.
    if (lane.sockets.size === 0) releaseLane(lane);
    return lane.gone;
  }
  function releaseLane(lane: Lane): void {
    void lane.lease.release().then(() => lane.markGone?.());
  }
  function handOver(lane: Lane): void {
    const waiter = waiting.shift();
    if (waiter) {
      lane.busy = true;
      waiter.resolve(lane);
      return;
    }
    lane.busy = false;
    lane.idleTimer = setTimeout(() => void closeLane(lane), LANE_IDLE_MS);
    lane.idleTimer.unref();
    // Claims still waiting for a slot are for sends a lane has served since: give them up.
    for (const claim of [...claims].slice(waiting.length)) claim.abort(new Error("not needed"));
  }
  function claimLane(): void {
    const slots = options.connectionSlots;
    if (!slots) {
      handOver(openLane({ release: async () => undefined }));
      return;
    }
    const claim = new AbortController();
    claims.add(claim);
    slots.acquire(claim.signal).then(
      (lease) => {
        claims.delete(claim);
        if (closedForGood) return void lease.release();
        handOver(openLane(lease));
      },
      (error: unknown) => {
        claims.delete(claim);
        if (claim.signal.aborted) return;
        // Storage failed: the send that asked for a lane fails (and is retried), not all of them.
        waiting.shift()?.reject(error);
      },
    );
  }
  function takeLane(): Promise<Lane> {
    const free = [...lanes].find((lane) => !lane.busy);
    if (free) {
      clearTimeout(free.idleTimer);
      free.busy = true;
      return Promise.resolve(free);
    }
    const lane = new Promise<Lane>((resolve, reject) => waiting.push({ resolve, reject }));
    if (lanes.size + claims.size < smtp.maxConnections && claims.size < waiting.length) claimLane();
    return lane;
  }
  async function withLane<T>(use: (transporter: ReturnType<typeof createLaneTransport>) => Promise<T>): Promise<T> {
    const lane = await takeLane();
    try {
      return await use(lane.transporter);
    } finally {
      if (!lane.closed) handOver(lane);
    }
  }
  function createLaneTransport(lane: Lane) {
    const transporter = nodemailer.createTransport({
      pool: true,
      host: smtp.host,
      port: smtp.port,
      secure: false,
      requireTLS: true, // never send a token over a connection that did not upgrade
      maxConnections: 1, // one slot, one connection
      maxMessages: Infinity,
      connectionTimeout: 30_000,
      greetingTimeout: 30_000,
      socketTimeout: 60_000,
      auth: { type: "OAuth2", user: smtp.user },
      logger: false,
      // The socket is ours so that the slot is freed when it is really gone.
      getSocket: (socketOptions: { host?: string; port?: number }, callback: (error: Error | null, result?: { connection: Socket }) => void) => {
        let answered = false;
        const socket = connect({ host: socketOptions.host ?? "localhost", port: socketOptions.port ?? 587 });
        lane.sockets.add(socket);
        socket.once("close", () => {
          lane.sockets.delete(socket);
          if (lane.closed && lane.sockets.size === 0) releaseLane(lane);
        });
        socket.once("connect", () => {
          answered = true;
          callback(null, { connection: socket });
        });
        socket.once("error", (error) => {
          if (answered) return; // from here on nodemailer owns the socket and its errors
          answered = true;
          callback(error);
        });
      },
    });
    transporter.set("oauth2_provision_cb", (_user: string, renew: boolean, callback: (error: Error | null, token?: string, expires?: number) => void) => {
      stats.tokenProvisions += 1;
      if (renew) stats.tokenRenewals += 1;
      (renew ? tokens.renew() : tokens.getToken()).then(
        (token) => callback(null, token.token, token.expiresAt.getTime()),
        // nodemailer rewrites the code of the error it is given; carry ours alongside.
        (error: unknown) => callback(Object.assign(new Error((error as Error).message), { mailerError: toMailerError(error) })),
      );
    });
    return transporter;
  }

  // Whether the server announces SMTPUTF8: asked once per transport, when a message first needs it.
  let smtpUtf8Announced: Promise<boolean> | undefined;
  function serverAnnouncesSmtpUtf8(): Promise<boolean> {
    smtpUtf8Announced ??= announcedExtensions(smtp).then(
      (extensions) => extensions.includes("SMTPUTF8"),
      (error: unknown) => {
        smtpUtf8Announced = undefined; // not known: ask again next time
        throw error;
      },
    );
    return smtpUtf8Announced;
  }

  async function sendOnce(message: EmailMessage): Promise<SendResult> {
    const international = firstSmtpUtf8Address(message);
    if (international !== undefined && !(await serverAnnouncesSmtpUtf8())) {
      throw new MessageError(
        "MESSAGE_INVALID_ADDRESS",
        `${international.field} ${JSON.stringify(international.mailbox.address)} has a non-ASCII local part, which needs the SMTPUTF8 extension (RFC 6531); ${smtp.host}:${smtp.port} does not announce it`,
        international.field,
      );
    }
    // Parsed mailboxes, never the strings the producer wrote: nodemailer gets nothing to re-parse,
    // so RCPT TO and the headers carry exactly the addresses validation accepted.
    const info = await withLane((transporter) => transporter.sendMail(mailOptionsFor(message, smtp.user, attachmentStream)));
    const addresses = (list: unknown) => (list as Array<string | { address: string }>).map((a) => (typeof a === "string" ? a : a.address));
    // Some recipients refused while others took it: the message counts as sent, so the refusals
    // (a 4xx deferral too, which is not retried for one recipient alone) are logged with the reply.
    for (const refusal of (info as { rejectedErrors?: Array<{ recipient?: string; response?: string; responseCode?: number }> }).rejectedErrors ?? []) {
      logger.log("warn", "smtp.recipient_refused", { id: message.id, recipient: refusal.recipient, responseCode: refusal.responseCode, response: refusal.response?.trim() });
    }
    return { messageId: info.messageId, response: info.response, accepted: addresses(info.accepted), rejected: addresses(info.rejected) };
  }

  return {
    stats,
    async send(message: EmailMessage): Promise<SendResult> {
      try {
        return await sendOnce(message);
      } catch (error) {
        let classified = classifySmtpError(error);
        if (classified.code === "SMTP_AUTH_REJECTED") {
          // Exchange answers 535 straight away (no 334 challenge, so nodemailer does not renew by
          // itself): the token may be stale or its permissions changed. Drop it and try once more.
          await tokens.renew();
          try {
            return await sendOnce(message);
          } catch (retryError) {
            classified = classifySmtpError(retryError);
          }
        }
        // A token or credential failure surfaces here too (nodemailer asks for the token), but it
        // is not the SMTP server's answer: the pipeline logs it (circuit.open, message.retry).
        if (classified.code.startsWith("SMTP_")) {
          logger.log(classified.kind === "transient" ? "warn" : "error", "smtp.failed", { id: message.id, error: classified.toJSON() });
        }
        throw classified;
      }
    },
    async verify() {
      try {
        await withLane((transporter) => transporter.verify());
      } catch (error) {
        throw classifySmtpError(error);
      }
    },
    async close() {
      closedForGood = true;
      for (const claim of claims) claim.abort(new Error("transport closed"));
      for (const waiter of waiting.splice(0)) waiter.reject(new Error("the SMTP transport was closed"));
      // Wait for the slots to be written free: a process that exits right after would otherwise
      // leave them taken until their leases run out (a minute), and the next process on the
      // mailbox would wait that long. A socket that has not closed within a second (QUIT not
      // answered) is not waited for any longer: its slot is released anyway.
      const within = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms).unref());
      for (const lane of [...lanes]) void closeLane(lane);
      const everyLane = () => Promise.all([...closing].map((lane) => lane.gone));
      await Promise.race([everyLane(), within(1_000)]);
      for (const lane of closing) releaseLane(lane);
      await Promise.race([everyLane(), within(3_000)]);
    },
  };
}
