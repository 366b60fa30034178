// Microsoft Graph answers, classified like SMTP replies: what the message did wrong is permanent,
// what our setup lacks is config (the circuit opens, nothing is poisoned), a throttle is deferred
// (the mailbox pauses for Retry-After, the message waits without using an attempt), the rest is
// transient. Every error keeps Graph's code and message as the response.
import { MailerError, type ErrorKind } from "../errors.js";

interface GraphErrorBody {
  error?: { code?: string; message?: string };
}

/** Retry-After in whole seconds (Graph sends seconds; an HTTP date is accepted too). */
export function retryAfterSeconds(header: string | null, now = Date.now()): number | undefined {
  if (header === null) return undefined;
  if (/^\d+$/.test(header.trim())) return Number(header.trim());
  const date = Date.parse(header);
  return Number.isNaN(date) ? undefined : Math.max(0, Math.ceil((date - now) / 1000));
}

const hints: Record<string, string> = {
  GRAPH_AUTH_REJECTED: "Graph refused the token: TOKEN_SCOPE must be https://graph.microsoft.com/.default (a token for Exchange SMTP is not valid for Graph), and the app registration must be in TENANT_ID.",
  GRAPH_ACCESS_DENIED:
    "Grant the app the Microsoft Graph application permission Mail.Send and admin consent (delegated Mail.Send for AUTH_METHOD=password). If an application access policy confines the app (New-ApplicationAccessPolicy), the mailbox in SMTP_USER/MAILBOX must be in its group: check with Test-ApplicationAccessPolicy -Identity <mailbox> -AppId <CLIENT_ID>.",
  GRAPH_MAILBOX_NOT_ENABLED: "The user has no Exchange Online mailbox (or it is on-premises / inactive): SMTP_USER/MAILBOX must be a licensed Exchange Online mailbox.",
  GRAPH_INVALID_USER: "Graph does not know this user: SMTP_USER/MAILBOX must be the mailbox's UPN or object id in this tenant.",
  GRAPH_SEND_AS_DENIED: "From must be the mailbox in SMTP_USER/MAILBOX, or grant SendAs on the other address (Add-RecipientPermission).",
  GRAPH_MESSAGE_TOO_LARGE: "The message is larger than the mailbox accepts (Exchange Online: 25 MB by default, up to 150 MB if the admin allows it).",
};

function graphError(code: string, kind: ErrorKind, status: number, graphCode: string, text: string, command: string, retryAfter?: number): MailerError {
  const response = `${status} ${graphCode}${text ? `: ${text}` : ""}`.slice(0, 1000);
  const hint = hints[code];
  return new MailerError(code, `Graph ${command}: ${response}`, {
    kind,
    response,
    command,
    ...(hint === undefined ? {} : { hint }),
    ...(retryAfter === undefined ? {} : { retryAfterSeconds: retryAfter }),
  });
}

/** A Graph error answer → our code and class. `command` is e.g. "POST /users/{id}/sendMail". */
export function classifyGraphResponse(status: number, bodyText: string, headers: { get(name: string): string | null }, command: string): MailerError {
  let body: GraphErrorBody = {};
  try {
    body = JSON.parse(bodyText) as GraphErrorBody;
  } catch {
    // Not JSON (a gateway's page): keep the status.
  }
  const graphCode = body.error?.code ?? `HTTP ${status}`;
  const text = (body.error?.message ?? bodyText).replace(/\s+/g, " ").trim().slice(0, 500);
  const after = retryAfterSeconds(headers.get("retry-after"));
  const error = (code: string, kind: ErrorKind, retryAfter?: number) => graphError(code, kind, status, graphCode, text, command, retryAfter);

  if (status === 429 || ((status === 503 || status === 504) && after !== undefined)) {
    // Graph counts per app and mailbox: the whole mailbox waits, not just this message. Without a
    // Retry-After (which Graph always sends with 429) wait half a minute.
    return error("GRAPH_THROTTLED", "deferred", after ?? 30);
  }
  if (status === 401) return error("GRAPH_AUTH_REJECTED", "config");
  if (/SendAsDenied/i.test(graphCode)) return error("GRAPH_SEND_AS_DENIED", "permanent");
  if (status === 403) return error("GRAPH_ACCESS_DENIED", "config");
  if (/MailboxNotEnabledForRESTAPI|MailboxNotHostedInExchangeOnline|ErrorMailboxStoreUnavailable/i.test(graphCode)) return error("GRAPH_MAILBOX_NOT_ENABLED", "config");
  if (/ErrorInvalidUser|ResourceNotFound|UserNotFound/i.test(graphCode) || status === 404) return error("GRAPH_INVALID_USER", "config");
  if (/ErrorInvalidRecipients/i.test(graphCode)) return error("GRAPH_INVALID_RECIPIENTS", "permanent");
  if (status === 413 || /ErrorMessageSizeExceeded|RequestEntityTooLarge/i.test(graphCode)) return error("GRAPH_MESSAGE_TOO_LARGE", "permanent");
  if (status >= 500 || status === 408) return error("GRAPH_UNAVAILABLE", "transient", after);
  return error("GRAPH_REJECTED", "permanent");
}

/** The request never got an answer: refused, reset, timed out. A send may have been taken. */
export function graphNetworkError(error: unknown, command: string): MailerError {
  const cause = (error as { cause?: { code?: string } }).cause;
  const reason = (error as Error).name === "TimeoutError" ? "timed out" : (cause?.code ?? (error as Error).message);
  return new MailerError("GRAPH_CONNECTION_FAILED", `Graph ${command}: no answer (${reason})`, { kind: "transient", command, cause: error });
}
