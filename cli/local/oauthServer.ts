// A local stand-in for the Microsoft identity platform's v2 token endpoint. oidc-provider (a certified
// OAuth server) does the real work, so client authentication is verified for real: client assertions
// (signature against the registered certificate's key, aud, iss = sub = client id, exp/nbf, single-use
// jti) and client secrets (constant-time compare, client_secret_expires_at). On top of it this adds
// what Entra does and oidc-provider does not: the certificate thumbprint check, the `.default` scope,
// the resource owner password grant (registerGrantType) with users that may "require MFA", app-only
// claims (`roles`, `appid`) and delegated ones (`scp`, `upn`), and Microsoft-shaped error bodies.
//
// App registrations are clients: a certificate client (private_key_jwt), secret clients registered for
// client_secret_post or client_secret_basic, and public clients ("Allow public client flows": the
// password grant without a secret). oidc-provider allows one authentication method per client, so a
// local app registration has one credential; clients and users can be added or changed while the
// server runs (registerClient / registerUser: a rotated or expired secret, a new password).
//
// AADSTS mapping (error_description = "AADSTS<code>: <text> [Reason - <detail>] Trace ID: …"):
//   700016  client not found                 700027  bad signature, unknown key, wrong thumbprint, alg
//   700024  assertion outside its time window 50013   other assertion problems: aud, iss, replayed jti
//   7000215 wrong client secret              7000222 client secret expired
//   7000218 confidential client sent no secret (password grant without "Allow public client flows")
//   700025  public client sent a secret      50126   wrong username or password
//   50034   no such user                     50076   MFA required    50079  MFA registration required
//   65001   delegated permission not consented  70011 invalid scope for the password grant
//   900144  missing parameter (username, password)
//   1002012 invalid scope (no "/.default")   500011  resource not served here
//   28000   password-grant scope names more than one resource
//   70003   unsupported grant type           9002313 other invalid requests; 50000 server errors
// Stricter than Entra in two ways:
// - Entra lets msal reuse an assertion until it expires; this server rejects a replayed jti (50013), so
//   a client that sends a fresh jti per request works with both.
// - Entra accepts a client secret in the form body and in an HTTP Basic header alike. A secret client
//   here accepts only the method it is registered for and refuses the other with a plain RFC 6749
//   `invalid_client` (no AADSTS code, as a strict server such as Okta or oidc-provider answers), so
//   tests prove which way the secret travelled.
// Limitation: oidc-provider matches a header `kid` against the registered key, which has none, so
// assertions must not carry `kid` (msal-node's do not; Entra selects keys by thumbprint only).
//
// Resources (the API a token is for, named in the scope): the primary one (`resource`, default
// Exchange Online, https://outlook.office365.com) and, when the `graph` option is given, Microsoft
// Graph, so that one app registration gets tokens for SMTP and for Graph `sendMail`, as in Entra.
// (Without it Graph is "not found in the tenant", AADSTS500011, as before Graph was added.)
// - Graph can be named by its URI or by its app id (`https://graph.microsoft.com/.default` or
//   `00000003-0000-0000-c000-000000000000/.default`); the token's `aud` is the form that was asked for
//   (Entra does the same; both forms are seen in real Graph tokens) and Graph accepts either.
// - App-only Graph tokens carry `roles` = the Graph application permissions (`graph.roles`, default
//   Mail.Send); delegated ones `scp` = the requested Graph permissions (`graph.delegatedPermissions`
//   consented, default Mail.Send; requested as `https://graph.microsoft.com/Mail.Send`).
// - One token is for one resource: a password-grant scope naming two resources is AADSTS28000.
// - verifyAccessToken(token, user, resource, permission) says why a token is refused (`problem`):
//   "invalid" / "expired" / "audience" (a resource server answers 401) or "permission" / "user" (the
//   token is good but does not allow this: 403).
//
// IMAP (the `imap` option; without it nothing below exists in tokens): Exchange Online IMAP is the
// primary resource too. App-only tokens of the clients in `imap.appClients` (default: all) also carry
// the IMAP.AccessAsApp role; IMAP.AccessAsUser.All is consented as a delegated permission. Exchange
// also wants the app's service principal granted each mailbox (Add-MailboxPermission): that is
// `imap.mailboxPermissions` (client id -> mailboxes), changed at run time with addMailboxPermission /
// removeMailboxPermission. An IMAP server checks a token with `introspectionUrl`, an RFC 7662
// endpoint (POST token=...; always 200, `active` false for a refused token) that answers, for a token
// verifyAccessToken accepts with IMAP.AccessAsApp (app-only) or IMAP.AccessAsUser.All (delegated):
// `scope` (the roles or scp), `client_id`, `username` (delegated: the upn; app-only: the client id)
// and `mailboxes`: the mailboxes the token may open, ",a@x,b@y," (delegated: the user's own). An
// introspection request does not name the mailbox being opened (Dovecot's does not), so the IMAP
// server checks that the login user is one of `mailboxes` (test/support/dovecot.ts).
//
// Delegated sign-in (AUTH_METHOD=refresh-token, `queue-mailer authorize`): a client registered with
// `redirectUris` is a "Mobile and desktop" app registration (oidc-provider's native application
// type: a loopback redirect such as http://localhost matches any port, RFC 8252 7.3) that may use
// - the authorization code grant with PKCE (S256 required for every client here, as Entra does for
//   public clients), at `authorizeUrl`. The sign-in and consent pages are plain HTML forms under
//   /interaction/<uid> that a test drives with fetch (redirect: "manual", cookies kept): a login form
//   (username, password; a user who "requires MFA" passes, since an interactive sign-in can do
//   MFA) and a consent page with an accept and a decline form (decline → error=access_denied,
//   AADSTS65004, at the redirect URI). offline_access is honoured without prompt=consent, as by Entra;
//   openid/profile/email give an ID token with preferred_username.
// - the device authorization grant (RFC 8628) at `deviceCodeUrl`, with Microsoft's answer shape
//   (`interval`, `message`); the user enters the code at `verificationUrl` (oidc-provider's own
//   forms: user code, then confirm), then signs in and consents as above. Polling rules are enforced:
//   a poll sooner than the current interval is answered slow_down and the interval grows by 5 s;
//   slowDownNextDevicePoll() makes the next pending poll a slow_down too (a busy server), and
//   stats.devicePolls records every poll with its answer.
// - refresh tokens (offline_access) that ROTATE on every use (rotateRefreshToken), with reuse
//   detection: a rotated-out refresh token that comes back revokes its whole family (oidc-provider
//   destroys the grant and every token of it; this file's adapter implements revokeByGrantId for
//   that), counted in stats.familiesRevoked. Entra itself rotates but does not revoke on reuse;
//   Okta, Auth0 and oidc-provider do, so this is the stricter server to test against.
// Delegated tokens carry `scp` (the permissions without the resource prefix), `upn` and `oid`, like
// the password grant's. Refusals of grants are answered in Entra's codes: 70008 expired, 50173
// revoked (family or user revoked, grant gone), 70000 a rotated-out or unknown refresh token,
// 54005 code already redeemed, 501481 PKCE mismatch, 70016 authorization_pending, 70019 expired
// device code, 65004 declined. revokeUserGrants(user) is an admin's "revoke sessions";
// issueRefreshToken(client, user, scope) signs a user in without a browser (the local stack).
import { listenLoopback } from "./listenLoopback.js";
import { createHash, generateKeyPairSync, randomBytes, randomUUID, X509Certificate } from "node:crypto";
import type { KeyObject } from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { decodeJwt, jwtVerify } from "jose";
// @ts-ignore -- oidc-provider ships no types and @types/oidc-provider is not a dependency (ts-ignore,
// not ts-expect-error, so that adding those types later does not break the build).
import Provider, { errors } from "oidc-provider";

/**
 * One app registration, as the token endpoint authenticates it. With `redirectUris` it is also a
 * "Mobile and desktop applications" platform: authorization code (PKCE), device code and refresh
 * token grants for a signed-in user (an empty list: device code only).
 */
export type ClientRegistration = (
  | { clientId: string; auth: "private_key_jwt"; certificatePem: string }
  | {
      clientId: string;
      auth: "client_secret_post" | "client_secret_basic";
      secret: string;
      /** After this the secret is refused with AADSTS7000222. */
      secretExpiresAt?: Date;
    }
  /** A public client ("Allow public client flows"): the password grant, no client credential. */
  | { clientId: string; auth: "none" }
) & { redirectUris?: string[] };

/** A user the password grant signs in. */
export interface UserAccount {
  /** The UPN, e.g. mailer@contoso.test. */
  username: string;
  password: string;
  /** "required": a policy demands MFA (AADSTS50076); "registration": the user must enrol first (AADSTS50079). */
  mfa?: "required" | "registration";
}

export interface OAuthServerOptions {
  /** The certificate client: registered with private_key_jwt when `certificatePem` is given too. */
  clientId?: string;
  /** The certificate client's certificate: its public key verifies assertions. */
  certificatePem?: string;
  /** More app registrations (secret and public clients); the same id replaces the certificate client. */
  clients?: ClientRegistration[];
  /** Users of the password grant. */
  users?: UserAccount[];
  /** Default "local-tenant". */
  tenantId?: string;
  /** Default 127.0.0.1. */
  host?: string;
  /** Default 0 (any free port; the URLs carry the real one). */
  port?: number;
  /** Default "https://outlook.office365.com". */
  resource?: string;
  /** Default ["SMTP.SendAsApp"]: app-only tokens' `roles` claim, all of them required by verifyAccessToken. */
  roles?: string[];
  /** Default ["SMTP.Send"]: the delegated permissions consented for every client (delegated tokens' `scp`). */
  delegatedPermissions?: string[];
  /**
   * Serve Microsoft Graph as a second resource: `roles` are the application permissions admin-consented
   * for the app (app-only tokens' `roles`, default ["Mail.Send"]), `delegatedPermissions` the delegated
   * ones consented (default ["Mail.Send"]). Without this option Graph tokens are refused (500011).
   * Ignored when `resource` is Graph itself.
   */
  graph?: { roles?: string[]; delegatedPermissions?: string[] };
  /**
   * Exchange Online IMAP on the primary resource (see the IMAP notes above). Without this option
   * tokens carry no IMAP permission and no mailbox is granted to any app.
   */
  imap?: ImapOptions;
  /** Default 3600. */
  accessTokenTtlSeconds?: number;
  /** Device flow: the polling interval announced (Microsoft: 5). Default 5. */
  deviceCodeIntervalSeconds?: number;
  /** Lifetime of each refresh token; a rotation issues a fresh one. Default 90 days (Entra's inactivity limit). */
  refreshTokenTtlSeconds?: number;
}

export interface ImapOptions {
  /** App registrations admin-consented IMAP.AccessAsApp: their app-only tokens carry it. Default: every client. */
  appClients?: string[];
  /** Exchange's Add-MailboxPermission: client id -> the mailboxes its app-only tokens may open. */
  mailboxPermissions?: Record<string, string[]>;
  /** Delegated permissions consented on top of the primary resource's. Default ["IMAP.AccessAsUser.All"]. */
  delegatedPermissions?: string[];
}

/** The application permission Exchange Online requires for IMAP with an app-only token. */
export const IMAP_APP_PERMISSION = "IMAP.AccessAsApp";
/** The delegated permission Exchange Online requires for IMAP with a user's token. */
export const IMAP_DELEGATED_PERMISSION = "IMAP.AccessAsUser.All";

/** What the introspection endpoint answered (no token values). */
export interface IntrospectionRecord {
  active: boolean;
  clientId?: string;
  /** Why the token was refused. */
  reason?: string;
}

/**
 * Why a token is refused: "invalid" (not a JWT, bad signature, wrong issuer), "expired", "audience"
 * (issued for another resource), which a resource server answers with 401; "permission" (the role or
 * scope the call needs is missing) and "user" (a delegated token for someone else), answered with 403.
 */
export type AccessTokenProblem = "invalid" | "expired" | "audience" | "permission" | "user";

export type AccessTokenCheck = { ok: true; claims: Record<string, unknown> } | { ok: false; reason: string; problem: AccessTokenProblem };

/** Microsoft Graph's resource URI; tokens for it are requested with `${GRAPH_RESOURCE}/.default`. */
export const GRAPH_RESOURCE = "https://graph.microsoft.com";
/** Microsoft Graph's app id: the other name of the same resource (`${GRAPH_APP_ID}/.default`). */
export const GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000";
/** Graph's permission to send mail as any mailbox (application) or as the signed-in user (delegated). */
export const GRAPH_MAIL_SEND = "Mail.Send";

/** How a request authenticated its client, as the server saw it. */
export type SentClientAuthentication = "client_secret_post" | "client_secret_basic" | "private_key_jwt" | "none";

/** What one token request carried: names only, never values of secrets. */
export interface TokenRequestRecord {
  grantType: string | undefined;
  clientId: string | undefined;
  clientAuthentication: SentClientAuthentication;
  /** Names of the form fields, sorted. */
  fields: string[];
  /** The password grant's username (not secret). */
  username?: string;
  scope?: string;
  status: number;
}

export interface OAuthServer {
  /** http://host:port/<tenant>/v2.0, like Entra's v2 issuer. */
  issuer: string;
  /** http://host:port/<tenant>/oauth2/v2.0/token: Microsoft's path shape, accepted as assertion aud. */
  tokenUrl: string;
  jwksUrl: string;
  /** `${resource}/.default`: app-only (client credentials). */
  scope: string;
  /** `${resource}/SMTP.Send`: delegated (password grant). */
  delegatedScope: string;
  /** `https://graph.microsoft.com/.default`: app-only Graph token. */
  graphScope: string;
  /** `https://graph.microsoft.com/Mail.Send`: delegated Graph token (password grant). */
  graphDelegatedScope: string;
  /**
   * Signature, iss, exp, and aud = `resource` (default: the primary resource; Graph accepts its URI or
   * app id); then either an app-only token whose `roles` hold `permission`, or a delegated token whose
   * `scp` holds it and whose `upn` is `user` (the mailbox signing in; without it a delegated token is
   * refused, as Exchange and Graph refuse a token for another user). Without `permission`: for the
   * primary resource every configured role (app-only) or SMTP.Send (delegated); for Graph Mail.Send.
   */
  verifyAccessToken(token: string, user?: string, resource?: string, permission?: string): Promise<AccessTokenCheck>;
  /**
   * RFC 7662 token introspection for an IMAP server (POST `token`; see the IMAP notes at the top).
   * Answers only for the primary resource's IMAP permissions.
   */
  introspectionUrl: string;
  /** Exchange's Add-MailboxPermission for the app's service principal (app-only IMAP). */
  addMailboxPermission(clientId: string, mailbox: string): void;
  /** Exchange's Remove-MailboxPermission. */
  removeMailboxPermission(clientId: string, mailbox: string): void;
  /** Adds or replaces an app registration (rotate or expire a secret). */
  registerClient(client: ClientRegistration): void;
  /** Adds or replaces a user (change a password, require MFA). */
  registerUser(user: UserAccount): void;
  stats: {
    tokenRequests: number;
    tokensIssued: number;
    errors: Array<{ error: string; detail?: string }>;
    /** Every token request that reached oidc-provider (injected failures are not), in order. */
    requests: TokenRequestRecord[];
    /** Refresh token families revoked because a rotated-out token was used again. */
    familiesRevoked: number;
    /** Device flow polls, in order: when (ms) and the answer (an error word, or "issued"). */
    devicePolls: Array<{ at: number; answer: string }>;
    /** Device polls that came sooner than the interval in force but could not be refused (the code was ready). */
    devicePollsTooEarly: number;
    /** Every answer of the introspection endpoint, in order. */
    introspections: IntrospectionRecord[];
  };
  resetStats(): void;
  /** http://host:port/<tenant>/oauth2/v2.0/authorize: AUTHORIZE_URL. */
  authorizeUrl: string;
  /** http://host:port/<tenant>/oauth2/v2.0/devicecode: DEVICE_CODE_URL. */
  deviceCodeUrl: string;
  /** Where a device-flow user enters the code (Microsoft: https://microsoft.com/devicelogin). */
  verificationUrl: string;
  /** `${resource}/SMTP.Send offline_access`: delegated SMTP with a refresh token (AUTH_METHOD=refresh-token). */
  delegatedRefreshScope: string;
  /**
   * Signs `username` in to `clientId` without a browser, as if they had consented to `scope` (which
   * must include offline_access), and returns the refresh token: a new family.
   */
  issueRefreshToken(clientId: string, username: string, scope: string): Promise<string>;
  /** An admin's "revoke sessions": every grant and token of the user is gone (next redemption: AADSTS50173). */
  revokeUserGrants(username: string): void;
  /** Live refresh token families of the user for the client: grants with an unused, unexpired refresh token. */
  refreshTokenFamilies(username: string, clientId?: string): number;
  /** The next device poll that would be answered authorization_pending is answered slow_down (interval + 5 s). */
  slowDownNextDevicePoll(): void;
  /**
   * From now on every token request is answered `ms` later (a slow identity provider), in the order
   * they arrived; 0 turns it off. Widens the window in which two clients redeem at once.
   */
  delayTokenResponses(ms: number): void;
  /**
   * Every secret value that crossed this server (authorization codes, PKCE verifiers, device codes,
   * refresh, access and ID tokens, client secrets, passwords), for tests that search output for them.
   */
  secretsSeen(): string[];
  /** The next `count` token requests get this answer instead (e.g. 503, or 400 with an AADSTS body). */
  failNext(count: number, status: number, body: unknown, headers?: Record<string, string>): void;
  close(): Promise<void>;
}

// The slice of Koa's context, oidc-provider's context and its errors this file touches (the package
// has no types).
interface Ctx {
  method: string;
  path: string;
  /** Koa: the parsed query string; assigning it rewrites the request's query. */
  query: Record<string, string | string[] | undefined>;
  status: number;
  body: unknown;
  headers: Record<string, string | undefined>;
  set(headers: Record<string, string>): void;
  oidc?: {
    route?: string;
    params?: Record<string, unknown>;
    body?: Record<string, unknown>;
    client?: { clientId: string; clientAuthMethod: string };
    entity(name: string, value: unknown): void;
  };
}
interface ProviderError {
  error?: string;
  message: string;
  error_description?: string;
  error_detail?: string;
}

const AADSTS_TEXT: Record<number, string> = {
  700016: "Application with identifier '{client}' was not found in the directory '{tenant}'.",
  700027: "Client assertion contains an invalid signature.",
  700024: "Client assertion is not within its valid time range.",
  50013: "Assertion failed signature validation or is invalid.",
  7000215: "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client}'.",
  7000222: "The provided client secret keys for app '{client}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.",
  7000218: "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
  700025: "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.",
  50126: "Error validating credentials due to invalid username or password.",
  50034: "The user account {user} does not exist in the {tenant} directory. To sign into this application, the account must be added to the directory.",
  50076: "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '{resource}'.",
  50079: "Due to a configuration change made by your administrator, or because you moved to a new location, you must enroll in multi-factor authentication to access '{resource}'.",
  65001: "The user or administrator has not consented to use the application with ID '{client}'. Send an interactive authorization request for this user and resource.",
  70011: "The provided value for the input parameter 'scope' is not valid. The scope '{scope}' does not exist.",
  900144: "The request body must contain the following parameter: '{parameter}'.",
  1002012: "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).",
  500011: "The resource principal was not found in the tenant named {tenant}.",
  28000: "Provided value for the input parameter scope is not valid because it contains more than one resource. Scope {scope} is not valid.",
  70003: "The app requested an unsupported grant type.",
  9002313: "Invalid request. Request is malformed or invalid.",
  50000: "There was an error issuing a token.",
  70008: "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.",
  50173: "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.",
  70000: "The provided value for the input parameter 'refresh_token' or 'assertion' is not valid.",
  54005: "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
  501481: "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
  70016: "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
  70019: "Verification code expired.",
  65004: "User declined to consent to access the app.",
};

/** Entra adds a suberror to answers that a user could resolve interactively. */
const AADSTS_SUBERROR: Record<number, string> = { 50076: "basic_action", 50079: "basic_action" };

const DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code";

/** The delegated permission Exchange Online requires for SMTP AUTH with a user's token. */
const DELEGATED_SMTP_PERMISSION = "SMTP.Send";

const SECRET_METHODS = new Set(["client_secret_post", "client_secret_basic"]);

/** What the client sent to authenticate, from the header and the parsed form. */
function sentClientAuthentication(ctx: Ctx): SentClientAuthentication {
  if (ctx.headers.authorization !== undefined) return "client_secret_basic";
  const body = ctx.oidc?.body ?? {};
  if (body.client_secret !== undefined) return "client_secret_post";
  if (body.client_assertion !== undefined) return "private_key_jwt";
  return "none";
}

/** oidc-provider's own client-authentication errors, in Entra's codes. */
function aadstsCode(error: string, detail: string, status: number, client: { registered: string | undefined; sent: SentClientAuthentication }): number {
  if (error === "invalid_client") {
    if (detail === "client not found") return 700016;
    if (detail === "invalid secret provided") return 7000215;
    if (/client_secret expired/.test(detail)) return 7000222;
    if (/does not match the registered client authentication method/.test(detail)) {
      if (client.registered === "none") return 700025;
      if (client.sent === "none") return 7000218;
      // A secret for an app that has only a certificate: Entra finds no such secret.
      if (client.sent !== "private_key_jwt") return 7000215;
    }
    if (/signature|key|thumbprint|alg mismatch/i.test(detail)) return 700027;
    if (/expired|not active|nbf|exp\b/i.test(detail)) return 700024;
    return 50013;
  }
  if (error === "invalid_grant") {
    // Refresh tokens, authorization codes and device codes (the password grant names its own codes).
    if (/PKCE/i.test(detail)) return 501481;
    if (/authorization code/.test(detail) && /consumed|already/.test(detail)) return 54005;
    if (/expired/.test(detail)) return 70008;
    if (/already used/.test(detail)) return 70000;
    return 50173;
  }
  if (error === "authorization_pending") return 70016;
  if (error === "expired_token") return 70019;
  if (error === "access_denied") return 65004;
  if (error === "invalid_scope") return 1002012;
  if (error === "invalid_target") return 500011;
  if (error === "unsupported_grant_type") return 70003;
  return status >= 500 ? 50000 : 9002313;
}

const base64url = (bytes: Buffer) => bytes.toString("base64url");

const escapeHtml = (text: string) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

/** The sign-in pages: plain forms, no script, no external resources. */
const htmlPage = (title: string, body: string) =>
  `<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head><body><h1>${escapeHtml(title)}</h1>${body}</body></html>`;

// Entra keeps assertions and tokens in its own store; oidc-provider's default memory adapter is
// module-global (shared by every server in a process) and warns on each start, so use a per-server map.
// Clients come from `clients` (oidc-provider's adapter lookup for non-static clients), so that a
// registration can change while the server runs: a changed one hashes differently and is rebuilt.
// The lookups oidc-provider needs for interactions (by uid), the device flow (by user code) and
// family revocation (every token of a grant) scan the map: a local server holds a few hundred entries.
type AdapterStore = Map<string, { model: string; payload: Record<string, unknown>; expiresAt: number }>;

function memoryAdapter(clients: Map<string, Record<string, unknown>>, store: AdapterStore) {
  return (model: string) => {
    const key = (id: string) => `${model}:${id}`;
    const live = (entry: { expiresAt: number } | undefined) => entry !== undefined && entry.expiresAt > Date.now();
    const find = async (id: string) => {
      if (model === "Client") return clients.get(id);
      const entry = store.get(key(id));
      if (entry && !live(entry)) store.delete(key(id));
      return live(entry) ? entry!.payload : undefined;
    };
    const findBy = (field: string, value: string) => {
      for (const entry of store.values()) if (entry.model === model && live(entry) && entry.payload[field] === value) return entry.payload;
      return undefined;
    };
    return {
      async upsert(id: string, payload: Record<string, unknown>, expiresIn?: number) {
        const now = Date.now();
        for (const [k, v] of store) if (v.expiresAt <= now) store.delete(k);
        store.set(key(id), { model, payload, expiresAt: expiresIn ? now + expiresIn * 1000 : Infinity });
      },
      find,
      async findByUid(uid: string) { return findBy("uid", uid); },
      async findByUserCode(userCode: string) { return findBy("userCode", userCode); },
      async consume(id: string) {
        const payload = await find(id);
        if (payload) payload.consumed = Math.floor(Date.now() / 1000);
      },
      async destroy(id: string) { store.delete(key(id)); },
      async revokeByGrantId(grantId: string) {
        for (const [k, entry] of store) if (entry.model === model && entry.payload.grantId === grantId) store.delete(k);
      },
    };
  };
}

/** A stable object id per user, like Entra's `oid`. */
const objectIdOf = (username: string) => {
  const hex = createHash("sha256").update(username.toLowerCase()).digest("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-4${hex.slice(13, 16)}-8${hex.slice(17, 20)}-${hex.slice(20, 32)}`;
};

/** A resource this server issues tokens for, under each of its names. */
interface ServedResource {
  /** The canonical name (Graph: its URI). */
  name: string;
  /** Every name a token's `aud` may carry for it. */
  audiences: string[];
  /** Application permissions consented: app-only tokens' `roles`. */
  roles: string[];
  /** Delegated permissions consented: what the password grant may put in `scp`. */
  delegatedPermissions: string[];
  /** What verifyAccessToken wants from an app-only token when no permission is named. */
  appRequirement: string[];
  /** What verifyAccessToken wants in a delegated token's `scp` when no permission is named. */
  delegatedRequirement: string;
}

/** The primary resource and Graph, looked up by any of their names (Graph's app id in any case). */
function servedResources(
  primary: string,
  primaryPermissions: { roles: string[]; delegatedPermissions: string[] },
  graph: OAuthServerOptions["graph"],
): { get(identifier: string): ServedResource | undefined } {
  const isGraph = (name: string) => name === GRAPH_RESOURCE || name.toLowerCase() === GRAPH_APP_ID;
  const main: ServedResource = {
    name: primary,
    audiences: isGraph(primary) ? [GRAPH_RESOURCE, GRAPH_APP_ID] : [primary],
    ...primaryPermissions,
    // Unchanged from before Graph was added: every configured role, or SMTP.Send.
    appRequirement: primaryPermissions.roles,
    delegatedRequirement: DELEGATED_SMTP_PERMISSION,
  };
  const graphResource: ServedResource | undefined = graph && {
    name: GRAPH_RESOURCE,
    audiences: [GRAPH_RESOURCE, GRAPH_APP_ID],
    roles: graph.roles ?? [GRAPH_MAIL_SEND],
    delegatedPermissions: graph.delegatedPermissions ?? [GRAPH_MAIL_SEND],
    appRequirement: [GRAPH_MAIL_SEND],
    delegatedRequirement: GRAPH_MAIL_SEND,
  };
  return {
    get(identifier) {
      if (identifier === primary) return main;
      if (isGraph(identifier)) return isGraph(primary) ? main : graphResource;
      return undefined;
    },
  };
}

// oidc-provider takes only absolute URIs as resource indicators (RFC 8707), while Entra also names a
// resource by its bare app id (Graph: 00000003-…/.default). Such a name travels through oidc-provider
// as this URN and is turned back into the bare id wherever it becomes a token's audience or a lookup.
const APP_ID_INDICATOR = "urn:local-entra:app-id:";
const indicatorOf = (identifier: string) => (identifier.includes(":") ? identifier : `${APP_ID_INDICATOR}${identifier}`);
const identifierOf = (indicator: string) => (indicator.startsWith(APP_ID_INDICATOR) ? indicator.slice(APP_ID_INDICATOR.length) : indicator);

/** Scopes a password-grant request may carry besides resource permissions; they add nothing here. */
const OIDC_SCOPES = new Set(["openid", "profile", "email", "offline_access"]);

export async function startOAuthServer(options: OAuthServerOptions): Promise<OAuthServer> {
  const tenant = options.tenantId ?? "local-tenant";
  const resource = options.resource ?? "https://outlook.office365.com";
  const roles = options.roles ?? ["SMTP.SendAsApp"];
  const delegatedPermissions = options.delegatedPermissions ?? ["SMTP.Send"];
  const ttl = options.accessTokenTtlSeconds ?? 3600;
  const scope = `${resource}/.default`;
  const imapDelegated = options.imap ? (options.imap.delegatedPermissions ?? [IMAP_DELEGATED_PERMISSION]) : [];
  const served = servedResources(resource, { roles, delegatedPermissions: [...new Set([...delegatedPermissions, ...imapDelegated])] }, options.graph);
  const imapAppClients = options.imap?.appClients === undefined ? undefined : new Set(options.imap.appClients);
  /** Client id -> mailboxes (lower case) its app-only tokens may open over IMAP. */
  const mailboxPermissions = new Map<string, Set<string>>();
  for (const [clientId, mailboxes] of Object.entries(options.imap?.mailboxPermissions ?? {})) {
    mailboxPermissions.set(clientId, new Set(mailboxes.map((m) => m.toLowerCase())));
  }
  const introspectPath = `/${tenant}/oauth2/v2.0/introspect`;
  const tokenPath = `/${tenant}/oauth2/v2.0/token`;
  const jwksPath = `/${tenant}/discovery/v2.0/keys`;
  const authorizePath = `/${tenant}/oauth2/v2.0/authorize`;
  const deviceCodePath = `/${tenant}/oauth2/v2.0/devicecode`;
  const verificationPath = "/devicelogin";
  const deviceInterval = options.deviceCodeIntervalSeconds ?? 5;
  const refreshTtl = options.refreshTokenTtlSeconds ?? 90 * 86_400;

  const clientMetadata = new Map<string, Record<string, unknown>>();
  const thumbprintsByClient = new Map<string, { "x5t#S256": string; x5t: string }>();
  const users = new Map<string, UserAccount & { oid: string }>();

  function registerClient(client: ClientRegistration): void {
    const common = { client_id: client.clientId, response_types: [], redirect_uris: [] };
    // A "Mobile and desktop" platform: the user signs in (code with PKCE, or device code) and the
    // app lives on rotating refresh tokens.
    const delegated = client.redirectUris === undefined
      ? { grant_types: [] as string[] }
      : {
          application_type: "native",
          // Entra registers "http://localhost"; URL form ("http://localhost/") so that the request's
          // "http://localhost:<port>/" matches it once oidc-provider drops the loopback port.
          redirect_uris: client.redirectUris.map((uri) => new URL(uri).href),
          response_types: client.redirectUris.length > 0 ? ["code"] : [],
          grant_types: [...(client.redirectUris.length > 0 ? ["authorization_code"] : []), "refresh_token", DEVICE_CODE_GRANT],
        };
    const withDelegated = (metadata: Record<string, unknown> & { grant_types: string[] }) => ({ ...metadata, ...delegated, grant_types: [...metadata.grant_types, ...delegated.grant_types] });
    thumbprintsByClient.delete(client.clientId);
    switch (client.auth) {
      case "private_key_jwt": {
        const certificate = new X509Certificate(client.certificatePem);
        thumbprintsByClient.set(client.clientId, {
          "x5t#S256": base64url(createHash("sha256").update(certificate.raw).digest()),
          x5t: base64url(createHash("sha1").update(certificate.raw).digest()),
        });
        // No `alg` on the registered key, so the same key verifies both PS256 and RS256 assertions.
        const jwk = certificate.publicKey.export({ format: "jwk" });
        clientMetadata.set(client.clientId, withDelegated({ ...common, token_endpoint_auth_method: "private_key_jwt", jwks: { keys: [jwk] }, grant_types: ["client_credentials", "password"] }));
        break;
      }
      case "client_secret_post":
      case "client_secret_basic":
        clientMetadata.set(client.clientId, withDelegated({
          ...common,
          token_endpoint_auth_method: client.auth,
          client_secret: client.secret,
          // oidc-provider refuses a client whose secret has expired; 0 means never.
          client_secret_expires_at: client.secretExpiresAt ? Math.floor(client.secretExpiresAt.getTime() / 1000) : 0,
          grant_types: ["client_credentials", "password"],
        }));
        break;
      case "none":
        clientMetadata.set(client.clientId, withDelegated({ ...common, token_endpoint_auth_method: "none", grant_types: ["password"] }));
        break;
    }
  }
  function registerUser(user: UserAccount): void {
    users.set(user.username.toLowerCase(), { ...user, oid: objectIdOf(user.username) });
  }
  if (options.clientId !== undefined && options.certificatePem !== undefined) {
    registerClient({ clientId: options.clientId, auth: "private_key_jwt", certificatePem: options.certificatePem });
  }
  for (const client of options.clients ?? []) registerClient(client);
  for (const user of options.users ?? []) registerUser(user);

  const signing = generateKeyPairSync("rsa", { modulusLength: 2048 });
  const signingKid = randomUUID();
  const signingPublicKey: KeyObject = signing.publicKey;

  const stats: OAuthServer["stats"] = { tokenRequests: 0, tokensIssued: 0, errors: [], requests: [], familiesRevoked: 0, devicePolls: [], devicePollsTooEarly: 0, introspections: [] };
  const adapterStore: AdapterStore = new Map();
  const seen = new Set<string>();
  const remember = (value: unknown) => {
    if (typeof value === "string" && value.length >= 8) seen.add(value);
  };
  /** Device flow polling state per device code: the interval in force and the last poll. */
  const devicePolling = new Map<string, { intervalMs: number; lastAt: number }>();
  let slowDownNext = false;
  let tokenDelayMs = 0;
  const injected: Array<{ status: number; body: unknown; headers?: Record<string, string> }> = [];
  const failures = new WeakMap<object, ProviderError & { registered: string | undefined; sent: SentClientAuthentication }>();
  /** Answers decided by this file's own checks: an Entra code with its text's values, or a plain OAuth error. */
  const answers = new WeakMap<object, { code: number; vars?: Record<string, string> } | { plain: true }>();

  // The issuer must contain the real port, so listen first and attach the provider afterwards.
  let handler: ((req: unknown, res: unknown) => void) | undefined;
  const server = createServer((req, res) => {
    // The sign-in and consent pages are this file's; everything else is oidc-provider's.
    if ((req.url ?? "").startsWith("/interaction/")) {
      handleInteraction(req, res).catch((error: unknown) => {
        if (!res.headersSent) res.writeHead(500, { "content-type": "text/html; charset=utf-8" });
        res.end(htmlPage("Error", `<p>${escapeHtml((error as Error).message)}</p>`));
      });
      return;
    }
    if (req.method === "POST" && (req.url ?? "").split("?")[0] === introspectPath) {
      introspect(req, res).catch((error: unknown) => {
        if (!res.headersSent) res.writeHead(500, { "content-type": "application/json" });
        res.end(JSON.stringify({ error: "server_error", error_description: (error as Error).message }));
      });
      return;
    }
    handler!(req, res);
  });
  const { origin } = await listenLoopback(server, options);
  const issuer = `${origin}/${tenant}/v2.0`;
  const tokenUrl = `${origin}${tokenPath}`;
  const userByOid = (oid: unknown) => [...users.values()].find((u) => u.oid === oid);

  /** `identifier` is the resource as the request named it: it becomes the token's audience. */
  const resourceServerInfo = (identifier: string, scopeValue: string) => ({ scope: scopeValue, audience: identifier, accessTokenTTL: ttl, accessTokenFormat: "jwt", jwt: { sign: { alg: "RS256" } } });

  /**
   * A secret client must send its secret the way it is registered. oidc-provider accepts either way
   * for both methods, so this runs once the client is authenticated: from extraTokenClaims for the
   * client credentials grant (oidc-provider's own handler, which has no earlier hook) and at the start
   * of the password grant.
   */
  function assertRegisteredSecretTransport(ctx: Ctx): void {
    const registered = ctx.oidc?.client?.clientAuthMethod;
    if (registered === undefined || !SECRET_METHODS.has(registered)) return;
    const sent = sentClientAuthentication(ctx);
    if (sent !== registered) {
      answers.set(ctx, { plain: true });
      throw new errors.InvalidClientAuth(`the client is registered for ${registered} but the request used ${sent}`);
    }
  }

  /** Throws the Entra answer `code` for this request. */
  function refuse(ctx: Ctx, code: number, error: ProviderError, vars?: Record<string, string>): never {
    answers.set(ctx, { code, ...(vars ? { vars } : {}) });
    throw error;
  }

  const provider = new Provider(issuer, {
    adapter: memoryAdapter(clientMetadata, adapterStore),
    jwks: { keys: [{ ...signing.privateKey.export({ format: "jwk" }), kid: signingKid, use: "sig", alg: "RS256" }] },
    clients: [],
    clientAuthMethods: ["private_key_jwt", "client_secret_post", "client_secret_basic", "none"],
    enabledJWA: { clientAuthSigningAlgValues: ["PS256", "RS256"] },
    routes: { token: tokenPath, jwks: jwksPath, authorization: authorizePath, device_authorization: deviceCodePath, code_verification: verificationPath },
    ttl: {
      ClientCredentials: ttl,
      AccessToken: ttl,
      IdToken: ttl,
      // Entra: codes live minutes, device codes 15 minutes, refresh tokens 90 days from their last use.
      AuthorizationCode: 600,
      DeviceCode: 900,
      RefreshToken: refreshTtl,
      Grant: refreshTtl,
      Session: refreshTtl,
      Interaction: 3600,
    },
    cookies: { keys: [randomBytes(32).toString("base64url")] },
    // Every authorization request must carry a PKCE S256 challenge (Entra requires it of public
    // clients; stricter here for confidential ones too, so the CLI's PKCE is always verified).
    pkce: { required: () => true },
    // Each redemption rotates the refresh token; a rotated-out one that comes back revokes the family.
    rotateRefreshToken: true,
    // The ID token carries the profile claims (Entra puts preferred_username in it), not only userinfo.
    conformIdTokenClaims: false,
    claims: { openid: ["sub"], profile: ["name", "preferred_username", "oid", "tid"], email: ["email"] },
    async findAccount(_ctx: unknown, sub: string) {
      const user = userByOid(sub);
      if (!user) return undefined;
      return {
        accountId: sub,
        async claims() {
          return { sub, preferred_username: user.username, name: user.username.split("@")[0], email: user.username, oid: user.oid, tid: tenant };
        },
      };
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      // Delegated tokens are for the resource named in the scope, never userinfo tokens.
      userinfo: { enabled: false },
      deviceFlow: {
        enabled: true,
        charset: "base-20",
        mask: "****-****",
        async userCodeInputSource(ctx: Ctx, form: string, _out: unknown, err?: { userCode?: string; name?: string }) {
          ctx.body = htmlPage("Enter code", `${err ? `<p class="error">${err.userCode || err.name === "NoCodeError" ? "That code is not valid. Check it and try again." : "There was an error processing your request."}</p>` : "<p>Enter the code shown on your device.</p>"}${form}<button type="submit" form="op.deviceInputForm">Next</button>`);
        },
        async userCodeConfirmSource(ctx: Ctx, form: string, client: { clientId: string }, _deviceInfo: unknown, userCode: string) {
          ctx.body = htmlPage("Confirm", `<p>Sign in to ${escapeHtml(client.clientId)} with code <code>${escapeHtml(userCode)}</code>?</p>${form}<button type="submit" form="op.deviceConfirmForm">Continue</button>`);
        },
        async successSource(ctx: Ctx) {
          ctx.body = htmlPage("Signed in", "<p>You have signed in to the application on your device. You may now close this window.</p>");
        },
      },
      resourceIndicators: {
        enabled: true,
        // Microsoft names the resource inside the scope ("<resource>/.default", "<resource>/SMTP.Send")
        // rather than with RFC 8707's `resource` parameter: derive it from there so oidc-provider
        // issues an audience-restricted JWT.
        async defaultResource(ctx: { oidc: { route?: string; params: { scope?: string; grant_type?: string } } }, _client: unknown, oneOf?: string[]) {
          if (oneOf) return oneOf;
          const items = (ctx.oidc.params.scope ?? "").split(" ").filter(Boolean);
          if (ctx.oidc.route === "token" && ctx.oidc.params.grant_type === "client_credentials") {
            const requested = items.filter((s) => s.endsWith("/.default"));
            if (requested.length !== 1) {
              throw new errors.InvalidScope("scope must be exactly one <resource>/.default value", ctx.oidc.params.scope);
            }
            return indicatorOf(requested[0]!.slice(0, -"/.default".length));
          }
          // Delegated (sign-in, device code, refresh): the one resource the permissions name; none
          // at a code or device-code redemption, which uses the resource of the grant.
          const named = [...new Set(items.filter((s) => !OIDC_SCOPES.has(s) && s.lastIndexOf("/") > 0).map((s) => s.slice(0, s.lastIndexOf("/"))))];
          if (named.length > 1) throw new errors.InvalidScope(`scope names more than one resource (${named.join(", ")})`, ctx.oidc.params.scope);
          return named.length === 1 ? indicatorOf(named[0]!) : undefined;
        },
        // The resource server's scope is what lets the (non-OIDC) ".default" scope, and the delegated
        // permissions consented for the resource, through into the token.
        async getResourceServerInfo(_ctx: unknown, indicator: string) {
          const identifier = identifierOf(indicator);
          const target = served.get(identifier);
          if (!target) throw new errors.InvalidTarget(`resource ${identifier} is not served here`);
          return resourceServerInfo(identifier, [".default", ...target.delegatedPermissions].map((p) => `${identifier}/${p}`).join(" "));
        },
        async useGrantedResource() {
          return false;
        },
      },
    },
    // App-only tokens from Entra carry roles and appid and no scope claim (Exchange reads roles);
    // delegated ones carry scp and the user (upn, unique_name, oid) and no roles.
    async extraTokenClaims(ctx: Ctx, token: { clientId: string; gty?: string; accountId?: string; resourceServer?: { identifier(): string } }) {
      if (token.gty === "password") {
        const user = [...users.values()].find((u) => u.oid === token.accountId);
        const scp = String((token as { scope?: string }).scope ?? "");
        return { scp, upn: user?.username, unique_name: user?.username, oid: token.accountId, appid: token.clientId, azp: token.clientId, tid: tenant };
      }
      if (token.accountId !== undefined) {
        // A signed-in user (authorization code, device code, refresh token): `scp` holds the
        // permissions without their resource prefix, ".default" standing for all consented ones.
        assertRegisteredSecretTransport(ctx);
        const user = userByOid(token.accountId);
        const target = served.get(identifierOf(token.resourceServer?.identifier() ?? resource));
        const permissions = String((token as { scope?: string }).scope ?? "").split(" ").filter((item) => item && !OIDC_SCOPES.has(item)).flatMap((item) => {
          const permission = item.slice(item.lastIndexOf("/") + 1);
          return permission === ".default" ? (target?.delegatedPermissions ?? []) : [permission];
        });
        return { scp: [...new Set(permissions)].join(" "), upn: user?.username, unique_name: user?.username, oid: token.accountId, appid: token.clientId, azp: token.clientId, tid: tenant };
      }
      assertRegisteredSecretTransport(ctx);
      // The application permissions consented for the resource this token is for.
      const target = served.get(identifierOf(token.resourceServer?.identifier() ?? resource));
      const imapRole = options.imap !== undefined && target === served.get(resource) && (imapAppClients === undefined || imapAppClients.has(token.clientId));
      return { roles: [...(target?.roles ?? roles), ...(imapRole ? [IMAP_APP_PERMISSION] : [])], appid: token.clientId, azp: token.clientId, tid: tenant };
    },
    formats: {
      customizers: {
        jwt(_ctx: unknown, _token: unknown, jwt: { payload: Record<string, unknown> }) {
          delete jwt.payload.scope;
        },
      },
    },
    // Runs after oidc-provider's own checks (signature, iss, exp, aud), before the jti is spent.
    async assertJwtClientAuthClaimsAndHeader(_ctx: unknown, claims: { aud?: unknown }, header: Record<string, unknown>, client: { clientId: string }) {
      // oidc-provider also accepts the issuer as aud (RFC 7523); Entra documents only the token URL.
      if (![claims.aud].flat().includes(tokenUrl)) {
        throw new errors.InvalidClientAuth(`audience (aud) must be the token endpoint ${tokenUrl}`);
      }
      // Entra picks the certificate by the header thumbprint; a wrong one is AADSTS700027 even when the
      // signature would verify.
      const thumbprints = thumbprintsByClient.get(client.clientId);
      const sent = (["x5t#S256", "x5t"] as const).filter((name) => header[name] !== undefined);
      if (sent.length === 0) throw new errors.InvalidClientAuth("the key was not found: no x5t#S256 or x5t header");
      for (const name of sent) {
        if (header[name] !== thumbprints?.[name]) {
          throw new errors.InvalidClientAuth(`the key was not found: ${name} '${String(header[name])}' is not a registered certificate thumbprint`);
        }
      }
    },
    clientBasedCORS: () => false,
    renderError(ctx: Ctx, out: unknown) {
      ctx.body = out;
    },
  });

  // The resource owner password credentials grant (RFC 6749 4.3), as Entra's v2 endpoint does it:
  // client authentication (a secret for confidential clients, none for public ones) has already run;
  // this checks the user and the delegated scope and issues a JWT access token for the resource.
  provider.registerGrantType(
    "password",
    async (ctx: Ctx) => {
      assertRegisteredSecretTransport(ctx);
      const params = (ctx.oidc?.params ?? {}) as { username?: string; password?: string; scope?: string };
      const client = ctx.oidc!.client!;
      for (const parameter of ["username", "password", "scope"] as const) {
        if (!params[parameter]) refuse(ctx, 900144, new errors.InvalidRequest(`missing ${parameter}`), { parameter });
      }
      // "<resource>/<permission>" items (or "<resource>/.default" for every consented permission).
      const requested = params.scope!.split(" ").filter((s) => s && !OIDC_SCOPES.has(s)).map((item) => {
        const slash = item.lastIndexOf("/");
        return { item, resource: slash > 0 ? item.slice(0, slash) : "", permission: slash > 0 ? item.slice(slash + 1) : item };
      });
      // The resource the user signs in to (named in MFA answers): the first one the scope names.
      const identifier = requested.find((r) => r.resource)?.resource ?? resource;

      const user = users.get(params.username!.toLowerCase());
      if (!user) refuse(ctx, 50034, new errors.InvalidGrant("unknown user"), { user: params.username! });
      if (user.password !== params.password) refuse(ctx, 50126, new errors.InvalidGrant("wrong password"));
      if (user.mfa === "required") refuse(ctx, 50076, new errors.InvalidGrant("the user must complete multi-factor authentication"), { resource: identifier });
      if (user.mfa === "registration") refuse(ctx, 50079, new errors.InvalidGrant("the user must register for multi-factor authentication"), { resource: identifier });

      const granted = new Set<string>();
      for (const { item, resource: itemResource, permission } of requested) {
        const target = served.get(itemResource);
        if (!target) refuse(ctx, itemResource ? 500011 : 70011, itemResource ? new errors.InvalidTarget(`resource ${itemResource} is not served here`) : new errors.InvalidScope(`scope ${item} names no resource`, item), { scope: item });
        if (target.name !== served.get(identifier)!.name) refuse(ctx, 28000, new errors.InvalidScope(`scope names more than one resource (${identifier}, ${itemResource})`, item), { scope: params.scope! });
        if (permission === ".default") target.delegatedPermissions.forEach((p) => granted.add(p));
        else if (target.delegatedPermissions.includes(permission)) granted.add(permission);
        else refuse(ctx, 65001, new errors.InvalidGrant(`delegated permission ${permission} is not consented`));
      }
      if (granted.size === 0) refuse(ctx, 70011, new errors.InvalidScope("no resource permission requested", params.scope!), { scope: params.scope! });

      const token = new provider.AccessToken({ accountId: user.oid, client, gty: "password", scope: [...granted].join(" ") });
      token.resourceServer = new provider.ResourceServer(identifier, resourceServerInfo(identifier, [...granted].join(" ")));
      ctx.oidc!.entity("AccessToken", token);
      const accessToken = await token.save();
      ctx.body = { access_token: accessToken, token_type: "Bearer", expires_in: token.expiration, scope: [...granted].map((p) => `${identifier}/${p}`).join(" ") };
    },
    ["username", "password", "scope"],
  );

  provider.on("grant.error", (ctx: Ctx, err: ProviderError) => {
    failures.set(ctx, { ...err, message: err.message, registered: ctx.oidc?.client?.clientAuthMethod, sent: sentClientAuthentication(ctx) });
    stats.errors.push({ error: err.error ?? err.message, detail: err.error_detail ?? err.error_description });
  });
  // Reuse of a rotated-out refresh token: oidc-provider destroyed the grant and all its tokens.
  provider.on("grant.revoked", () => {
    stats.familiesRevoked++;
  });
  provider.on("server_error", (ctx: Ctx, err: ProviderError) => {
    failures.set(ctx, { ...err, message: err.message, registered: ctx.oidc?.client?.clientAuthMethod, sent: sentClientAuthentication(ctx) });
    stats.errors.push({ error: "server_error", detail: err.message });
  });

  // Runs around oidc-provider's router: injected failures, stats, and Microsoft-shaped response bodies.
  provider.use(async (ctx: Ctx, next: () => Promise<void>) => {
    if (ctx.method === "GET" && ctx.path === authorizePath) {
      // Entra issues a refresh token for offline_access without prompt=consent; oidc-provider
      // (following OpenID Connect) drops offline_access unless consent is prompted. Native clients
      // are always asked for consent here anyway, so asking for it changes nothing else.
      const requested = String(ctx.query.scope ?? "").split(" ");
      if (requested.includes("offline_access") && ctx.query.prompt === undefined) ctx.query = { ...ctx.query, prompt: "consent" };
      return next();
    }
    if (ctx.method === "POST" && ctx.path === deviceCodePath) {
      await next();
      const body = ctx.body as Record<string, unknown> | undefined;
      if (ctx.status === 200 && typeof body?.device_code === "string") {
        remember(body.device_code);
        devicePolling.set(body.device_code, { intervalMs: deviceInterval * 1000, lastAt: Date.now() });
        // Microsoft's shape: the interval to poll at and a message for the user.
        ctx.body = { ...body, interval: deviceInterval, message: `To sign in, use a web browser to open the page ${String(body.verification_uri)} and enter the code ${String(body.user_code)} to authenticate.` };
      }
      return;
    }
    if (ctx.method !== "POST" || ctx.path !== tokenPath) return next();
    stats.tokenRequests++;
    const injection = injected.shift();
    if (injection) {
      ctx.status = injection.status;
      ctx.body = injection.body;
      if (injection.headers) ctx.set(injection.headers);
      const body = injection.body as { error?: unknown } | null;
      stats.errors.push({ error: typeof body?.error === "string" ? body.error : "injected", detail: `injected HTTP ${injection.status}` });
      return;
    }
    if (tokenDelayMs > 0) await new Promise((resolve) => setTimeout(resolve, tokenDelayMs));
    await next();
    const form = ctx.oidc?.body ?? {};
    const field = (name: string) => (typeof form[name] === "string" ? (form[name] as string) : undefined);
    for (const name of ["code", "code_verifier", "refresh_token", "device_code", "client_secret", "client_assertion", "password"]) remember(field(name));
    const answered = ctx.body as Record<string, unknown> | undefined;
    for (const name of ["access_token", "refresh_token", "id_token"]) remember(answered?.[name]);
    const slowedDown = field("grant_type") === DEVICE_CODE_GRANT && devicePoll(ctx, field("device_code"));
    stats.requests.push({
      grantType: field("grant_type"),
      clientId: ctx.oidc?.client?.clientId ?? field("client_id"),
      clientAuthentication: sentClientAuthentication(ctx),
      fields: Object.keys(form).sort(),
      ...(field("grant_type") === "password" && field("username") !== undefined ? { username: field("username") } : {}),
      ...(field("scope") !== undefined ? { scope: field("scope") } : {}),
      status: ctx.status,
    });
    // slow_down is RFC 8628's plain answer (Entra has no AADSTS code for it).
    if (slowedDown) return;
    const body = ctx.body as Record<string, unknown> | undefined;
    if (ctx.status === 200 && typeof body?.access_token === "string") {
      stats.tokensIssued++;
      ctx.body = {
        token_type: body.token_type,
        ...(body.scope === undefined ? {} : { scope: body.scope }),
        expires_in: body.expires_in,
        ext_expires_in: body.expires_in,
        access_token: body.access_token,
        ...(typeof body.refresh_token === "string" ? { refresh_token: body.refresh_token } : {}),
        ...(typeof body.id_token === "string" ? { id_token: body.id_token } : {}),
      };
    } else if (typeof body?.error === "string") {
      const failure = failures.get(ctx);
      const detail = failure?.error_detail ?? String(body.error_description ?? "");
      const answer = answers.get(ctx);
      if (answer && "plain" in answer) {
        ctx.body = { error: body.error, error_description: `${String(body.error_description ?? body.error)}: ${detail}` };
        return;
      }
      const code = answer?.code ?? aadstsCode(body.error, detail, ctx.status, { registered: failure?.registered, sent: failure?.sent ?? "none" });
      const vars: Record<string, string> = { client: ctx.oidc?.client?.clientId ?? field("client_id") ?? "", tenant, ...(answer?.vars ?? {}) };
      // Entra answers invalid_client with 401 (oidc-provider says 400 for an expired secret).
      if (body.error === "invalid_client") ctx.status = 401;
      const traceId = randomUUID();
      const correlationId = randomUUID();
      const timestamp = new Date().toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
      const text = AADSTS_TEXT[code]!.replace(/\{(\w+)\}/g, (_, name: string) => vars[name] ?? "");
      ctx.body = {
        error: body.error,
        error_description: `AADSTS${code}: ${text} [Reason - ${detail}] Trace ID: ${traceId} Correlation ID: ${correlationId} Timestamp: ${timestamp}`,
        error_codes: [code],
        timestamp,
        trace_id: traceId,
        correlation_id: correlationId,
        ...(AADSTS_SUBERROR[code] ? { suberror: AADSTS_SUBERROR[code] } : {}),
      };
    }
  });

  /**
   * RFC 8628 3.5 for one device-code poll, after oidc-provider answered it: a poll sooner than the
   * interval in force (or any, after slowDownNextDevicePoll) that would be told authorization_pending
   * is told slow_down instead, and the interval grows by 5 s. True when the answer was replaced.
   */
  function devicePoll(ctx: Ctx, deviceCode: string | undefined): boolean {
    const now = Date.now();
    const polling = deviceCode === undefined ? undefined : devicePolling.get(deviceCode);
    // 250 ms of slack for timers and the round trip.
    const early = polling !== undefined && now - polling.lastAt < polling.intervalMs - 250;
    if (polling) polling.lastAt = now;
    const error = (ctx.body as { error?: unknown } | undefined)?.error;
    if (polling && error === "authorization_pending" && (early || slowDownNext)) {
      slowDownNext = false;
      polling.intervalMs += 5_000;
      ctx.status = 400;
      ctx.body = { error: "slow_down", error_description: `The client is polling too quickly: wait at least ${polling.intervalMs / 1000} s between requests.` };
      // oidc-provider recorded the pending answer it gave; the client got this one.
      const last = stats.errors[stats.errors.length - 1];
      if (last?.error === "authorization_pending") stats.errors[stats.errors.length - 1] = { error: "slow_down", detail: early ? "polled too early" : "slowDownNextDevicePoll" };
      stats.devicePolls.push({ at: now, answer: "slow_down" });
      return true;
    }
    if (early && ctx.status === 200) stats.devicePollsTooEarly++;
    stats.devicePolls.push({ at: now, answer: ctx.status === 200 ? "issued" : typeof error === "string" ? error : String(ctx.status) });
    return false;
  }

  handler = provider.callback();

  /** See OAuthServer.verifyAccessToken. */
  async function verifyAccessToken(token: string, user?: string, forResource = resource, permission?: string): Promise<AccessTokenCheck> {
    const target = served.get(forResource);
    if (!target) return { ok: false, problem: "audience", reason: `resource ${forResource} is not served by this token issuer` };
    let claims: Record<string, unknown>;
    try {
      ({ payload: claims } = await jwtVerify(token, signingPublicKey, { issuer, audience: target.audiences, algorithms: ["RS256"] }));
    } catch (err) {
      const { code, claim } = err as { code?: string; claim?: string };
      const problem: AccessTokenProblem = code === "ERR_JWT_EXPIRED" ? "expired" : code === "ERR_JWT_CLAIM_VALIDATION_FAILED" && claim === "aud" ? "audience" : "invalid";
      return { ok: false, problem, reason: `access token rejected: ${(err as Error).message}` };
    }
    if (typeof claims.scp === "string") {
      // Exchange and Graph take a delegated token only for the mailbox of the user it was issued to.
      const needed = permission ?? target.delegatedRequirement;
      if (!claims.scp.split(" ").includes(needed)) return { ok: false, problem: "permission", reason: `delegated token lacks ${needed} (scp "${claims.scp}")` };
      const tokenUser = typeof claims.upn === "string" ? claims.upn : typeof claims.preferred_username === "string" ? claims.preferred_username : undefined;
      if (tokenUser === undefined) return { ok: false, problem: "user", reason: "delegated token names no user (upn)" };
      if (user === undefined) return { ok: false, problem: "user", reason: `delegated token for ${tokenUser}, but no mailbox was given to compare` };
      if (tokenUser.toLowerCase() !== user.toLowerCase()) return { ok: false, problem: "user", reason: `delegated token is for ${tokenUser}, not ${user}` };
      return { ok: true, claims };
    }
    const granted = Array.isArray(claims.roles) ? claims.roles : [];
    const missing = (permission === undefined ? target.appRequirement : [permission]).filter((role) => !granted.includes(role));
    if (missing.length > 0) return { ok: false, problem: "permission", reason: `access token lacks role(s) ${missing.join(", ")}` };
    return { ok: true, claims };
  }

  /**
   * RFC 7662 introspection for an IMAP server: the token must pass verifyAccessToken for the primary
   * resource with the IMAP permission of its kind; the answer lists the mailboxes it may open.
   */
  async function introspect(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const token = new URLSearchParams(Buffer.concat(chunks).toString("utf8")).get("token") ?? "";
    const answer = (body: Record<string, unknown>, record: IntrospectionRecord) => {
      stats.introspections.push(record);
      res.writeHead(200, { "content-type": "application/json", "cache-control": "no-store" });
      res.end(JSON.stringify(body));
    };
    let unverified: Record<string, unknown>;
    try {
      unverified = decodeJwt(token);
    } catch {
      return answer({ active: false }, { active: false, reason: "not a JWT" });
    }
    const delegated = typeof unverified.scp === "string";
    const upn = typeof unverified.upn === "string" ? unverified.upn : undefined;
    const check = await verifyAccessToken(token, upn, resource, delegated ? IMAP_DELEGATED_PERMISSION : IMAP_APP_PERMISSION);
    const clientId = typeof unverified.azp === "string" ? unverified.azp : typeof unverified.appid === "string" ? unverified.appid : undefined;
    if (!check.ok) return answer({ active: false }, { active: false, ...(clientId ? { clientId } : {}), reason: check.reason });
    const claims = check.claims;
    const mailboxes = delegated ? [String(claims.upn).toLowerCase()] : [...(mailboxPermissions.get(String(claims.azp)) ?? [])];
    answer(
      {
        active: true,
        token_type: "Bearer",
        client_id: claims.azp,
        scope: delegated ? claims.scp : (claims.roles as string[]).join(" "),
        username: delegated ? claims.upn : claims.azp,
        sub: claims.sub,
        exp: claims.exp,
        iss: claims.iss,
        mailboxes: `,${mailboxes.join(",")},`,
      },
      { active: true, clientId: String(claims.azp) },
    );
  }

  /** A page of the sign-in: always HTML, never cached. */
  function sendPage(res: ServerResponse, status: number, title: string, body: string): void {
    res.writeHead(status, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
    res.end(htmlPage(title, body));
  }

  async function formOf(req: IncomingMessage): Promise<URLSearchParams> {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    return new URLSearchParams(Buffer.concat(chunks).toString("utf8"));
  }

  const loginForm = (uid: string, problem?: string) =>
    `${problem ? `<p class="error">${escapeHtml(problem)}</p>` : ""}<form id="login" method="post" action="/interaction/${uid}/login"><input type="email" name="username" autocomplete="username"><input type="password" name="password" autocomplete="current-password"><button type="submit">Sign in</button></form>`;

  /**
   * The interactions oidc-provider hands over (interactions.url): sign-in, then consent. The login
   * checks the user's password (no MFA prompt: an interactive sign-in can satisfy it); consent
   * grants what was asked for that the resource offers, or declines (AADSTS65004).
   */
  async function handleInteraction(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const [, , uid = "", action] = new URL(req.url ?? "/", origin).pathname.split("/");
    let details: {
      uid: string;
      prompt: { name: string; details: { missingOIDCScope?: string[]; missingOIDCClaims?: string[]; missingResourceScopes?: Record<string, string[]> } };
      params: { client_id?: string; scope?: string };
      session?: { accountId?: string };
      grantId?: string;
    };
    try {
      details = await provider.interactionDetails(req, res);
    } catch (error) {
      return sendPage(res, 400, "Sign-in expired", `<p>${escapeHtml((error as Error).message)}. Start the sign-in again.</p>`);
    }
    if (details.uid !== uid) return sendPage(res, 400, "Sign-in expired", "<p>This page belongs to another sign-in. Start the sign-in again.</p>");
    if (req.method === "GET") {
      if (details.prompt.name === "login") return sendPage(res, 200, "Sign in", loginForm(uid));
      const wanted = [...(details.prompt.details.missingOIDCScope ?? []), ...Object.values(details.prompt.details.missingResourceScopes ?? {}).flat()];
      return sendPage(res, 200, "Permissions requested", `<p>${escapeHtml(details.params.client_id ?? "")} would like to:</p><ul>${wanted.map((w) => `<li>${escapeHtml(w)}</li>`).join("")}</ul><form id="accept" method="post" action="/interaction/${uid}/consent"><input type="hidden" name="decision" value="accept"><button type="submit">Accept</button></form><form id="decline" method="post" action="/interaction/${uid}/consent"><input type="hidden" name="decision" value="decline"><button type="submit">Cancel</button></form>`);
    }
    if (req.method === "POST" && action === "login") {
      const form = await formOf(req);
      remember(form.get("password"));
      const user = users.get((form.get("username") ?? "").toLowerCase());
      if (!user || user.password !== form.get("password")) return sendPage(res, 200, "Sign in", loginForm(uid, "Your account or password is incorrect."));
      return provider.interactionFinished(req, res, { login: { accountId: user.oid } }, { mergeWithLastSubmission: false });
    }
    if (req.method === "POST" && action === "consent") {
      const form = await formOf(req);
      if (form.get("decision") !== "accept") {
        return provider.interactionFinished(req, res, { error: "access_denied", error_description: `AADSTS65004: ${AADSTS_TEXT[65004]}` }, { mergeWithLastSubmission: false });
      }
      const grant = details.grantId ? await provider.Grant.find(details.grantId) : new provider.Grant({ accountId: details.session?.accountId, clientId: details.params.client_id });
      const missing = details.prompt.details;
      if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(" "));
      if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
      for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) grant.addResourceScope(indicator, scopes.join(" "));
      const grantId: string = await grant.save();
      return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    }
    return sendPage(res, 404, "Not found", "<p>No such page.</p>");
  }

  /** The user's live entries of one model in the store. */
  const entriesOf = (model: string, oid: string) => [...adapterStore.values()].filter((e) => e.model === model && e.expiresAt > Date.now() && e.payload.accountId === oid);

  return {
    issuer,
    tokenUrl,
    jwksUrl: `${origin}${jwksPath}`,
    scope,
    delegatedScope: `${resource}/${DELEGATED_SMTP_PERMISSION}`,
    graphScope: `${GRAPH_RESOURCE}/.default`,
    graphDelegatedScope: `${GRAPH_RESOURCE}/${GRAPH_MAIL_SEND}`,
    verifyAccessToken,
    introspectionUrl: `${origin}${introspectPath}`,
    addMailboxPermission(clientId, mailbox) {
      const granted = mailboxPermissions.get(clientId) ?? new Set<string>();
      granted.add(mailbox.toLowerCase());
      mailboxPermissions.set(clientId, granted);
    },
    removeMailboxPermission(clientId, mailbox) {
      mailboxPermissions.get(clientId)?.delete(mailbox.toLowerCase());
    },
    authorizeUrl: `${origin}${authorizePath}`,
    deviceCodeUrl: `${origin}${deviceCodePath}`,
    verificationUrl: `${origin}${verificationPath}`,
    delegatedRefreshScope: `${resource}/${DELEGATED_SMTP_PERMISSION} offline_access`,
    async issueRefreshToken(clientId, username, scopeValue) {
      const user = users.get(username.toLowerCase());
      if (!user) throw new Error(`issueRefreshToken: no user ${username}`);
      const client = await provider.Client.find(clientId);
      if (!client) throw new Error(`issueRefreshToken: no client ${clientId}`);
      const items = scopeValue.split(" ").filter(Boolean);
      if (!items.includes("offline_access")) throw new Error("issueRefreshToken: the scope must include offline_access");
      const permissions = items.filter((item) => !OIDC_SCOPES.has(item));
      const named = [...new Set(permissions.map((item) => item.slice(0, item.lastIndexOf("/"))))];
      if (named.length !== 1 || !served.get(named[0]!)) throw new Error(`issueRefreshToken: the scope must name one resource served here, got ${scopeValue}`);
      const indicator = indicatorOf(named[0]!);
      // What the consent page would have stored, then the refresh token a code redemption issues.
      const grant = new provider.Grant({ accountId: user.oid, clientId });
      grant.addOIDCScope(items.filter((item) => OIDC_SCOPES.has(item)).join(" "));
      grant.addResourceScope(indicator, permissions.join(" "));
      const grantId: string = await grant.save();
      const refreshToken = new provider.RefreshToken({ accountId: user.oid, client, grantId, gty: "authorization_code", scope: items.join(" "), resource: indicator, authTime: Math.floor(Date.now() / 1000) });
      const value: string = await refreshToken.save();
      remember(value);
      return value;
    },
    revokeUserGrants(username) {
      const user = users.get(username.toLowerCase());
      if (!user) return;
      for (const [key, entry] of adapterStore) if (entry.payload.accountId === user.oid) adapterStore.delete(key);
    },
    refreshTokenFamilies(username, clientId) {
      const user = users.get(username.toLowerCase());
      if (!user) return 0;
      const grants = new Set(entriesOf("Grant", user.oid).filter((e) => clientId === undefined || e.payload.clientId === clientId).map((e) => e.payload.jti));
      return new Set(entriesOf("RefreshToken", user.oid).filter((e) => !e.payload.consumed && grants.has(e.payload.grantId)).map((e) => e.payload.grantId)).size;
    },
    slowDownNextDevicePoll() {
      slowDownNext = true;
    },
    delayTokenResponses(ms) {
      tokenDelayMs = ms;
    },
    secretsSeen() {
      return [...seen];
    },
    registerClient,
    registerUser,
    stats,
    resetStats() {
      stats.tokenRequests = 0;
      stats.tokensIssued = 0;
      stats.errors.length = 0;
      stats.requests.length = 0;
      stats.familiesRevoked = 0;
      stats.devicePolls.length = 0;
      stats.devicePollsTooEarly = 0;
      stats.introspections.length = 0;
    },
    failNext(count, status, body, headers) {
      for (let i = 0; i < count; i++) injected.push({ status, body, headers });
    },
    close() {
      return new Promise<void>((resolve, reject) => {
        server.close((err) => (err ? reject(err) : resolve()));
        server.closeAllConnections();
      });
    },
  };
}
