// SMTP failures, classified by the server's reply: 4xx is "try later", 5xx at AUTH is our setup,
// 5xx for the message or a recipient is the message's fault. Errors keep the reply and the
// command that failed, as nodemailer reports them.
import { MailerError, type ErrorKind } from "../errors.js";

interface NodemailerError extends Error {
  code?: string;
  originalCode?: string;
  responseCode?: number;
  response?: string;
  command?: string;
  /** Set by our oauth2 provisioning callback: the token failure behind an EAUTH. */
  mailerError?: MailerError;
}

function smtpError(code: string, kind: ErrorKind, error: NodemailerError, hint?: string): MailerError {
  const response = error.response?.trim();
  const where = error.command ? ` at ${error.command}` : "";
  return new MailerError(code, `SMTP${where}: ${response ?? error.message}`, {
    kind,
    cause: error,
    ...(response === undefined ? {} : { response }),
    ...(error.command === undefined ? {} : { command: error.command }),
    ...(hint === undefined ? {} : { hint }),
  });
}

export function classifySmtpError(raw: unknown): MailerError {
  if (raw instanceof MailerError) return raw;
  const error = raw as NodemailerError;
  if (error.mailerError) return error.mailerError;
  const reply = error.response ?? "";
  const status = error.responseCode;
  const enhanced = reply.match(/\b([245])\.(\d{1,3})\.(\d{1,3})\b/)?.[0] ?? "";

  if (status === undefined) {
    if (error.code === "ETLS" || /certificate|self[- ]signed|SSL|TLS/i.test(error.message)) {
      return smtpError("SMTP_TLS_FAILED", "config", error, "STARTTLS failed: check SMTP_HOST/SMTP_PORT and that the server's certificate is trusted.");
    }
    // Connection refused, reset, timed out, dropped mid-DATA: the outcome is unknown or nothing
    // was sent; either way the message must stay in the queue.
    return smtpError("SMTP_CONNECTION_FAILED", "transient", error);
  }
  if (status >= 400 && status < 500) {
    if (status === 432 || /limit exceeded|throttl/i.test(reply)) {
      return smtpError("SMTP_THROTTLED", "transient", error, "Exchange allows 3 concurrent connections and 30 messages a minute per mailbox: lower SMTP_MAX_CONNECTIONS or SEND_RATE_PER_MINUTE, or spread load over mailboxes.");
    }
    return smtpError("SMTP_TEMPORARY_FAILURE", "transient", error);
  }
  if (error.code === "EAUTH" || error.command?.startsWith("AUTH")) {
    if (enhanced === "5.7.139") {
      return smtpError("SMTP_AUTH_DISABLED", "config", error, "SMTP AUTH is disabled for the tenant or the mailbox: enable it with Set-CASMailbox -SmtpClientAuthenticationDisabled $false (Security Defaults also turn it off).");
    }
    if (/Username and Password not accepted|support\.google\.com\/mail|gsmtp/i.test(reply)) {
      // Gmail's answer to a refused XOAUTH2 token (535-5.7.8, after its 334 challenge): the token is
      // not for this user or lacks the Gmail scope. Matched on Gmail's wording, not on 5.7.8 alone,
      // which other servers use for any failed login.
      return smtpError("SMTP_AUTH_REJECTED", "config", error, "Gmail refused the token for SMTP_USER: the token must be for that same user (the assertion's sub is SMTP_USER) with the scope https://mail.google.com/ (TOKEN_SCOPE, granted in domain-wide delegation); the user must exist, be active and have Gmail enabled. SMTP_HOST must be smtp.gmail.com for Workspace accounts.");
    }
    return smtpError("SMTP_AUTH_REJECTED", "config", error, "The mail server refused the token. App-only (AUTH_METHOD certificate or secret): check SMTP.SendAsApp with admin consent, New-ServicePrincipal in Exchange, Add-MailboxPermission FullAccess for SMTP_USER, and TOKEN_SCOPE (https://outlook.office365.com/.default). Delegated (password): the token's user must be SMTP_USER and SMTP.Send must be consented; SMTP AUTH must be enabled for the mailbox.");
  }
  if (/SendAsDenied/i.test(reply) || enhanced === "5.2.252") {
    return smtpError("SMTP_SEND_AS_DENIED", "permanent", error, "From must be SMTP_USER, or grant SendAs with Add-RecipientPermission.");
  }
  if (error.command?.startsWith("RCPT") || /^5\.1\./.test(enhanced)) {
    return smtpError("SMTP_RECIPIENT_REJECTED", "permanent", error);
  }
  return smtpError("SMTP_REJECTED", "permanent", error);
}
