// A local stand-in for Exchange Online's submission endpoint (smtp.office365.com:587), used by the
// tests, `npm run local` and the benchmark. It reproduces the parts of Exchange our sender must cope
// with: STARTTLS before anything else, XOAUTH2 only, 535 5.7.3 on a bad token, SendAs denial after
// DATA, the 500-recipient cap, and (through `fault`) the transient replies and dropped connections
// that make a sender retry. It is not a mail server: nothing is relayed.
//
// smtp-server findings (3.21.6), so nobody has to re-read its source:
// - Every connection waits a fixed 100 ms before the 220 greeting (early-talker detection in
//   SMTPConnection.init; no option changes it). Pooled senders pay it once per connection; a
//   connection-per-message sender pays it per message. Exchange's own greeting is slower still, so
//   the delay stays.
// - By default it also reverse-resolves every client address before greeting (up to 1.5 s when DNS
//   is unreachable). That only hurts here, so `disableReverseLookup` is set.
// - XOAUTH2 reaches onAuth as { method: "XOAUTH2", username, accessToken }. Failing through
//   `callback(err)` replies `err.responseCode err.message` at once, as Exchange does; failing through
//   a response without `user` would send a 334 JSON challenge first (Gmail's style), so we don't.
// - Before STARTTLS, EHLO still advertises AUTH; AUTH is answered `538 Error: Must issue a STARTTLS
//   command first` (Exchange instead hides AUTH until TLS). MAIL/RCPT/DATA before AUTH get 530 with
//   `authRequiredMessage`. STARTTLS clears any earlier identity (RFC 3207).
// - Enhanced status codes are off by default (hideENHANCEDSTATUSCODES), so the texts below carry
//   their own Exchange-style codes and are not prefixed twice. Its own maxRecipients reply is
//   `452 Error: too many recipients`, hence the cap is enforced in onRcptTo with Exchange's text.
// - Its close() waits up to 30 s (closeTimeout) for clients to leave; a pooled sender never does, so
//   close() below destroys the sockets itself.
import { randomBytes } from "node:crypto";
import { mkdir, writeFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { SMTPServer } from "smtp-server";
import type { SMTPServerDataStream, SMTPServerError, SMTPServerSession } from "smtp-server";

export interface SinkMessage {
  /** Transaction number, shared with the fault hook (see SmtpSinkOptions.fault). */
  seq: number;
  authUser: string;
  mailFrom: string;
  rcptTo: string[];
  raw: Buffer;
  /** Lower-cased names, unfolded values, in message order. */
  headers: Record<string, string[]>;
  receivedAt: Date;
  /** Path of the .eml file when outboxDir is set. */
  file?: string;
}

/**
 * A fault decision: a reply instead of the normal one, a dropped connection, or (at "data" only)
 * the dangerous cases: the message stored but the connection dropped before the 250
 * (`storeThenDrop`), or the normal answer held back for `delayMs`.
 */
export type SmtpFaultAction = { reply: number; message: string } | { drop: true } | { storeThenDrop: true } | { delayMs: number };

/** What the fault hook is told about. */
export interface SmtpFault {
  /**
   * "auth": at AUTH, before the token is checked (a reply here fails the login); "mail": at MAIL
   * FROM (before it is accepted); "rcpt": at each RCPT TO; "data": after DATA, instead of the
   * final reply.
   */
  phase: "auth" | "mail" | "rcpt" | "data";
  /** Transaction number: 1 for the first MAIL FROM the sink sees, across all connections (0 before it). */
  seq: number;
  session: { user: string; connection: number };
  /** At "rcpt": the recipient being offered. */
  address?: string;
}

export interface SmtpSinkOptions {
  /** PEM for STARTTLS. */
  tls: { key: string; cert: string };
  verifyToken: (user: string, token: string) => Promise<{ ok: true } | { ok: false; reason: string }>;
  /** Each accepted message is written as <outboxDir>/<seq>-<sanitised message-id>.eml. */
  outboxDir?: string;
  /** Default 127.0.0.1. */
  host?: string;
  /** Default 0 (any free port). */
  port?: number;
  /** Default true: MAIL FROM must equal the XOAUTH2 user (case-insensitive), refused after DATA. */
  enforceSendAs?: boolean;
  /**
   * Fault injection, asked at each phase ("auth" per login, "mail" and "data" once per transaction,
   * "rcpt" per recipient). `{reply, message}` sends that reply (421 also closes the connection, as
   * Exchange does). `{drop: true}` destroys the socket without a reply: at "mail" right away, at
   * "data" once part of the message has arrived, so the client sees the connection die mid-DATA and
   * cannot know whether the message was taken. At "data" only: `{storeThenDrop: true}` stores the
   * message, then drops the connection before the 250; `{delayMs}` holds the normal reply back. At
   * "data" the fault takes precedence over the SendAs check. Return undefined for normal behaviour.
   */
  fault?: (ctx: SmtpFault) => SmtpFaultAction | undefined;
  /** Default false: smtp-server logs every command to the console otherwise (AUTH lines redacted). */
  logger?: boolean;
}

export interface SmtpSinkStats {
  connections: number;
  tlsUpgrades: number;
  auths: number;
  authFailures: number;
  accepted: number;
  /** Refusals the sink chose (SendAs, recipient cap, faults incl. drops); not auth failures. */
  rejected: number;
  /** Connections that authenticated and are still open. */
  authenticatedNow: number;
  /** The most authenticated connections open at once (Exchange allows 3 per mailbox). */
  maxAuthenticatedAtOnce: number;
}

export interface SmtpSink {
  host: string;
  port: number;
  messages: SinkMessage[];
  stats: SmtpSinkStats;
  /** Resolves with all messages so far once at least `count` have been accepted. */
  waitForMessages(count: number, timeoutMs?: number): Promise<SinkMessage[]>;
  /** Returns the unsubscribe function. */
  onMessage(listener: (m: SinkMessage) => void): () => void;
  resetStats(): void;
  close(): Promise<void>;
}

export const MAX_RECIPIENTS_PER_MESSAGE = 500;

const SEND_AS_DENIED =
  "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAs; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.";

interface ConnectionState {
  connection: number;
  seq: number;
  authenticated?: boolean;
}

function smtpError(responseCode: number, message: string): SMTPServerError {
  return Object.assign(new Error(message), { responseCode });
}

function zeroStats(): SmtpSinkStats {
  return { connections: 0, tlsUpgrades: 0, auths: 0, authFailures: 0, accepted: 0, rejected: 0, authenticatedNow: 0, maxAuthenticatedAtOnce: 0 };
}

/** Header section only; RFC 5322 unfolding (drop the line break, keep the whitespace), names lower-cased. */
export function parseHeaders(raw: Buffer | string): Record<string, string[]> {
  const text = typeof raw === "string" ? raw : raw.subarray(0, headerEnd(raw)).toString("utf8");
  const end = typeof raw === "string" ? headerEnd(text) : text.length;
  // A Map, then fromEntries: a header named __proto__ must stay data, not reach the prototype.
  const headers = new Map<string, string[]>();
  let name: string | undefined;
  let value = "";
  const flush = () => {
    if (name === undefined) return;
    const list = headers.get(name) ?? [];
    list.push(value.trim());
    headers.set(name, list);
    name = undefined;
  };
  for (const line of text.slice(0, end).split(/\r?\n/)) {
    if (name !== undefined && /^[ \t]/.test(line)) {
      value += line;
      continue;
    }
    flush();
    const colon = line.indexOf(":");
    if (colon > 0) {
      name = line.slice(0, colon).trim().toLowerCase();
      value = line.slice(colon + 1);
    }
  }
  flush();
  return Object.fromEntries(headers);
}

function headerEnd(raw: Buffer | string): number {
  const ends = [raw.indexOf("\r\n\r\n"), raw.indexOf("\n\n")].filter((i) => i >= 0);
  return ends.length > 0 ? Math.min(...ends) : raw.length;
}

function fileSafe(messageId: string | undefined, fallback: string): string {
  const id = (messageId ?? "").replace(/^\s*<|>\s*$/g, "").replace(/[^A-Za-z0-9._@+-]/g, "_").slice(0, 120);
  return id.replace(/^\.+/, "") || fallback;
}

export async function startSmtpSink(options: SmtpSinkOptions): Promise<SmtpSink> {
  const enforceSendAs = options.enforceSendAs ?? true;
  const messages: SinkMessage[] = [];
  const stats = zeroStats();
  const listeners = new Set<(m: SinkMessage) => void>();
  const state = new WeakMap<SMTPServerSession, ConnectionState>();
  let connectionCounter = 0;
  let seqCounter = 0;

  const userOf = (session: SMTPServerSession): string => (typeof session.user === "string" ? session.user : "");
  const stateOf = (session: SMTPServerSession): ConnectionState => {
    let s = state.get(session);
    if (!s) state.set(session, (s = { connection: ++connectionCounter, seq: 0 }));
    return s;
  };
  const askFault = (phase: SmtpFault["phase"], session: SMTPServerSession, extra: { user?: string; address?: string } = {}): SmtpFaultAction | undefined => {
    const s = stateOf(session);
    return options.fault?.({ phase, seq: s.seq, session: { user: extra.user ?? userOf(session), connection: s.connection }, ...(extra.address === undefined ? {} : { address: extra.address }) });
  };
  const dropConnection = (session: SMTPServerSession) => {
    for (const connection of server.connections) {
      if (connection.id === session.id) connection._socket.destroy();
    }
  };

  const accept = async (session: SMTPServerSession, raw: Buffer): Promise<string> => {
    const headers = parseHeaders(raw);
    const seq = stateOf(session).seq;
    const queueId = randomBytes(8).toString("hex").toUpperCase();
    const message: SinkMessage = {
      seq,
      authUser: userOf(session),
      mailFrom: session.envelope.mailFrom ? session.envelope.mailFrom.address : "",
      rcptTo: session.envelope.rcptTo.map((r) => r.address),
      raw,
      headers,
      receivedAt: new Date(),
    };
    if (options.outboxDir) {
      // Written before the 250 so that a client which saw success can find the file.
      await mkdir(options.outboxDir, { recursive: true });
      message.file = join(options.outboxDir, `${seq}-${fileSafe(headers["message-id"]?.[0], queueId)}.eml`);
      await writeFile(message.file, raw);
    }
    messages.push(message);
    stats.accepted++;
    for (const listener of [...listeners]) listener(message);
    return `2.0.0 OK [Hostname=localhost] queued as ${queueId}`;
  };

  /** Resolves with the reply to send, or undefined when the connection was dropped (no reply). */
  const handleData = async (
    stream: SMTPServerDataStream,
    session: SMTPServerSession,
  ): Promise<{ error?: SMTPServerError; message?: string } | undefined> => {
    const fault = askFault("data", session);
    if (fault && "drop" in fault) {
      stats.rejected++;
      const drop = () => dropConnection(session);
      stream.once("data", drop);
      stream.once("end", drop);
      stream.on("error", () => {}); // the destroy below ends the stream with ECONNECTION
      return undefined;
    }
    const chunks: Buffer[] = [];
    try {
      for await (const chunk of stream) chunks.push(chunk as Buffer);
    } catch {
      return undefined; // client went away mid-DATA: nothing to answer
    }
    if (fault && "reply" in fault) {
      stats.rejected++;
      return { error: smtpError(fault.reply, fault.message) };
    }
    if (fault && "delayMs" in fault) await new Promise((resolve) => setTimeout(resolve, fault.delayMs));
    if (fault && "storeThenDrop" in fault) {
      // Taken, but the client never hears so: the case a sender cannot tell from a lost message.
      await accept(session, Buffer.concat(chunks));
      dropConnection(session);
      return undefined;
    }
    const from = session.envelope.mailFrom ? session.envelope.mailFrom.address : "";
    if (enforceSendAs && from.toLowerCase() !== userOf(session).toLowerCase()) {
      stats.rejected++;
      return { error: smtpError(554, SEND_AS_DENIED) };
    }
    return { message: await accept(session, Buffer.concat(chunks)) };
  };

  const server = new SMTPServer({
    secure: false,
    key: options.tls.key,
    cert: options.tls.cert,
    allowInsecureAuth: false,
    authOptional: false,
    authMethods: ["XOAUTH2"],
    authRequiredMessage: "5.7.57 Client not authenticated to send mail.",
    name: "localhost",
    banner: "queue-mailer SMTP sink (Exchange Online submission double)",
    disableReverseLookup: true,
    logger: options.logger ?? false,

    onConnect(session, callback) {
      stats.connections++;
      stateOf(session);
      callback();
    },
    onClose(session) {
      const connection = state.get(session);
      if (connection?.authenticated) {
        connection.authenticated = false;
        stats.authenticatedNow = Math.max(0, stats.authenticatedNow - 1);
      }
    },
    onSecure(_socket, _session, callback) {
      stats.tlsUpgrades++;
      callback();
    },
    onAuth(auth, session, callback) {
      const user = auth.username ?? "";
      // Never echo or log the token: the reply text is fixed, like Exchange's.
      const fail = (code: number, text: string) => {
        stats.authFailures++;
        callback(smtpError(code, text));
      };
      if (auth.method !== "XOAUTH2" || !auth.accessToken) return fail(535, "5.7.3 Authentication unsuccessful");
      const fault = askFault("auth", session, { user });
      if (fault && "reply" in fault) return fail(fault.reply, fault.message);
      options.verifyToken(user, auth.accessToken).then(
        (result) => {
          if (!result.ok) return fail(535, "5.7.3 Authentication unsuccessful");
          stats.auths++;
          const connection = stateOf(session);
          if (!connection.authenticated) {
            connection.authenticated = true;
            stats.authenticatedNow++;
            stats.maxAuthenticatedAtOnce = Math.max(stats.maxAuthenticatedAtOnce, stats.authenticatedNow);
          }
          callback(null, { user });
        },
        () => fail(454, "4.7.0 Temporary authentication failure"),
      );
    },
    onMailFrom(_address, session, callback) {
      stateOf(session).seq = ++seqCounter;
      const fault = askFault("mail", session);
      if (!fault || !("reply" in fault || "drop" in fault)) return callback();
      stats.rejected++;
      if ("drop" in fault) return dropConnection(session);
      callback(smtpError(fault.reply, fault.message));
    },
    onRcptTo(address, session, callback) {
      const rcpt = session.envelope.rcptTo;
      const known = (a: string) => rcpt.some((r) => r.address.toLowerCase() === a.toLowerCase());
      if (rcpt.length >= MAX_RECIPIENTS_PER_MESSAGE && !known(address.address)) {
        stats.rejected++;
        return callback(smtpError(452, "4.5.3 Too many recipients"));
      }
      const fault = askFault("rcpt", session, { address: address.address });
      if (fault && "reply" in fault) {
        stats.rejected++;
        return callback(smtpError(fault.reply, fault.message));
      }
      callback();
    },
    onData(stream, session, callback) {
      handleData(stream, session).then(
        (reply) => reply && callback(reply.error ?? null, reply.message),
        (err: unknown) => callback(smtpError(451, `4.3.0 Sink error: ${err instanceof Error ? err.message : String(err)}`)),
      );
    },
  });
  // Client resets mid-transaction surface as server 'error' events; without a listener they would
  // crash the test process.
  server.on("error", (err) => {
    if (options.logger) console.error("smtp sink:", err.message);
  });

  const host = options.host ?? "127.0.0.1";
  await new Promise<void>((resolve, reject) => {
    server.server.once("error", reject);
    server.listen(options.port ?? 0, host, () => {
      server.server.off("error", reject);
      resolve();
    });
  });
  const { port } = server.server.address() as AddressInfo;

  const onMessage = (listener: (m: SinkMessage) => void): (() => void) => {
    listeners.add(listener);
    return () => void listeners.delete(listener);
  };

  return {
    host,
    port,
    messages,
    stats,
    onMessage,
    waitForMessages(count, timeoutMs = 5_000) {
      if (messages.length >= count) return Promise.resolve([...messages]);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          unsubscribe();
          reject(
            new Error(
              `smtp sink: timed out after ${timeoutMs} ms waiting for ${count} message(s); ` +
                `${messages.length} accepted (stats ${JSON.stringify(stats)})`,
            ),
          );
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
      // Connections still open stay counted: the most at once starts from them.
      Object.assign(stats, zeroStats(), { authenticatedNow: stats.authenticatedNow, maxAuthenticatedAtOnce: stats.authenticatedNow });
    },
    close() {
      return new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const connection of server.connections) connection._socket.destroy();
      });
    },
  };
}
