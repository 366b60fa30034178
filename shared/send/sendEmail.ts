// Step 3 onwards, the send pipeline: ledger → suppression list → mailbox pause → daily recipient
// budget → rate limit → transport.send → ledger. The sender wires credential → token → transport
// once per process; everything is created on first use (no network in module scope).
import type { SendConfig } from "../config.js";
import { normalizeAddress, suppressionSnapshot, tableSuppressionList, type Suppression, type SuppressionList } from "../bounces/suppressionList.js";
import { credentialSourceFor } from "../auth/credentialSource.js";
import { MailerError, toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
import type { Mailbox } from "../message/address.js";
import type { EmailMessage } from "../message/schema.js";
import { TokenProvider } from "../token/tokenProvider.js";
import { createGraphTransport } from "../transport/graphTransport.js";
import { createSmtpTransport } from "../transport/smtpTransport.js";
import type { SendResult, Transport } from "../transport/transport.js";
import { tableConnectionSlots } from "./connectionSlots.js";
import { tableDailyRecipientBudget, type DailyRecipientBudget } from "./dailyRecipientBudget.js";
import { tableMailboxPause, type MailboxPause } from "./mailboxPause.js";
import { tableRateLimiter, type RatePermit, type RateLimiter } from "./rateLimiter.js";
import { tableSendLedger, type SendLedger } from "./sendLedger.js";

/** A recipient left out of a message because it is on the suppression list. */
export interface SuppressedRecipient {
  address: string;
  field: "to" | "cc" | "bcc";
  source: Suppression["source"];
  reason: string;
  /** The bounce's status code, for a bounce. */
  status?: string;
  /** When it was suppressed. */
  since: string;
}

export type SendOutcome =
  /** `suppressed`: recipients left out (the rest got the message); empty when none. */
  | { status: "sent"; result: SendResult; resentAfterUnknownOutcome: boolean; suppressed: SuppressedRecipient[] }
  /** The ledger shows it was sent already: acknowledge, do not send again. */
  | { status: "duplicate"; messageId: string; sentAt: string };

export interface Sender {
  /** `redelivery`: the queue handed this message out before (dequeue count above 1). */
  send(message: EmailMessage, redelivery: boolean): Promise<SendOutcome>;
  /** Prove the setup works without a message: a token, and an SMTP connection that authenticates. */
  probe(): Promise<void>;
  readonly tokens: TokenProvider;
  close(): Promise<void>;
}

export interface SenderParts {
  transport?: Transport;
  rateLimiter?: RateLimiter;
  ledger?: SendLedger | null;
  /** The mailbox's pause after a server throttled it (shared by all instances). */
  pause?: MailboxPause;
  /** Recipients per mailbox per 24 h (shared by all instances). */
  recipientBudget?: DailyRecipientBudget;
  /** Addresses not to send to (shared by all instances); null: no check (SUPPRESSION_CHECK=false). */
  suppressions?: SuppressionList | null;
}

/** Failures after which the server may have taken the message anyway (the answer was lost). */
const outcomeUnknownCodes = new Set(["SMTP_CONNECTION_FAILED", "GRAPH_CONNECTION_FAILED"]);

export function createSender(config: SendConfig, logger: Logger, parts: SenderParts = {}): Sender {
  const credential = credentialSourceFor(config.auth, logger);
  const tokens = new TokenProvider({ credential, logger });
  // The per-mailbox limits hold across instances: both live in Table storage.
  const mailboxPause = parts.pause ?? tableMailboxPause(config.storage, config.smtp.user);
  const transport = parts.transport ?? transportFor(config, tokens, logger, mailboxPause);
  const rateLimiter = parts.rateLimiter ?? tableRateLimiter(config.storage, config.smtp.user, config.smtp.ratePerMinute, { windowMs: config.smtp.rateWindowSeconds * 1000 });
  const ledger = parts.ledger === undefined ? (config.messages.sendLedger ? tableSendLedger(config.storage) : null) : parts.ledger;
  const mailbox = config.smtp.user;
  const pause = mailboxPause;
  const recipientBudget = parts.recipientBudget ?? tableDailyRecipientBudget(config.storage, mailbox, config.dailyRecipientLimit);
  const suppressions = parts.suppressions === undefined ? (config.messages.suppressionCheck !== false ? suppressionsToCheck(config, logger) : null) : parts.suppressions;
  // `limits.daily_recipients_reached` is logged once per exhaustion: not again before the room
  // that report named has freed.
  let dailyLimitQuietUntil = 0;

  async function throwIfPaused(): Promise<void> {
    const pausedMs = await pause.pausedForMs();
    if (pausedMs <= 0) return;
    throw new MailerError("MAILBOX_PAUSED", `${mailbox} is paused for another ${Math.ceil(pausedMs / 1000)} s: the server throttled it`, {
      kind: "deferred",
      retryAfterSeconds: Math.ceil(pausedMs / 1000),
      hint: "The server asked this mailbox to slow down (Graph 429, or 503/504 with Retry-After); every instance holds its mail until then. If it recurs, lower GRAPH_MAX_CONCURRENCY or SEND_RATE_PER_MINUTE, or spread mail over more mailboxes.",
    });
  }

  /**
   * The message without its suppressed recipients (envelope and headers both come from to/cc/bcc),
   * or RECIPIENT_SUPPRESSED when that leaves nobody. One lookup for all recipients.
   */
  async function withoutSuppressed(list: SuppressionList, message: EmailMessage): Promise<{ message: EmailMessage; suppressed: SuppressedRecipient[] }> {
    const fields = [["to", message.to], ["cc", message.cc], ["bcc", message.bcc]] as const;
    const found = await list.lookup(fields.flatMap(([, mailboxes]) => mailboxes.map((m) => m.address)));
    if (found.size === 0) return { message, suppressed: [] };
    const entryFor = (m: Mailbox) => found.get(normalizeAddress(m.address));
    const suppressed: SuppressedRecipient[] = fields.flatMap(([field, mailboxes]) =>
      mailboxes.flatMap((m) => {
        const entry = entryFor(m);
        return entry === undefined ? [] : [{ address: m.address, field, source: entry.source, reason: entry.reason, ...(entry.status === undefined ? {} : { status: entry.status }), since: entry.at }];
      }),
    );
    const kept = { to: message.to.filter((m) => !entryFor(m)), cc: message.cc.filter((m) => !entryFor(m)), bcc: message.bcc.filter((m) => !entryFor(m)) };
    if (kept.to.length + kept.cc.length + kept.bcc.length === 0) {
      const who = suppressed.map((r) => `${r.address} (${r.source}: ${r.reason.slice(0, 200)})`).join("; ");
      throw new MailerError("RECIPIENT_SUPPRESSED", `every recipient of message ${JSON.stringify(message.id)} is on the suppression list: ${who}`.slice(0, 2000), {
        kind: "permanent",
        hint: "These addresses bounced or were suppressed by hand; nothing was sent. `queue-mailer suppression list` shows why; `queue-mailer suppression remove ADDRESS` once an address works again, then `queue-mailer poison requeue --id ID`.",
      });
    }
    logger.log("warn", "message.recipients_suppressed", { id: message.id, suppressed, remaining: kept.to.length + kept.cc.length + kept.bcc.length, note: "left out of envelope and headers; the others get the message" });
    return { message: { ...message, ...kept }, suppressed };
  }

  return {
    tokens,
    async send(original, redelivery) {
      let message = original;
      const decision = ledger ? await ledger.begin(message.id, redelivery) : ({ state: "go", previousOutcomeUnknown: false } as const);
      if (decision.state === "sent") return { status: "duplicate", messageId: decision.messageId, sentAt: decision.sentAt };
      // Pause → daily budget → rate slot → send. The cheap refusals come first, so a paused or
      // spent mailbox takes neither budget nor a rate slot.
      let reservation: { release(): Promise<void> } | undefined;
      let permit: RatePermit | undefined;
      let handedToTransport = false;
      let result: SendResult;
      let suppressed: SuppressedRecipient[] = [];
      try {
        // First: a message nobody may receive takes no budget and no rate slot, and waits for nothing.
        if (suppressions) ({ message, suppressed } = await withoutSuppressed(suppressions, message));
        await throwIfPaused();
        const recipients = message.to.length + message.cc.length + message.bcc.length;
        const budget = await recipientBudget.reserve(recipients);
        if (!budget.ok) {
          if (Date.now() >= dailyLimitQuietUntil) {
            dailyLimitQuietUntil = budget.freesAt.getTime();
            logger.log("warn", "limits.daily_recipients_reached", { mailbox, limit: recipientBudget.limit, used: budget.used, recipients, freesAt: budget.freesAt.toISOString(), note: "messages wait in the queue until the 24 h window has room; nothing is poisoned" });
          }
          throw new MailerError("DAILY_RECIPIENT_LIMIT", `${mailbox} has sent to ${budget.used} of ${recipientBudget.limit} recipients in 24 h; this message has ${recipients}: it waits until ${budget.freesAt.toISOString()}`, {
            kind: "deferred",
            retryAfterSeconds: budget.retryAfterSeconds,
            hint: "DAILY_RECIPIENT_LIMIT keeps the mailbox under the server's daily cap (Exchange Online: 10,000 recipients per 24 h, after which it blocks the mailbox for up to a day). Spread mail over more mailboxes if this is routine.",
          });
        }
        reservation = budget;
        permit = await rateLimiter.acquire();
        // Waiting for a rate slot may have outlasted the check above.
        await throwIfPaused();
        // Said here, not at the ledger read: a message that waits (paused, budget spent) is not resent yet.
        if (decision.previousOutcomeUnknown) {
          logger.log("warn", "message.resend_unknown_outcome", { id: message.id, note: "a previous attempt may have been delivered; resending with the same Message-ID" });
        }
        handedToTransport = true;
        result = await transport.send(message);
      } catch (error) {
        permit?.release();
        const failure = toMailerError(error);
        // A lost connection may have happened after the server took the message: then it stays
        // counted in the budget (the server counted it too) and the ledger says "unknown".
        const outcomeUnknown = handedToTransport && outcomeUnknownCodes.has(failure.code);
        if (handedToTransport && failure.kind === "deferred" && (failure.retryAfterSeconds ?? 0) > 0) {
          // The server throttles the mailbox, not this message: hold every instance's sends. First
          // thing, so that this process knows before it awaits anything else.
          const until = new Date(Date.now() + (failure.retryAfterSeconds ?? 0) * 1000);
          const extended = await pause.pauseUntil(until, failure.code).catch((e: unknown) => {
            logger.log("warn", "limits.pause_write_failed", { mailbox, code: failure.code, error: (e as Error).message, note: "this instance pauses; others may not know" });
            return false;
          });
          if (extended) logger.log("warn", "limits.mailbox_paused", { mailbox, code: failure.code, until: until.toISOString(), seconds: failure.retryAfterSeconds });
        }
        if (!outcomeUnknown) await reservation?.release().catch((e: unknown) => logger.log("warn", "limits.budget_release_failed", { id: message.id, error: (e as Error).message }));
        // An earlier attempt's "may have been delivered" stands until a send succeeds.
        await ledger?.fail(message.id, failure.code, outcomeUnknown || decision.previousOutcomeUnknown);
        throw failure;
      }
      permit.release();
      try {
        await ledger?.complete(message.id, { ...result, suppressed: suppressed.map((r) => r.address) });
      } catch (error) {
        // Sent, but not recorded: a redelivery would send again (same Message-ID). Say so.
        logger.log("error", "ledger.write_failed", { id: message.id, error: (error as Error).message });
      }
      return { status: "sent", result, resentAfterUnknownOutcome: decision.previousOutcomeUnknown, suppressed };
    },
    async probe() {
      // A fresh token: the cached one may be what the server refused.
      await tokens.renew();
      await transport.verify();
    },
    close: () => transport.close(),
  };
}

/** The suppression list as the sender reads it: in memory, read again every SUPPRESSION_REFRESH_SECONDS. */
function suppressionsToCheck(config: SendConfig, logger: Logger): SuppressionList {
  const table = tableSuppressionList(config.storage, logger);
  const refreshSeconds = config.messages.suppressionRefreshSeconds ?? 60;
  return refreshSeconds > 0 ? suppressionSnapshot(table, refreshSeconds * 1000, logger) : table;
}

/**
 * TRANSPORT picks how messages leave. Either way the per-mailbox concurrency is a leased slot in
 * Table storage: SMTP connections (Exchange allows 3), or Graph requests (Graph allows 4), each in
 * a partition of its own.
 */
function transportFor(config: SendConfig, tokens: TokenProvider, logger: Logger, pause: MailboxPause): Transport {
  const mailbox = config.smtp.user;
  if (config.transport === "graph") {
    // The pause goes in too: sends already past the pipeline's check (waiting for a slot or a
    // token) must not fire into a throttled mailbox.
    return createGraphTransport(config.graph, mailbox, tokens, logger, { concurrency: tableConnectionSlots(config.storage, `graph:${mailbox}`, config.graph.maxConcurrency), pause });
  }
  return createSmtpTransport(config.smtp, tokens, logger, { connectionSlots: tableConnectionSlots(config.storage, mailbox, config.smtp.maxConnections) });
}
