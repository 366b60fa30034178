// The bounce watch: one pass over the sending mailbox's BOUNCE_FOLDER. Shared by the `bounceWatch`
// timer function and `queue-mailer bounces`; the parts are elsewhere:
//   imapMailbox.ts        the IMAP session (XOAUTH2 with a token from our credential machinery)
//   parseBounce.ts        is this message a delivery status notification, and for what
//   sendLedger.ts         which of our sends a Message-ID belongs to
//   suppressionList.ts    record the bounce (idempotent), suppress the address
//   bounceWatchState.ts   one pass per mailbox at a time; where the last pass stopped
//
// Per message, newer than the checkpoint, oldest first (fetched with BODY.PEEK: nothing is marked \Seen):
//   a bounce for one of our sends   each failed or delayed recipient recorded, then the report is
//                                   moved to BOUNCE_DONE_FOLDER (created on first use)
//   a bounce for a send we never    `bounce.unmatched`, nothing recorded (a forged report cannot
//   made (or naming none)           suppress anyone), left in the folder: it may be a person's own
//                                   mail in a shared mailbox, or sent before the ledger indexed it
//   a malformed report              `bounce.malformed` with the reason, left in the folder
//   anything else                   left alone
// A failure (IMAP, token, storage) ends the pass with `bounces.failed`: what was recorded stays
// recorded, what was not moved is read again next time (recording it again changes nothing), and the
// checkpoint only moves past messages that were finished with.
import { loadBounceConfig, type AuthConfig, type BounceConfig, type Env } from "../config.js";
import { credentialSourceFor } from "../auth/credentialSource.js";
import { MailerError } from "../errors.js";
import type { Logger, LogLevel, LogFields } from "../log.js";
import { deliveryEventRecorder, type DeliveryEventRecorder } from "../events/deliveryEvents.js";
import { sentMessageIndex } from "../send/sendLedger.js";
import { TokenProvider } from "../token/tokenProvider.js";
import { tableBounceWatchState, type BounceWatchState, type Checkpoint } from "./bounceWatchState.js";
import { openImapSession, type ImapSession, type ImapTarget } from "./imapMailbox.js";
import { BOUNCE_MALFORMED, parseBounce, type BounceFormat, type BounceReport } from "./parseBounce.js";
import { bounceEventsOf, tableSuppressionList, type SuppressionList } from "./suppressionList.js";

/** Messages examined per pass at most; the rest wait for the next pass (the checkpoint says where). */
export const MAX_MESSAGES_PER_PASS = 500;
/** Larger messages are not read as reports (a report quotes at most the original's headers, or one message). */
export const MAX_REPORT_BYTES = 50 * 1024 * 1024;

export interface RecipientOutcome {
  address: string;
  status: string;
  kind: "hard" | "soft";
  action: "failed" | "delayed";
  /** On the suppression list now (by this report or before). */
  suppressed: boolean;
  /** This report put it there. */
  newlySuppressed: boolean;
  /** The report was recorded before (read again after an interrupted pass). */
  duplicate: boolean;
  softBounces?: number;
}

export interface ReportOutcome {
  uid: number;
  reportMessageId: string | undefined;
  format: BounceFormat;
  /** The bounced message's Message-ID as the report names it. */
  originalMessageId: string | undefined;
  /** recorded: matched to our send, recorded and moved; unmatched: left in the folder, nothing recorded. */
  outcome: "recorded" | "unmatched";
  /** Our message id (recorded only). */
  id?: string;
  /** Where the report went (recorded only). */
  movedTo?: string;
  recipients: Array<Pick<RecipientOutcome, "address" | "status" | "kind" | "action"> & Partial<RecipientOutcome>>;
}

export interface MalformedReport {
  uid: number;
  reportMessageId?: string;
  code: string;
  reason: string;
}

export interface BouncePassResult {
  mailbox: string;
  server: string;
  folder: string;
  doneFolder: string;
  /** Set when another instance held the mailbox's lease: nothing was read. */
  skipped?: string;
  /** Messages newer than the last pass that this pass looked at. */
  examined: number;
  reports: ReportOutcome[];
  malformed: MalformedReport[];
  /** Messages that are not bounce reports (left alone). */
  notBounces: number;
  /** Addresses this pass put on the suppression list. */
  suppressed: string[];
  /** More messages are waiting than one pass examines (MAX_MESSAGES_PER_PASS). */
  more: boolean;
}

export interface BouncePassOptions {
  /** How long to wait for another instance's pass to end (default 0: skip this pass). */
  leaseWaitMs?: number;
  /** Default MAX_MESSAGES_PER_PASS. */
  maxMessages?: number;
}

/** The bounce watch of one mailbox; keep one per process so the token is reused between passes. */
export interface BounceWatch {
  readonly config: BounceConfig;
  /** One pass. Rejects with a MailerError (logged as `bounces.failed`) when the pass could not finish. */
  run(logger: Logger, options?: BouncePassOptions): Promise<BouncePassResult>;
}

export interface BounceWatchParts {
  tokens?: TokenProvider;
  state?: BounceWatchState;
  suppressions?: SuppressionList;
  sent?: { find(messageId: string): Promise<{ id: string; messageId: string; sentAt: string } | undefined> };
  /** IMAP timeouts (default 30 s). */
  imapTimeoutMs?: number;
}

/** What to do about a refused IMAP sign-in, for this deployment's auth method. See docs/bounces.md. */
export function imapAuthHint(auth: AuthConfig, mailbox: string): string {
  const see = "See docs/bounces.md; or set BOUNCES_ENABLED=false to turn the bounce watch off.";
  if (auth.method === "google-service-account") {
    return `Gmail refused the service account's token for ${mailbox}. Domain-wide delegation must include the scope https://mail.google.com/ (Google Admin console > Security > Access and data control > API controls > Manage Domain Wide Delegation), IMAP_SCOPE must be https://mail.google.com/, and IMAP access must be allowed for the user (Admin console > Apps > Google Workspace > Gmail > End User Access > POP and IMAP access). ${see}`;
  }
  const clientId = "clientId" in auth ? auth.clientId : "<CLIENT_ID>";
  const app = `Entra admin center > App registrations > ${clientId} > API permissions > Add a permission > APIs my organization uses > Office 365 Exchange Online`;
  const imapOn = `IMAP must be on for the mailbox: Set-CASMailbox -Identity "${mailbox}" -ImapEnabled $true.`;
  if (auth.method === "password" || auth.method === "refresh-token") {
    const again = auth.method === "refresh-token"
      ? ` Then sign in again so the stored grant covers it: TOKEN_SCOPE="https://outlook.office365.com/SMTP.Send https://outlook.office365.com/IMAP.AccessAsUser.All offline_access" queue-mailer authorize (as ${mailbox}).`
      : "";
    return `Exchange Online refused the user's token for ${mailbox}. IMAP_SCOPE (${auth.scope}) must ask for https://outlook.office365.com/IMAP.AccessAsUser.All, consented: ${app} > Delegated permissions > IMAP.AccessAsUser.All, then "Grant admin consent".${again} The token must be ${mailbox}'s own. ${imapOn} ${see}`;
  }
  return [
    `Exchange Online refused the app's token for ${mailbox}. The app needs:`,
    `  1. the application permission IMAP.AccessAsApp: ${app} > Application permissions > IMAP.AccessAsApp, then "Grant admin consent" (IMAP_SCOPE stays https://outlook.office365.com/.default);`,
    `  2. its service principal registered in Exchange Online and given the mailbox (Exchange Online PowerShell, Connect-ExchangeOnline):`,
    `       New-ServicePrincipal -AppId ${clientId} -ObjectId <object id of the enterprise application>`,
    `       Add-MailboxPermission -Identity "${mailbox}" -User <object id of the enterprise application> -AccessRights FullAccess`,
    `  (the object id is the enterprise application's: Entra admin center > Enterprise applications > the app > Object ID). ${imapOn} Changes can take up to an hour. ${see}`,
  ].join("\n");
}

/**
 * A bounce watch over `config`. The token provider asks for IMAP_SCOPE with the sender's own
 * credential (certificate, secret, Google key, password or refresh token).
 */
export function createBounceWatch(config: BounceConfig, parts: BounceWatchParts = {}): BounceWatch {
  // The token provider outlives passes (its token is reused until shortly before it expires); its
  // log lines go to the logger of the pass that is running.
  let passLogger: Logger = { log() {} };
  const forwarding: Logger = { log: (level: LogLevel, event: string, fields?: LogFields) => passLogger.log(level, event, fields) };
  const tokens = parts.tokens ?? new TokenProvider({ credential: credentialSourceFor(config.auth, forwarding), logger: forwarding });
  const state = parts.state ?? tableBounceWatchState(config.storage, config.imap);
  const sent = parts.sent ?? sentMessageIndex(config.storage);
  const target: ImapTarget = { host: config.imap.host, port: config.imap.port, user: config.imap.user };
  const authHint = imapAuthHint(config.auth, config.imap.user);

  /** Signs in; a refused cached token is renewed once (it may have been revoked since it was issued). */
  async function signIn(): Promise<ImapSession> {
    const requestsBefore = tokens.stats.requests;
    const first = await tokens.getToken();
    const fresh = tokens.stats.requests > requestsBefore;
    try {
      return await openImapSession(target, first.token, { authHint, ...(parts.imapTimeoutMs === undefined ? {} : { timeoutMs: parts.imapTimeoutMs }) });
    } catch (error) {
      if (fresh || !(error instanceof MailerError) || error.code !== "IMAP_AUTH_FAILED") throw error;
      const renewed = await tokens.renew();
      return openImapSession(target, renewed.token, { authHint, ...(parts.imapTimeoutMs === undefined ? {} : { timeoutMs: parts.imapTimeoutMs }) });
    }
  }

  return {
    config,
    async run(logger, options = {}) {
      passLogger = logger;
      const suppressions = parts.suppressions ?? tableSuppressionList(config.storage, logger, { softBounceLimit: config.softBounceLimit });
      const where = { mailbox: config.imap.user, server: `${config.imap.host}:${config.imap.port}`, folder: config.folder };
      const result: BouncePassResult = { ...where, doneFolder: config.doneFolder, examined: 0, reports: [], malformed: [], notBounces: 0, suppressed: [], more: false };
      try {
        const lease = await storageStep("take the bounce watch lease", () => state.acquire(options.leaseWaitMs ?? 0));
        if (lease === undefined) {
          result.skipped = "another instance is reading this mailbox now";
          logger.log("info", "bounces.skipped", { ...where, reason: result.skipped });
          return result;
        }
        // A bounce joins the message's history (`queue-mailer status ID`, EVENTS_QUEUE) like its other outcomes.
        const events = deliveryEventRecorder(config.storage, logger);
        try {
          await pass(logger, suppressions, events, result, options.maxMessages ?? MAX_MESSAGES_PER_PASS);
        } finally {
          await events.settled();
          await lease.release();
        }
      } catch (error) {
        const failure = error instanceof MailerError ? error : new MailerError("BOUNCES_UNEXPECTED", (error as Error).message ?? String(error), { kind: "transient", cause: error });
        logger.log("error", "bounces.failed", { ...where, examined: result.examined, recorded: result.reports.filter((r) => r.outcome === "recorded").length, error: failure.toJSON() });
        throw failure;
      }
      logger.log("info", "bounces.checked", {
        ...where,
        examined: result.examined,
        recorded: result.reports.filter((r) => r.outcome === "recorded").length,
        unmatched: result.reports.filter((r) => r.outcome === "unmatched").length,
        malformed: result.malformed.length,
        notBounces: result.notBounces,
        suppressed: result.suppressed,
        more: result.more,
      });
      return result;
    },
  };

  async function pass(logger: Logger, suppressions: SuppressionList, events: DeliveryEventRecorder, result: BouncePassResult, maxMessages: number): Promise<void> {
    const previous = await storageStep("read the bounce watch checkpoint", () => state.checkpoint(config.folder));
    const session = await signIn();
    let checkpoint: Checkpoint | undefined;
    let saved = previous;
    try {
      const folder = await session.open(config.folder);
      // A new UIDVALIDITY renumbered the folder: start over (recording is idempotent).
      const afterUid = previous !== undefined && previous.uidValidity === folder.uidValidity ? previous.lastUid : 0;
      checkpoint = { uidValidity: folder.uidValidity, lastUid: afterUid };
      const waiting = await session.messagesAfter(afterUid);
      result.more = waiting.length > maxMessages;
      let doneFolderReady = false;
      for (const message of waiting.slice(0, maxMessages)) {
        result.examined += 1;
        const here = { uid: message.uid, folder: config.folder, mailbox: config.imap.user };
        if (message.size > MAX_REPORT_BYTES) {
          result.notBounces += 1;
          logger.log("info", "bounce.not_a_report", { ...here, reason: `${message.size} bytes: larger than a bounce report (${MAX_REPORT_BYTES}); not read` });
          checkpoint.lastUid = message.uid;
          continue;
        }
        const source = await session.source(message.uid);
        if (source === undefined) {
          // Moved or deleted by someone else since the list was taken.
          checkpoint.lastUid = message.uid;
          continue;
        }
        let report: BounceReport;
        try {
          const parsed = await parseBounce(source, message.internalDate ? { receivedAt: message.internalDate } : {});
          if (!parsed.bounce) {
            result.notBounces += 1;
            logger.log("debug", "bounce.not_a_report", { ...here, reason: parsed.reason });
            checkpoint.lastUid = message.uid;
            continue;
          }
          report = parsed.report;
        } catch (error) {
          // A report that says it is one but cannot be read (or that breaks the parser): an operator
          // looks at it. The reason names the report; its content stays out of the log.
          const code = error instanceof MailerError ? error.code : BOUNCE_MALFORMED;
          const reason = (error as Error).message ?? String(error);
          const reportMessageId = messageIdHeaderOf(source);
          result.malformed.push({ uid: message.uid, ...(reportMessageId ? { reportMessageId } : {}), code, reason });
          logger.log("warn", "bounce.malformed", { ...here, reportMessageId, code, reason, note: `left in ${config.folder}; nothing recorded` });
          checkpoint.lastUid = message.uid;
          continue;
        }

        const original = report.originalMessageId === undefined ? undefined : await storageStep("look the bounced Message-ID up in the send ledger", () => sent.find(report.originalMessageId ?? ""));
        const described = { uid: message.uid, reportMessageId: report.reportMessageId, format: report.format, originalMessageId: report.originalMessageId };
        const listed = report.recipients.map((r) => ({ address: r.address, status: r.status, kind: r.kind, action: r.action }));
        if (original === undefined) {
          result.reports.push({ ...described, outcome: "unmatched", recipients: listed });
          logger.log("warn", "bounce.unmatched", {
            ...here,
            ...described,
            recipients: listed,
            reason: report.originalMessageId === undefined ? "the report names no original Message-ID" : "the send ledger has no send with this Message-ID (not sent by queue-mailer, sent with SEND_LEDGER=false or before the ledger indexed Message-IDs, or a forged report)",
            note: `nothing recorded; left in ${config.folder}`,
          });
          checkpoint.lastUid = message.uid;
          continue;
        }

        const recipients: RecipientOutcome[] = [];
        for (const event of bounceEventsOf(report, { messageId: original.messageId, id: original.id })) {
          const recorded = await storageStep("record the bounce", () => suppressions.recordBounce(event));
          recipients.push({
            address: recorded.address,
            status: event.status,
            kind: event.kind,
            action: event.action ?? (event.kind === "hard" ? "failed" : "delayed"),
            suppressed: recorded.suppressed,
            newlySuppressed: recorded.newlySuppressed,
            duplicate: recorded.duplicate,
            ...(recorded.softBounces === undefined ? {} : { softBounces: recorded.softBounces }),
          });
          if (recorded.newlySuppressed) result.suppressed.push(recorded.address);
          if (!recorded.duplicate) {
            events.record({
              type: "queue-mailer.delivery",
              version: 1,
              id: original.id,
              event: "bounced",
              at: new Date().toISOString(), // when we learnt it: the report's own date may be off, or before a resend
              attempt: 0,
              queueMessageId: "",
              messageId: original.messageId,
              recipient: recorded.address,
              code: event.status,
              reason: (event.diagnostic ?? `${event.kind} bounce (${event.action ?? (event.kind === "hard" ? "failed" : "delayed")})`).slice(0, 1000),
              ...(recorded.newlySuppressed ? { suppressed: [recorded.address] } : {}),
            });
          }
        }
        if (!doneFolderReady) {
          if (await session.ensureFolder(config.doneFolder)) logger.log("info", "bounces.folder_created", { mailbox: config.imap.user, folder: config.doneFolder });
          doneFolderReady = true;
        }
        await session.move(message.uid, config.doneFolder);
        result.reports.push({ ...described, outcome: "recorded", id: original.id, movedTo: config.doneFolder, recipients });
        logger.log("info", "bounce.processed", { ...here, ...described, id: original.id, recipients: recipients.map(({ address, status, kind, suppressed }) => ({ address, status, kind, suppressed })), movedTo: config.doneFolder });
        checkpoint.lastUid = message.uid;
      }
    } finally {
      // Only as far as messages were finished with; a failed one is read again next time.
      if (checkpoint !== undefined && (saved === undefined || saved.uidValidity !== checkpoint.uidValidity || saved.lastUid !== checkpoint.lastUid)) {
        const toSave = checkpoint;
        await state.saveCheckpoint(config.folder, toSave).then(
          () => (saved = toSave),
          (error: unknown) => logger.log("warn", "bounces.checkpoint_not_saved", { mailbox: config.imap.user, folder: config.folder, error: (error as Error).message, note: "the next pass reads these messages again; recording is idempotent" }),
        );
      }
      await session.close();
    }
  }
}

/** Table storage failures as one code, with where they happened. */
async function storageStep<T>(what: string, step: () => Promise<T>): Promise<T> {
  try {
    return await step();
  } catch (error) {
    if (error instanceof MailerError) throw error;
    throw new MailerError("BOUNCE_STORAGE_FAILED", `bounce watch: could not ${what}: ${(error as Error).message ?? String(error)}`, {
      kind: "transient",
      hint: "The storage account's Table service must be reachable (AzureWebJobsStorage, or AzureWebJobsStorage__tableServiceUri with the Storage Table Data Contributor role). Nothing was lost: the report stays in the folder and is read again by the next pass.",
      cause: error,
    });
  }
}

/** The report's own Message-ID from its header block, for a log line about a report that cannot be parsed. */
function messageIdHeaderOf(source: Buffer): string | undefined {
  const text = source.subarray(0, 64 * 1024).toString("latin1");
  const end = text.search(/\r?\n\r?\n/);
  const headers = (end < 0 ? text : text.slice(0, end)).replace(/\r?\n[ \t]+/g, " ");
  return /^message-id:\s*(<[^<>\s]{1,500}>)/im.exec(headers)?.[1];
}

let processWatch: BounceWatch | undefined;

/** The bounce watch of this process, for the timer function (settings are read once per process). */
export function processWideBounceWatch(env: Env): BounceWatch {
  processWatch ??= createBounceWatch(loadBounceConfig(env));
  return processWatch;
}
