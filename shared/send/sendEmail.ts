// Step 3 onwards, the send pipeline: ledger → mailbox pause → daily recipient budget → rate limit
// → transport.send → ledger. The sender wires credential → token → transport once per process;
// everything is created on first use (no network in module scope).
import type { SendConfig } from "../config.js";
import { credentialSourceFor } from "../auth/credentialSource.js";
import { MailerError, toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
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

export type SendOutcome =
  | { status: "sent"; result: SendResult; resentAfterUnknownOutcome: boolean }
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

  return {
    tokens,
    async send(message, redelivery) {
      const decision = ledger ? await ledger.begin(message.id, redelivery) : ({ state: "go", previousOutcomeUnknown: false } as const);
      if (decision.state === "sent") return { status: "duplicate", messageId: decision.messageId, sentAt: decision.sentAt };
      // Pause → daily budget → rate slot → send. The cheap refusals come first, so a paused or
      // spent mailbox takes neither budget nor a rate slot.
      let reservation: { release(): Promise<void> } | undefined;
      let permit: RatePermit | undefined;
      let handedToTransport = false;
      let result: SendResult;
      try {
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
        await ledger?.complete(message.id, result);
      } catch (error) {
        // Sent, but not recorded: a redelivery would send again (same Message-ID). Say so.
        logger.log("error", "ledger.write_failed", { id: message.id, error: (error as Error).message });
      }
      return { status: "sent", result, resentAfterUnknownOutcome: decision.previousOutcomeUnknown };
    },
    async probe() {
      // A fresh token: the cached one may be what the server refused.
      await tokens.renew();
      await transport.verify();
    },
    close: () => transport.close(),
  };
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
