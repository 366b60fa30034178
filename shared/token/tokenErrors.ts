// Token endpoint failures, classified by what the server says: 5xx, 429 and timeouts are transient
// even when the body names an AADSTS code; 400/401 answers mean our setup is wrong.
import { MailerError } from "../errors.js";

// What each common AADSTS code means for the person fixing the setup (see docs/auth-*.md).
const aadstsHints: Record<string, string> = {
  "700016": "The app (CLIENT_ID) was not found in the tenant (TENANT_ID): check both IDs and that the app is registered in that tenant.",
  "7000215": "The client secret is wrong: put the secret's Value (not its Secret ID) from the app registration's Certificates & secrets in CLIENT_SECRET, or in the Key Vault secret named by CLIENT_SECRET_NAME (re-read after this error, so a new version is picked up).",
  "7000222": "The client secret has expired: create a new one under Certificates & secrets in the app registration, then update CLIENT_SECRET or add a new version of the Key Vault secret named by CLIENT_SECRET_NAME.",
  "7000218": "The app registration is a confidential client, so the token request needs its secret: set CLIENT_SECRET (or CLIENT_SECRET_NAME), or, for AUTH_METHOD=password without a secret, turn on Authentication > Allow public client flows.",
  "700025": "The app registration is a public client (Allow public client flows), so it must not send a secret: remove CLIENT_SECRET and CLIENT_SECRET_NAME, or turn public client flows off.",
  "50126": "Wrong username or password for the password grant: check SMTP_USER and MAILBOX_PASSWORD (or the Key Vault secret named by MAILBOX_PASSWORD_NAME). Federated accounts without password hash sync cannot use this grant.",
  "50034": "The user in SMTP_USER does not exist in this tenant: check SMTP_USER and TENANT_ID.",
  "50076": "The mailbox account must use multi-factor authentication (MFA, Conditional Access or Security Defaults), which the password grant cannot do: move to AUTH_METHOD=certificate (see docs/auth-password.md).",
  "50079": "The mailbox account must register for multi-factor authentication, which the password grant cannot do: move to AUTH_METHOD=certificate (see docs/auth-password.md).",
  "70011": "The scope is invalid: TOKEN_SCOPE must be https://outlook.office365.com/.default for app-only methods, or https://outlook.office365.com/SMTP.Send for AUTH_METHOD=password.",
  "700027": "The certificate is not registered on the app registration, or the assertion's signature does not match it: upload the certificate's public part (.cer) under Certificates & secrets.",
  "700024": "The assertion is outside its validity window: check this machine's clock.",
  "90002": "The tenant was not found: check TENANT_ID.",
  "65001": "Consent is missing: grant admin consent under API permissions for SMTP.SendAsApp (application permission; certificate and secret) or SMTP.Send (delegated; password).",
  "500011": "The resource principal was not found in the tenant: check TOKEN_SCOPE and that Office 365 Exchange Online is available.",
  "1002012": "The scope is invalid: TOKEN_SCOPE must be https://outlook.office365.com/.default for SMTP.",
  "7000112": "The application is disabled in the tenant.",
  // Delegated grants (AUTH_METHOD=refresh-token): the user's grant is gone; only a new sign-in helps.
  "70008": "The refresh token expired (unused for 90 days) or was revoked: sign in again with `queue-mailer authorize` (docs/auth-refresh-token.md).",
  "700082": "The refresh token expired after being unused too long: sign in again with `queue-mailer authorize` (docs/auth-refresh-token.md).",
  "50173": "The grant was revoked (password change or reset, or an admin revoked the user's sessions): sign in again with `queue-mailer authorize` (docs/auth-refresh-token.md).",
  "70000": "The refresh token or authorization code is not valid (revoked, already used, or for another client): sign in again with `queue-mailer authorize` (docs/auth-refresh-token.md).",
  "54005": "The authorization code was already redeemed: run `queue-mailer authorize` again for a new one.",
  "501481": "The PKCE code_verifier does not match the authorization request: run `queue-mailer authorize` again (a proxy that rewrites the redirect can cause this).",
  "65004": "The user declined consent: run `queue-mailer authorize` again and accept, or have an admin grant consent for SMTP.Send (delegated) under API permissions.",
};

// A plain RFC 6749 invalid_client (no AADSTS code) comes from servers other than Entra, which is
// also what a strict server answers when the secret travels the other way than it is registered.
// A plain invalid_grant (no AADSTS code, not Google's wording) from a server such as Okta, Auth0 or
// oidc-provider: a refresh token that expired, was revoked or was used twice (rotation), or a wrong
// password for the password grant.
const INVALID_GRANT_HINT = "The token endpoint refused the grant: for AUTH_METHOD=refresh-token the refresh token expired, was revoked or was already used, so sign in again with `queue-mailer authorize`; for AUTH_METHOD=password check SMTP_USER and the password.";

const INVALID_CLIENT_HINT = "The token endpoint refused the client authentication: check CLIENT_ID and the credential, and for a client secret that CLIENT_AUTH matches how the server expects it (post: client_id and client_secret in the form body; basic: an HTTP Basic Authorization header).";

// Google's token endpoint has no numeric codes: `error` plus a phrase of Google's own
// error_description says what is wrong (see docs/auth-google-service-account.md). Matched on
// Google's wording only, so another server's plain `unauthorized_client` does not get these hints.
const googleHints: Array<{ error: string; description: RegExp; hint: string }> = [
  {
    error: "unauthorized_client",
    description: /Client is unauthorized to retrieve access tokens/i,
    hint: "Domain-wide delegation is missing for this service account or scope: in the Google Admin console (Security > Access and data control > API controls > Manage Domain Wide Delegation) add the service account's client ID (client_id in its JSON key, logged as google.key.loaded) with the scope https://mail.google.com/ (TOKEN_SCOPE). A new grant can take a while to apply.",
  },
  {
    error: "invalid_grant",
    description: /Invalid email or User ID/i,
    hint: "SMTP_USER (the assertion's sub) is not a user of the Workspace domain that granted the delegation: set it to the primary address of an existing, active Workspace user.",
  },
  {
    error: "invalid_grant",
    description: /Invalid JWT Signature/i,
    hint: "Google does not know the key that signed the assertion: it was deleted or disabled (rotated) in the Google Cloud console. Create a new JSON key for the service account and replace the file in GOOGLE_KEY_PATH, or add it as a new version of the Key Vault secret named by GOOGLE_KEY_NAME (read again after this error).",
  },
  {
    error: "invalid_grant",
    description: /short-lived token|reasonable timeframe/i,
    hint: "Google refused the assertion's iat/exp: this machine's clock is off by minutes or more. Synchronise it (NTP).",
  },
  {
    error: "invalid_grant",
    description: /account not found/i,
    hint: "The service account in the key (client_email) does not exist or is disabled: check IAM & Admin > Service accounts, or use a key of an active service account in GOOGLE_KEY_PATH / GOOGLE_KEY_NAME.",
  },
  {
    error: "invalid_scope",
    description: /Invalid OAuth scope|Empty or missing scope/i,
    hint: "Google refused the scope: for Gmail SMTP TOKEN_SCOPE must be https://mail.google.com/ (its default for this method).",
  },
];

function googleHint(body: TokenErrorBody): string | undefined {
  return googleHints.find((h) => h.error === body.error && h.description.test(body.error_description ?? ""))?.hint;
}

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
    ...(transient ? {} : { hint: (aadsts ? aadstsHints[aadsts] : (googleHint(body) ?? (body.error === "invalid_client" ? INVALID_CLIENT_HINT : body.error === "invalid_grant" ? INVALID_GRANT_HINT : undefined))) ?? "Check TENANT_ID, CLIENT_ID, TOKEN_SCOPE and the credential registered on the app (certificate or secret)." }),
  });
}

export function tokenNetworkError(error: unknown, tokenUrl: string): MailerError {
  const cause = (error as { cause?: { code?: string } }).cause;
  const reason = (error as Error).name === "TimeoutError" ? "timed out" : (cause?.code ?? (error as Error).message);
  return new MailerError("TOKEN_UNREACHABLE", `token endpoint ${tokenUrl} unreachable: ${reason}`, { kind: "transient", command: `POST ${tokenUrl}`, cause: error });
}
