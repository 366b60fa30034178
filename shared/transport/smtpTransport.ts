// SMTP submission with XOAUTH2 through one pooled nodemailer transport per process: connections
// are opened once and reused across messages and invocations, and each new connection asks the
// TokenProvider for the (shared, cached) token through nodemailer's oauth2 provisioning hook.
import { createHash } from "node:crypto";
import { connect, type Socket } from "node:net";
import nodemailer from "nodemailer";
import type { SmtpConfig } from "../config.js";
import type { Logger } from "../log.js";
import type { EmailMessage } from "../message/schema.js";
import type { TokenProvider } from "../token/tokenProvider.js";
import { toMailerError } from "../errors.js";
import { classifySmtpError } from "./smtpErrors.js";
import type { SendResult, Transport } from "./transport.js";
import type { ConnectionSlots } from "../send/connectionSlots.js";

export interface SmtpTransportStats {
  tokenProvisions: number;
  tokenRenewals: number;
}

/**
 * Message-ID from the message's idempotency key, so a duplicate that slips through carries the same
 * Message-ID and mail servers and clients can recognise it.
 */
export function messageIdFor(id: string, mailbox: string): string {
  const domain = mailbox.split("@")[1] ?? "queue-mailer.invalid";
  return `<qm.${createHash("sha256").update(id).digest("base64url").slice(0, 32)}@${domain}>`;
}

/**
 * Opens the TCP connection itself once a cross-instance connection slot is held, and frees the
 * slot when the connection closes (nodemailer then does STARTTLS and AUTH on it as usual).
 */
function slotBoundSocket(slots: ConnectionSlots) {
  return (options: { host?: string; port?: number }, callback: (error: Error | null, socketOptions?: { connection: Socket }) => void) => {
    slots.acquire().then(
      (lease) => {
        let answered = false;
        const socket = connect({ host: options.host ?? "localhost", port: options.port ?? 587 });
        socket.once("close", () => lease.release());
        socket.once("connect", () => {
          answered = true;
          callback(null, { connection: socket });
        });
        socket.once("error", (error) => {
          if (answered) return; // from here on nodemailer owns the socket and its errors
          answered = true;
          lease.release();
          callback(error);
        });
      },
      (error: unknown) => callback(error as Error),
    );
  };
}

export function createSmtpTransport(
  smtp: SmtpConfig,
  tokens: TokenProvider,
  logger: Logger,
  options: { connectionSlots?: ConnectionSlots } = {},
): Transport & { stats: SmtpTransportStats } {
  const stats: SmtpTransportStats = { tokenProvisions: 0, tokenRenewals: 0 };
  const transporter = nodemailer.createTransport({
    pool: true,
    host: smtp.host,
    port: smtp.port,
    secure: false,
    requireTLS: true, // never send a token over a connection that did not upgrade
    maxConnections: smtp.maxConnections,
    maxMessages: Infinity,
    connectionTimeout: 30_000,
    greetingTimeout: 30_000,
    socketTimeout: 60_000,
    auth: { type: "OAuth2", user: smtp.user },
    logger: false,
    ...(options.connectionSlots ? { getSocket: slotBoundSocket(options.connectionSlots) } : {}),
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

  async function sendOnce(message: EmailMessage): Promise<SendResult> {
    const info = await transporter.sendMail({
      messageId: messageIdFor(message.id, smtp.user),
      from: message.from,
      to: message.to,
      cc: message.cc,
      bcc: message.bcc,
      replyTo: message.replyTo,
      subject: message.subject,
      headers: message.headers,
      attachments: message.attachments.map((a) => ({ filename: a.filename, content: a.content ?? Buffer.alloc(0), ...(a.contentType === undefined ? {} : { contentType: a.contentType }) })),
      ...(message.text === undefined ? {} : { text: message.text }),
      ...(message.html === undefined ? {} : { html: message.html }),
    });
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
        await transporter.verify();
      } catch (error) {
        throw classifySmtpError(error);
      }
    },
    async close() {
      transporter.close();
    },
  };
}
