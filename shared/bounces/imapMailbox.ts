// One IMAP session with the sending mailbox, for the bounce watch: implicit TLS (993), signed in
// with an OAuth access token (imapflow sends OAUTHBEARER where the server offers it, else XOAUTH2;
// Exchange Online offers XOAUTH2 only), and the few commands a pass needs. imapflow stays behind
// this file, and every failure leaves it as a MailerError with a stable code:
//   IMAP_AUTH_FAILED        the server refused the token (permission, consent, mailbox grant)   config
//   IMAP_CONNECTION_FAILED  no TLS conversation with IMAP_HOST:IMAP_PORT (DNS, refused, timeout) transient
//   IMAP_FOLDER_MISSING     BOUNCE_FOLDER does not exist                                         config
//   IMAP_COMMAND_FAILED     any other refusal or a dropped connection mid-pass                   transient
// Nothing here logs, and no error carries imapflow's command text: the AUTHENTICATE line holds the
// token (imapflow's own logger is off for the same reason).
import { ImapFlow, type FetchMessageObject } from "imapflow";
import { MailerError } from "../errors.js";

export interface ImapTarget {
  host: string;
  port: number;
  /** The mailbox signing in (XOAUTH2 `user=`). */
  user: string;
}

export interface FolderMessage {
  uid: number;
  size: number;
  internalDate: Date | undefined;
}

export interface OpenFolder {
  /** UIDVALIDITY, as text (a bigint): UIDs are only comparable while it stays the same. */
  uidValidity: string;
  /** Messages in the folder now. */
  exists: number;
}

export interface ImapSession {
  /** Selects `folder` read-write (MOVE needs it). */
  open(folder: string): Promise<OpenFolder>;
  /** The selected folder's messages with a UID above `afterUid`, oldest first. Fetches no content. */
  messagesAfter(afterUid: number): Promise<FolderMessage[]>;
  /**
   * One message as the server stores it, fetched with BODY.PEEK[] (imapflow's `source`), so it is
   * not marked \Seen. Undefined when it is gone (another client moved or deleted it).
   */
  source(uid: number): Promise<Buffer | undefined>;
  /** Creates `folder` unless it exists; true when it was created now. */
  ensureFolder(folder: string): Promise<boolean>;
  /** Moves one message of the selected folder; false when it was no longer there. */
  move(uid: number, folder: string): Promise<boolean>;
  /** Logs out (or drops the connection when that fails); never throws. */
  close(): Promise<void>;
}

export interface ImapSessionOptions {
  /** What to do about a refused login, for this deployment (names the permission and commands). */
  authHint: string;
  /** TCP connect and greeting, and any single response (default 30 s). */
  timeoutMs?: number;
}

/** What imapflow puts on its errors (errors.d.ts ImapFlowError); all optional. */
interface ImapFlowFailure {
  message?: string;
  code?: string;
  authenticationFailed?: boolean;
  tlsFailed?: boolean;
  mailboxMissing?: boolean;
  serverResponseCode?: string;
  responseText?: string;
  response?: unknown;
  responseStatus?: string;
}

const NETWORK_CODES = new Set(["ECONNREFUSED", "ECONNRESET", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "ETIMEDOUT", "EPIPE", "CONNECT_TIMEOUT", "GREETING_TIMEOUT", "ETIMEOUT", "NoConnection", "EConnectionClosed", "ClosedAfterConnectTLS", "ClosedAfterConnectText"]);

/** The server's words (NO/BAD text), trimmed; never a command we sent. */
function serverText(failure: ImapFlowFailure): string | undefined {
  const text = failure.responseText ?? (typeof failure.response === "string" ? failure.response : undefined);
  const trimmed = text?.replace(/\s+/g, " ").trim().slice(0, 500);
  return trimmed === "" ? undefined : trimmed;
}

/** Any imapflow (or socket) failure as a MailerError; `step` says what was being done. */
export function imapFailure(error: unknown, step: string, target: ImapTarget, authHint: string): MailerError {
  if (error instanceof MailerError) return error;
  const failure = (typeof error === "object" && error !== null ? error : { message: String(error) }) as ImapFlowFailure;
  const where = `${target.host}:${target.port}`;
  const reply = serverText(failure);
  const detail = `${failure.message ?? "failed"}${failure.code && !(failure.message ?? "").includes(failure.code) ? ` (${failure.code})` : ""}`;
  if (failure.authenticationFailed) {
    return new MailerError("IMAP_AUTH_FAILED", `IMAP ${where} refused the sign-in of ${target.user} with an OAuth token${reply ? `: ${reply}` : ""}`, {
      kind: "config",
      hint: authHint,
      ...(reply ? { response: reply } : {}),
      command: "AUTHENTICATE",
    });
  }
  if (failure.tlsFailed || /certificate|self[- ]signed|altname|SSL|TLS/i.test(failure.message ?? "") || NETWORK_CODES.has(failure.code ?? "") || (step === "connect" && !reply)) {
    return new MailerError("IMAP_CONNECTION_FAILED", `no IMAP conversation with ${where} (${step}): ${detail}`, {
      kind: "transient",
      hint: `Check IMAP_HOST and IMAP_PORT (outlook.office365.com:993 for Exchange Online, imap.gmail.com:993 for Gmail; implicit TLS, not STARTTLS) and that this machine may open TCP connections to ${where}. A certificate error means another host answered (a TLS-inspecting proxy) or a private CA that NODE_EXTRA_CA_CERTS must name. Nothing was read or moved; the next pass tries again.`,
      ...(reply ? { response: reply } : {}),
    });
  }
  if (failure.mailboxMissing || failure.serverResponseCode === "NONEXISTENT") {
    return new MailerError("IMAP_FOLDER_MISSING", `IMAP ${where}: the folder to ${step} does not exist in ${target.user}${reply ? ` (${reply})` : ""}`, {
      kind: "config",
      hint: "Set BOUNCE_FOLDER to an existing folder of the mailbox (default INBOX; names are case-sensitive except INBOX, and a subfolder is written with the server's delimiter, e.g. INBOX/Bounces).",
      ...(reply ? { response: reply } : {}),
    });
  }
  return new MailerError("IMAP_COMMAND_FAILED", `IMAP ${where}: ${step} failed: ${reply ?? detail}`, {
    kind: "transient",
    hint: "The server refused a command or dropped the connection during the pass. What was recorded stays recorded; messages not moved yet are read again by the next pass.",
    ...(reply ? { response: reply } : {}),
  });
}

/** Connects and signs in; rejects with IMAP_AUTH_FAILED, IMAP_CONNECTION_FAILED, … (see the top). */
export async function openImapSession(target: ImapTarget, accessToken: string, options: ImapSessionOptions): Promise<ImapSession> {
  const timeoutMs = options.timeoutMs ?? 30_000;
  const client = new ImapFlow({
    host: target.host,
    port: target.port,
    secure: true,
    auth: { user: target.user, accessToken },
    // imapflow's logger would write every command, the AUTHENTICATE one included.
    logger: false,
    // One pass, then logout: no IDLE between commands.
    disableAutoIdle: true,
    connectionTimeout: timeoutMs,
    greetingTimeout: timeoutMs,
    socketTimeout: Math.max(timeoutMs, 60_000),
  });
  // Without a listener an 'error' event (a dropped socket) would end the process; the command in
  // flight rejects with it anyway.
  client.on("error", () => undefined);
  const fail = (error: unknown, step: string) => imapFailure(error, step, target, options.authHint);
  try {
    await client.connect();
  } catch (error) {
    client.close();
    throw fail(error, "connect");
  }
  let selected = "";
  return {
    async open(folder) {
      try {
        const mailbox = await client.mailboxOpen(folder, { readOnly: false });
        selected = folder;
        return { uidValidity: String(mailbox.uidValidity), exists: mailbox.exists };
      } catch (error) {
        throw fail(error, `open ${folder}`);
      }
    },
    async messagesAfter(afterUid) {
      const found: FolderMessage[] = [];
      try {
        if (client.mailbox === false || client.mailbox.exists === 0) return found;
        // `N:*` also names the highest UID when it is below N (RFC 3501 6.4.8), hence the filter.
        for await (const message of client.fetch(`${afterUid + 1}:*`, { uid: true, size: true, internalDate: true }, { uid: true })) {
          if (message.uid > afterUid) found.push({ uid: message.uid, size: message.size ?? 0, internalDate: dateOf(message) });
        }
      } catch (error) {
        throw fail(error, `list the messages of ${selected}`);
      }
      return found.sort((a, b) => a.uid - b.uid);
    },
    async source(uid) {
      try {
        const message = await client.fetchOne(String(uid), { uid: true, source: true }, { uid: true });
        return message === false ? undefined : message.source;
      } catch (error) {
        throw fail(error, `read message UID ${uid} of ${selected}`);
      }
    },
    async ensureFolder(folder) {
      const exists = async () => (await client.list()).some((f) => f.path === folder || (folder.toUpperCase() === "INBOX" && f.path.toUpperCase() === "INBOX"));
      try {
        if (await exists()) return false;
        try {
          // imapflow subscribes a folder it creates (clients that show subscribed folders only
          // show it too) and answers created: false for ALREADYEXISTS.
          return (await client.mailboxCreate(folder)).created !== false;
        } catch (error) {
          // Another instance (or a person) created it meanwhile, on a server that says so without ALREADYEXISTS.
          if (await exists()) return false;
          throw error;
        }
      } catch (error) {
        throw fail(error, `create folder ${folder}`);
      }
    },
    async move(uid, folder) {
      try {
        // imapflow answers false instead of throwing when the server refuses MOVE (or its
        // COPY + EXPUNGE fallback): a message that is gone was moved by someone else, else it failed.
        if ((await client.messageMove(String(uid), folder, { uid: true })) !== false) return true;
        if ((await client.fetchOne(String(uid), { uid: true }, { uid: true })) === false) return false;
      } catch (error) {
        throw fail(error, `move message UID ${uid} to ${folder}`);
      }
      throw new MailerError("IMAP_COMMAND_FAILED", `IMAP ${target.host}:${target.port}: the server refused to move message UID ${uid} of ${selected} to ${folder}`, {
        kind: "transient",
        hint: `The mailbox must allow moving messages into ${folder} (BOUNCE_DONE_FOLDER). What was recorded stays recorded; the report is read again by the next pass.`,
        command: "UID MOVE",
      });
    },
    async close() {
      try {
        await client.logout();
      } catch {
        client.close();
      }
    },
  };
}

function dateOf(message: FetchMessageObject): Date | undefined {
  const value = message.internalDate;
  if (value === undefined) return undefined;
  const date = value instanceof Date ? value : new Date(value);
  return Number.isNaN(date.getTime()) ? undefined : date;
}
