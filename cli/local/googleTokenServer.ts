// A local stand-in for Google's OAuth 2.0 token endpoint (https://oauth2.googleapis.com/token) as a
// Workspace service account with domain-wide delegation meets it: the RFC 7523 JWT bearer grant
// (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<jwt>`), no client
// authentication, the service account named only by the assertion's `iss`. It also serves the
// public X.509 certificates Google publishes per service account
// (/robot/v1/metadata/x509/<client_email>, the key JSON's `client_x509_cert_url`), whose notBefore
// is the key's creation time: the expiry watch reads key ages from there.
//
// oidc-provider does the OAuth server work: the token endpoint, grant dispatch through
// `registerGrantType`, error rendering, and the access token (its AccessToken model in JWT format,
// signed with its own key, `sub` = the impersonated user). What oidc-provider cannot do by itself:
// - A token request without a client. Its token endpoint resolves a client (client_id, HTTP Basic
//   or client_assertion) before any grant handler runs and answers "no client authentication
//   mechanism provided" otherwise; Google's request carries none. So a middleware in front reads
//   the form, maps the assertion's `iss` to that service account's client (token_endpoint_auth_method
//   "none", served by the adapter) and hands oidc-provider the form with `client_id` added, on
//   `req.body` (oidc-provider's documented path for an upstream body parser; it prints one
//   "already parsed request body" warning per process).
// - Verifying the assertion. RFC 7523 grants are not built in; the handler below verifies it with
//   jose against the service account's public key picked by `kid`.
//
// Checks, in this order, each answered with Google's error body:
//   unknown iss                                 invalid_grant  "Invalid grant: account not found"
//   unknown kid (deleted key) or bad signature  invalid_grant  "Invalid JWT Signature."
//   exp - iat > 3600, expired, iat in future    invalid_grant  "Invalid JWT: Token must be a short-lived token (60 minutes) ..."
//   aud is not this token URL                   invalid_grant  "Invalid JWT: Failed audience check. ..."
//   no scope claim / unknown scope              invalid_scope
//   sub not a user of the Workspace domain      invalid_grant  "Invalid email or User ID"
//   no domain-wide delegation for all scopes    unauthorized_client (HTTP 401)
// Choices where Google documents nothing: a clock skew of 300 s is tolerated; without `kid`, every
// key of the service account is tried (Google's guide shows assertions without one).
import { listenLoopback } from "./listenLoopback.js";
import { createPublicKey, generateKeyPairSync, randomBytes, randomInt, randomUUID } from "node:crypto";
import type { KeyObject } from "node:crypto";
import { createServer, type IncomingMessage } from "node:http";
import { compactVerify, decodeJwt, decodeProtectedHeader, jwtVerify } from "jose";
import forge from "node-forge";
// @ts-ignore -- oidc-provider ships no types (see oauthServer.ts).
import Provider, { errors } from "oidc-provider";

export const GOOGLE_MAIL_SCOPE = "https://mail.google.com/";
export const JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/** Google's limit on an assertion's lifetime. */
export const MAX_ASSERTION_LIFETIME_SECONDS = 3600;
const CLOCK_SKEW_SECONDS = 300;
/** What Google puts in validBeforeTime (and the certificate's notAfter) of a key that never expires. */
const NEVER = new Date("9999-12-31T23:59:59Z");

/** A service account JSON key, field for field as IAM's "Add key > Create new key > JSON" writes it. */
export interface GoogleServiceAccountKeyJson {
  type: "service_account";
  project_id: string;
  private_key_id: string;
  private_key: string;
  client_email: string;
  client_id: string;
  auth_uri: string;
  token_uri: string;
  auth_provider_x509_cert_url: string;
  client_x509_cert_url: string;
  universe_domain: string;
}

export interface GoogleTokenServerOptions {
  /** The Workspace domain's users (primary addresses): the only valid `sub` values. */
  users: string[];
  /** Default "queue-mailer-local". */
  projectId?: string;
  /** Default 3600, like Google's. */
  accessTokenTtlSeconds?: number;
  host?: string;
  port?: number;
}

export type GoogleAccessTokenCheck = { ok: true; claims: Record<string, unknown> } | { ok: false; reason: string };

/** What a token request carried, decoded (never the signed JWT itself). */
export interface ReceivedAssertion {
  header: Record<string, unknown>;
  claims: Record<string, unknown>;
  /** The form fields' names, e.g. ["grant_type", "assertion"]. */
  formFields: string[];
}

export interface GoogleTokenServer {
  /** http://host:port/token */
  tokenUrl: string;
  issuer: string;
  /** A new service account (no keys, no delegation yet). */
  createServiceAccount(name?: string): { clientEmail: string; clientId: string };
  /** A new RSA 2048 key for the service account, trusted at once. `createdAt` backdates it (age tests). */
  createKey(clientEmail: string, options?: { createdAt?: Date; expiresAt?: Date }): GoogleServiceAccountKeyJson;
  /** As in the Cloud console: the key stops working and disappears from the published certificates. */
  deleteKey(privateKeyId: string): void;
  /** Domain-wide delegation (Admin console > Security > API controls): client ID → scopes. */
  delegate(clientId: string, scopes: string[]): void;
  revokeDelegation(clientId: string): void;
  /** Pretend Google's clock differs from ours by this many seconds (clock-skew errors). */
  setClockOffset(seconds: number): void;
  /** Signature, issuer, expiry, `sub` = the XOAUTH2 user, scope includes https://mail.google.com/. */
  verifyAccessToken(token: string, user: string): Promise<GoogleAccessTokenCheck>;
  stats: { tokenRequests: number; tokensIssued: number; certificateRequests: number; errors: Array<{ error: string; description: string; detail?: string }>; assertions: ReceivedAssertion[] };
  resetStats(): void;
  close(): Promise<void>;
}

interface ServiceAccountKey {
  publicKey: KeyObject;
  certificatePem: string;
}

interface ServiceAccount {
  clientEmail: string;
  clientId: string;
  keys: Map<string, ServiceAccountKey>;
}

// The slice of Koa's context and oidc-provider's objects this file touches (the package has no types).
interface Ctx {
  method: string;
  path: string;
  status: number;
  body: unknown;
  req: IncomingMessage & { body?: Record<string, string> };
  oidc: { params: Record<string, string | undefined>; client: { clientId: string }; provider: { AccessToken: new (init: Record<string, unknown>) => { save(): Promise<string>; expiration: number } } };
}

/** Google's error bodies, verbatim. */
const GOOGLE_ERRORS = {
  accountNotFound: ["invalid_grant", "Invalid grant: account not found"],
  signature: ["invalid_grant", "Invalid JWT Signature."],
  timeframe: ["invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim."],
  badUser: ["invalid_grant", "Invalid email or User ID"],
  noScope: ["invalid_scope", "Empty or missing scope not allowed."],
  badScope: ["invalid_scope", "Invalid OAuth scope or ID token audience provided."],
  unauthorizedClient: ["unauthorized_client", "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested."],
} as const;

function googleError([error, description]: readonly [string, string], detail: string, status = 400): Error {
  const failure = new errors.CustomOIDCProviderError(error, description, { detail }) as Error & { status: number; statusCode: number };
  failure.status = failure.statusCode = status;
  return failure;
}

/** A self-signed certificate for the key, as Google publishes it: notBefore = creation, notAfter = validBeforeTime. */
function publishedCertificate(publicKeyPem: string, privateKeyPem: string, commonName: string, notBefore: Date, notAfter: Date): string {
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.publicKeyFromPem(publicKeyPem);
  cert.serialNumber = "01" + randomBytes(15).toString("hex");
  cert.validity.notBefore = notBefore;
  cert.validity.notAfter = notAfter;
  const subject = [{ name: "commonName", value: commonName }];
  cert.setSubject(subject);
  cert.setIssuer(subject);
  cert.sign(forge.pki.privateKeyFromPem(privateKeyPem) as forge.pki.rsa.PrivateKey, forge.md.sha256.create());
  return forge.pki.certificateToPem(cert);
}

// Access tokens here are JWTs that nobody looks up again, so nothing needs storing; oidc-provider's
// default in-memory adapter would be shared by every provider in the process and warns on start.
function nullAdapter() {
  return {
    async upsert() {},
    async find() { return undefined; },
    async findByUid() { return undefined; },
    async findByUserCode() { return undefined; },
    async consume() {},
    async destroy() {},
    async revokeByGrantId() {},
  };
}

async function readForm(req: IncomingMessage): Promise<URLSearchParams> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > 64 * 1024) throw new Error("request entity too large");
    chunks.push(chunk as Buffer);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString("utf8"));
}

export async function startGoogleTokenServer(options: GoogleTokenServerOptions): Promise<GoogleTokenServer> {
  const projectId = options.projectId ?? "queue-mailer-local";
  const ttl = options.accessTokenTtlSeconds ?? 3600;
  const users = new Set(options.users.map((u) => u.toLowerCase()));
  const accounts = new Map<string, ServiceAccount>();
  const delegation = new Map<string, Set<string>>();
  let clockOffsetSeconds = 0;
  const stats: GoogleTokenServer["stats"] = { tokenRequests: 0, tokensIssued: 0, certificateRequests: 0, errors: [], assertions: [] };

  const signing = generateKeyPairSync("rsa", { modulusLength: 2048 });
  const signingKid = randomUUID();

  let handler: ((req: IncomingMessage, res: import("node:http").ServerResponse) => void) | undefined;
  const server = createServer((req, res) => handler!(req, res));
  const { origin } = await listenLoopback(server, options);
  const tokenPath = "/token";
  const tokenUrl = `${origin}${tokenPath}`;
  const certificatesPath = "/robot/v1/metadata/x509/";

  // Service accounts come and go while the server runs, so they are not static clients: the
  // adapter answers oidc-provider's Client lookups from `accounts` instead.
  const adapter = (model: string) => ({
    ...nullAdapter(),
    async find(id: string) {
      if (model !== "Client") return undefined;
      const account = [...accounts.values()].find((a) => a.clientId === id);
      return account && { client_id: account.clientId, token_endpoint_auth_method: "none", grant_types: [JWT_BEARER_GRANT], response_types: [], redirect_uris: [] };
    },
  });
  const provider = new Provider(origin, {
    adapter,
    jwks: { keys: [{ ...signing.privateKey.export({ format: "jwk" }), kid: signingKid, use: "sig", alg: "RS256" }] },
    clientAuthMethods: ["none"],
    routes: { token: tokenPath },
    ttl: { AccessToken: ttl },
    features: { devInteractions: { enabled: false } },
    clientBasedCORS: () => false,
    renderError(ctx: Ctx, out: unknown) {
      ctx.body = out;
    },
  });
  provider.registerGrantType(JWT_BEARER_GRANT, jwtBearerGrant, ["assertion"]);
  provider.on("grant.error", (_ctx: unknown, err: { error?: string; message: string; error_description?: string; error_detail?: string }) => {
    stats.errors.push({ error: err.error ?? err.message, description: err.error_description ?? "", ...(err.error_detail ? { detail: err.error_detail } : {}) });
  });
  provider.on("server_error", (_ctx: unknown, err: Error) => {
    stats.errors.push({ error: "server_error", description: err.message });
  });
  // In front of oidc-provider's router: find the client the assertion names (see the top).
  provider.use(async (ctx: Ctx, next: () => Promise<void>) => {
    if (ctx.method !== "POST" || ctx.path !== tokenPath) return next();
    stats.tokenRequests++;
    const params = Object.fromEntries(await readForm(ctx.req));
    if (params.grant_type === JWT_BEARER_GRANT && params.assertion) {
      let iss: unknown;
      try {
        ({ iss } = decodeJwt(params.assertion));
      } catch {
        iss = undefined;
      }
      const account = typeof iss === "string" ? accounts.get(iss.toLowerCase()) : undefined;
      if (!account) {
        const [error, description] = GOOGLE_ERRORS.accountNotFound;
        stats.errors.push({ error, description, detail: `no service account ${String(iss)}` });
        ctx.status = 400;
        ctx.body = { error, error_description: description };
        return;
      }
      params.client_id = account.clientId;
    }
    ctx.req.body = params;
    await next();
    const body = ctx.body as Record<string, unknown> | undefined;
    if (ctx.status === 200 && typeof body?.access_token === "string") stats.tokensIssued++;
  });
  const oidcHandler = provider.callback();
  handler = (req, res) => {
    // The published certificates, outside oidc-provider (Google serves them from www.googleapis.com).
    const path = new URL(req.url ?? "/", origin).pathname;
    if (req.method !== "GET" || !path.startsWith(certificatesPath)) return oidcHandler(req, res);
    stats.certificateRequests++;
    const account = accounts.get(decodeURIComponent(path.slice(certificatesPath.length)).toLowerCase());
    res.setHeader("content-type", "application/json; charset=UTF-8");
    if (!account) {
      res.statusCode = 404;
      res.end(JSON.stringify({ error: { code: 404, message: "Not Found", status: "NOT_FOUND" } }));
      return;
    }
    res.end(JSON.stringify(Object.fromEntries([...account.keys].map(([kid, key]) => [kid, key.certificatePem]))));
  };

  const now = () => Math.floor(Date.now() / 1000) + clockOffsetSeconds;

  async function jwtBearerGrant(ctx: Ctx): Promise<void> {
    const assertion = ctx.oidc.params.assertion ?? "";
    const clientId = ctx.oidc.client.clientId;
    const account = [...accounts.values()].find((a) => a.clientId === clientId);
    if (!account) throw googleError(GOOGLE_ERRORS.accountNotFound, `no service account with client id ${clientId}`);
    let header: Record<string, unknown>;
    let claims: Record<string, unknown>;
    try {
      header = decodeProtectedHeader(assertion) as Record<string, unknown>;
      claims = decodeJwt(assertion) as Record<string, unknown>;
    } catch (error) {
      throw googleError(GOOGLE_ERRORS.signature, `not a JWT: ${(error as Error).message}`);
    }
    stats.assertions.push({ header, claims, formFields: Object.keys(ctx.req.body ?? {}).filter((k) => k !== "client_id") });

    const candidates = typeof header.kid === "string" ? [account.keys.get(header.kid)].filter((k) => k !== undefined) : [...account.keys.values()];
    if (header.alg !== "RS256") throw googleError(GOOGLE_ERRORS.signature, `alg ${String(header.alg)} is not RS256`);
    let verified = false;
    for (const key of candidates) {
      try {
        await compactVerify(assertion, key.publicKey, { algorithms: ["RS256"] });
        verified = true;
        break;
      } catch {
        // try the next key
      }
    }
    if (!verified) throw googleError(GOOGLE_ERRORS.signature, candidates.length === 0 ? `no key ${String(header.kid)} for ${account.clientEmail}` : "signature does not verify");

    const { iat, exp, aud, scope, sub } = claims;
    const t = now();
    if (typeof iat !== "number" || typeof exp !== "number" || exp - iat > MAX_ASSERTION_LIFETIME_SECONDS || exp <= iat || exp < t - CLOCK_SKEW_SECONDS || iat > t + CLOCK_SKEW_SECONDS) {
      throw googleError(GOOGLE_ERRORS.timeframe, `iat ${String(iat)}, exp ${String(exp)}, server time ${t}`);
    }
    if (aud !== tokenUrl) {
      throw googleError(["invalid_grant", `Invalid JWT: Failed audience check. The right audience is ${tokenUrl}`], `aud ${String(aud)}`);
    }
    if (typeof scope !== "string" || scope.trim() === "") throw googleError(GOOGLE_ERRORS.noScope, "no scope claim");
    const scopes = scope.split(" ").filter(Boolean);
    if (scopes.some((s) => !/^https:\/\/(mail\.google\.com\/|www\.googleapis\.com\/auth\/)/.test(s))) throw googleError(GOOGLE_ERRORS.badScope, `scope ${scope}`);
    let subject = account.clientEmail;
    if (sub !== undefined) {
      if (typeof sub !== "string" || !users.has(sub.toLowerCase())) throw googleError(GOOGLE_ERRORS.badUser, `sub ${String(sub)} is not a user of the domain`);
      const granted = delegation.get(account.clientId) ?? new Set<string>();
      const missing = scopes.filter((s) => !granted.has(s));
      if (missing.length > 0) throw googleError(GOOGLE_ERRORS.unauthorizedClient, `no domain-wide delegation of ${missing.join(" ")} for client ${account.clientId}`, 401);
      subject = sub;
    }

    const { AccessToken } = ctx.oidc.provider;
    const token = new AccessToken({
      client: ctx.oidc.client,
      accountId: subject,
      scope: scopes.join(" "),
      // A resource server in JWT format: oidc-provider then signs the token with its own key.
      resourceServer: { audience: GOOGLE_MAIL_SCOPE, scope: scopes.join(" "), accessTokenTTL: ttl, accessTokenFormat: "jwt", jwt: { sign: { alg: "RS256" } }, identifier: () => GOOGLE_MAIL_SCOPE },
    });
    const value = await token.save();
    ctx.body = { access_token: value, expires_in: token.expiration, token_type: "Bearer" };
  }

  return {
    tokenUrl,
    issuer: origin,
    createServiceAccount(name = `mailer-${randomBytes(3).toString("hex")}`) {
      const clientEmail = `${name}@${projectId}.iam.gserviceaccount.com`;
      // Google's service account client IDs are 21-digit numbers.
      const clientId = `1${Array.from({ length: 20 }, () => randomInt(10)).join("")}`;
      accounts.set(clientEmail.toLowerCase(), { clientEmail, clientId, keys: new Map() });
      return { clientEmail, clientId };
    },
    createKey(clientEmail, keyOptions = {}) {
      const account = accounts.get(clientEmail.toLowerCase());
      if (!account) throw new Error(`no service account ${clientEmail}`);
      const pair = generateKeyPairSync("rsa", {
        modulusLength: 2048,
        publicKeyEncoding: { type: "spki", format: "pem" },
        privateKeyEncoding: { type: "pkcs8", format: "pem" },
      });
      const privateKeyId = randomBytes(20).toString("hex");
      const createdAt = keyOptions.createdAt ?? new Date();
      account.keys.set(privateKeyId, {
        publicKey: createPublicKey(pair.publicKey),
        certificatePem: publishedCertificate(pair.publicKey, pair.privateKey, account.clientId, createdAt, keyOptions.expiresAt ?? NEVER),
      });
      return {
        type: "service_account",
        project_id: projectId,
        private_key_id: privateKeyId,
        private_key: pair.privateKey,
        client_email: account.clientEmail,
        client_id: account.clientId,
        auth_uri: "https://accounts.google.com/o/oauth2/auth",
        token_uri: tokenUrl,
        auth_provider_x509_cert_url: "https://www.googleapis.com/oauth2/v1/certs",
        client_x509_cert_url: `${origin}${certificatesPath}${encodeURIComponent(account.clientEmail)}`,
        universe_domain: "googleapis.com",
      };
    },
    deleteKey(privateKeyId) {
      for (const account of accounts.values()) account.keys.delete(privateKeyId);
    },
    delegate(clientId, scopes) {
      delegation.set(clientId, new Set(scopes));
    },
    revokeDelegation(clientId) {
      delegation.delete(clientId);
    },
    setClockOffset(seconds) {
      clockOffsetSeconds = seconds;
    },
    async verifyAccessToken(token, user) {
      let claims: Record<string, unknown>;
      try {
        ({ payload: claims } = await jwtVerify(token, signing.publicKey, { issuer: origin, audience: GOOGLE_MAIL_SCOPE, algorithms: ["RS256"] }));
      } catch (error) {
        return { ok: false, reason: `access token rejected: ${(error as Error).message}` };
      }
      if (typeof claims.sub !== "string" || claims.sub.toLowerCase() !== user.toLowerCase()) {
        return { ok: false, reason: `the token is for ${String(claims.sub)}, not the XOAUTH2 user ${user}` };
      }
      const scopes = typeof claims.scope === "string" ? claims.scope.split(" ") : [];
      if (!scopes.includes(GOOGLE_MAIL_SCOPE)) return { ok: false, reason: `the token lacks the scope ${GOOGLE_MAIL_SCOPE}` };
      return { ok: true, claims };
    },
    stats,
    resetStats() {
      stats.tokenRequests = 0;
      stats.tokensIssued = 0;
      stats.certificateRequests = 0;
      stats.errors.length = 0;
      stats.assertions.length = 0;
    },
    close() {
      return new Promise<void>((resolve, reject) => {
        server.close((error) => (error ? reject(error) : resolve()));
        server.closeAllConnections();
      });
    },
  };
}
