// Step 3 onwards, the send pipeline: ledger → rate limit → transport.send → ledger. The sender
// wires credential → token → transport once per process; everything is created on first use (no
// network in module scope).
import type { SendConfig } from "../config.js";
import { credentialSourceFor } from "../auth/credentialSource.js";
import { toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
import type { EmailMessage } from "../message/schema.js";
import { TokenProvider } from "../token/tokenProvider.js";
import { createSmtpTransport } from "../transport/smtpTransport.js";
import type { SendResult, Transport } from "../transport/transport.js";
import { tableConnectionSlots } from "./connectionSlots.js";
import { tableRateLimiter, type RateLimiter } from "./rateLimiter.js";
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
}

export function createSender(config: SendConfig, logger: Logger, parts: SenderParts = {}): Sender {
  const credential = credentialSourceFor(config.auth, logger);
  const tokens = new TokenProvider({ credential, logger });
  // The per-mailbox limits hold across instances: both live in Table storage.
  const transport = parts.transport ?? createSmtpTransport(config.smtp, tokens, logger, { connectionSlots: tableConnectionSlots(config.storage, config.smtp.user, config.smtp.maxConnections) });
  const rateLimiter = parts.rateLimiter ?? tableRateLimiter(config.storage, config.smtp.user, config.smtp.ratePerMinute, { windowMs: config.smtp.rateWindowSeconds * 1000 });
  const ledger = parts.ledger === undefined ? (config.messages.sendLedger ? tableSendLedger(config.storage) : null) : parts.ledger;

  return {
    tokens,
    async send(message, redelivery) {
      const decision = ledger ? await ledger.begin(message.id, redelivery) : ({ state: "go", previousOutcomeUnknown: false } as const);
      if (decision.state === "sent") return { status: "duplicate", messageId: decision.messageId, sentAt: decision.sentAt };
      if (decision.previousOutcomeUnknown) {
        logger.log("warn", "message.resend_unknown_outcome", { id: message.id, note: "a previous attempt may have been delivered; resending with the same Message-ID" });
      }
      const permit = await rateLimiter.acquire();
      let result: SendResult;
      try {
        result = await transport.send(message);
      } catch (error) {
        permit.release();
        const failure = toMailerError(error);
        // A lost connection may have happened after the server took the message.
        await ledger?.fail(message.id, failure.code, failure.code === "SMTP_CONNECTION_FAILED");
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
