// Token endpoint failures, classified by what the server says: 5xx, 429 and timeouts are transient
// even when the body names an AADSTS code; 400/401 answers mean our setup is wrong.
import { MailerError } from "../errors.js";

// What each common AADSTS code means for the person fixing the setup (see docs/auth-*.md).
const aadstsHints: Record<string, string> = {
  "700016": "The app (CLIENT_ID) was not found in the tenant (TENANT_ID): check both IDs and that the app is registered in that tenant.",
  "7000215": "The client secret is wrong or expired: create a new one in Certificates & secrets.",
  "700027": "The certificate is not registered on the app registration, or the assertion's signature does not match it: upload the certificate's public part (.cer) under Certificates & secrets.",
  "700024": "The assertion is outside its validity window: check this machine's clock.",
  "90002": "The tenant was not found: check TENANT_ID.",
  "65001": "Admin consent is missing: grant admin consent for SMTP.SendAsApp under API permissions.",
  "500011": "The resource principal was not found in the tenant: check TOKEN_SCOPE and that Office 365 Exchange Online is available.",
  "1002012": "The scope is invalid: TOKEN_SCOPE must be https://outlook.office365.com/.default for SMTP.",
  "7000112": "The application is disabled in the tenant.",
};

interface TokenErrorBody {
  error?: string;
  error_description?: string;
  error_codes?: number[];
}

export function tokenResponseError(status: number, bodyText: string, retryAfterHeader: string | null, tokenUrl: string): MailerError {
  let body: TokenErrorBody = {};
  try {
    const parsed: unknown = JSON.parse(bodyText);
    if (parsed && typeof parsed === "object") body = parsed as TokenErrorBody;
  } catch {
    // Not JSON (a proxy's HTML page, say): keep the text as the response.
  }
  const aadsts = body.error_description?.match(/AADSTS(\d+)/)?.[1] ?? (body.error_codes?.[0] === undefined ? undefined : String(body.error_codes[0]));
  const response = `${status} ${body.error ?? ""} ${(body.error_description ?? bodyText).split("\r\n")[0]?.slice(0, 500) ?? ""}`.replace(/\s+/g, " ").trim();
  const retryAfterSeconds = retryAfterHeader !== null && /^\d+$/.test(retryAfterHeader) ? Number(retryAfterHeader) : undefined;
  const transient = status >= 500 || status === 429 || status === 408;
  const code = aadsts ? `TOKEN_AADSTS${aadsts}` : `TOKEN_${(body.error ?? `HTTP_${status}`).toUpperCase().replace(/[^A-Z0-9]+/g, "_")}`;
  return new MailerError(code, `token request to ${tokenUrl} failed: ${response}`, {
    kind: transient ? "transient" : "config",
    response,
    command: `POST ${tokenUrl}`,
    ...(retryAfterSeconds === undefined ? {} : { retryAfterSeconds }),
    ...(transient ? {} : { hint: (aadsts && aadstsHints[aadsts]) ?? "Check TENANT_ID, CLIENT_ID, TOKEN_SCOPE and the certificate registered on the app." }),
  });
}

export function tokenNetworkError(error: unknown, tokenUrl: string): MailerError {
  const cause = (error as { cause?: { code?: string } }).cause;
  const reason = (error as Error).name === "TimeoutError" ? "timed out" : (cause?.code ?? (error as Error).message);
  return new MailerError("TOKEN_UNREACHABLE", `token endpoint ${tokenUrl} unreachable: ${reason}`, { kind: "transient", command: `POST ${tokenUrl}`, cause: error });
}
