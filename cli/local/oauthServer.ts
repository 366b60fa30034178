// A local stand-in for the Microsoft identity platform's v2 token endpoint. oidc-provider (a certified
// OAuth server) does the real work, so client assertions are verified for real: signature against the
// registered certificate's key, aud, iss = sub = client id, exp/nbf, single-use jti. On top of it this
// adds what Entra does and oidc-provider does not: the certificate thumbprint check, the `.default`
// scope, app-only claims (`roles`, `appid`) and Microsoft-shaped error bodies (AADSTS codes).
//
// AADSTS mapping (error_description = "AADSTS<code>: <text> [Reason - <oidc-provider error_detail>]"):
//   700016  client not found                 700027  bad signature, unknown key, wrong thumbprint, alg
//   700024  assertion outside its time window 50013   other assertion problems: aud, iss, replayed jti
//   1002012 invalid scope (no "/.default")   500011  resource not served here
//   70003   unsupported grant type           9002313 other invalid requests; 50000 server errors
// Stricter than Entra in one way: Entra lets msal reuse an assertion until it expires, this server
// rejects a replayed jti (50013), so a client that sends a fresh jti per request works with both.
// Limitation: oidc-provider matches a header `kid` against the registered key, which has none, so
// assertions must not carry `kid` (msal-node's do not; Entra selects keys by thumbprint only).
import { createHash, generateKeyPairSync, randomUUID, X509Certificate } from "node:crypto";
import type { KeyObject } from "node:crypto";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { jwtVerify } from "jose";
// @ts-ignore -- oidc-provider ships no types and @types/oidc-provider is not a dependency (ts-ignore,
// not ts-expect-error, so that adding those types later does not break the build).
import Provider, { errors } from "oidc-provider";

export interface OAuthServerOptions {
  clientId: string;
  /** The client's certificate: its public key verifies assertions. */
  certificatePem: string;
  /** Default "local-tenant". */
  tenantId?: string;
  /** Default 127.0.0.1. */
  host?: string;
  /** Default 0 (any free port; the URLs carry the real one). */
  port?: number;
  /** Default "https://outlook.office365.com". */
  resource?: string;
  /** Default ["SMTP.SendAsApp"]: the access token's `roles` claim. */
  roles?: string[];
  /** Default 3600. */
  accessTokenTtlSeconds?: number;
}

export type AccessTokenCheck = { ok: true; claims: Record<string, unknown> } | { ok: false; reason: string };

export interface OAuthServer {
  /** http://host:port/<tenant>/v2.0, like Entra's v2 issuer. */
  issuer: string;
  /** http://host:port/<tenant>/oauth2/v2.0/token: Microsoft's path shape, accepted as assertion aud. */
  tokenUrl: string;
  jwksUrl: string;
  /** `${resource}/.default` */
  scope: string;
  /** Signature, iss, aud = resource, exp, and every configured role. */
  verifyAccessToken(token: string): Promise<AccessTokenCheck>;
  stats: { tokenRequests: number; tokensIssued: number; errors: Array<{ error: string; detail?: string }> };
  resetStats(): void;
  /** The next `count` token requests get this answer instead (e.g. 503, or 400 with an AADSTS body). */
  failNext(count: number, status: number, body: unknown, headers?: Record<string, string>): void;
  close(): Promise<void>;
}

// The slice of Koa's context and oidc-provider's error this file touches (the package has no types).
interface Ctx {
  method: string;
  path: string;
  status: number;
  body: unknown;
  set(headers: Record<string, string>): void;
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
  1002012: "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).",
  500011: "The resource principal was not found in the tenant named {tenant}.",
  70003: "The app requested an unsupported grant type.",
  9002313: "Invalid request. Request is malformed or invalid.",
  50000: "There was an error issuing a token.",
};

function aadstsCode(error: string, detail: string, status: number): number {
  if (error === "invalid_client") {
    if (detail === "client not found") return 700016;
    if (/signature|key|thumbprint|alg mismatch/i.test(detail)) return 700027;
    if (/expired|not active|nbf|exp\b/i.test(detail)) return 700024;
    return 50013;
  }
  if (error === "invalid_scope") return 1002012;
  if (error === "invalid_target") return 500011;
  if (error === "unsupported_grant_type") return 70003;
  return status >= 500 ? 50000 : 9002313;
}

const base64url = (bytes: Buffer) => bytes.toString("base64url");

// Entra keeps assertions and tokens in its own store; oidc-provider's default memory adapter is
// module-global (shared by every server in a process) and warns on each start, so use a per-server map.
function memoryAdapter() {
  const store = new Map<string, { payload: Record<string, unknown>; expiresAt: number }>();
  return (model: string) => {
    const key = (id: string) => `${model}:${id}`;
    const find = async (id: string) => {
      const entry = store.get(key(id));
      if (entry && entry.expiresAt <= Date.now()) store.delete(key(id));
      return entry && entry.expiresAt > Date.now() ? entry.payload : undefined;
    };
    return {
      async upsert(id: string, payload: Record<string, unknown>, expiresIn?: number) {
        const now = Date.now();
        for (const [k, v] of store) if (v.expiresAt <= now) store.delete(k);
        store.set(key(id), { payload, expiresAt: expiresIn ? now + expiresIn * 1000 : Infinity });
      },
      find,
      async findByUid() { return undefined; },
      async findByUserCode() { return undefined; },
      async consume(id: string) {
        const payload = await find(id);
        if (payload) payload.consumed = Math.floor(Date.now() / 1000);
      },
      async destroy(id: string) { store.delete(key(id)); },
      async revokeByGrantId() {},
    };
  };
}

export async function startOAuthServer(options: OAuthServerOptions): Promise<OAuthServer> {
  const tenant = options.tenantId ?? "local-tenant";
  const resource = options.resource ?? "https://outlook.office365.com";
  const roles = options.roles ?? ["SMTP.SendAsApp"];
  const ttl = options.accessTokenTtlSeconds ?? 3600;
  const scope = `${resource}/.default`;
  const tokenPath = `/${tenant}/oauth2/v2.0/token`;
  const jwksPath = `/${tenant}/discovery/v2.0/keys`;

  const certificate = new X509Certificate(options.certificatePem);
  const thumbprints = {
    "x5t#S256": base64url(createHash("sha256").update(certificate.raw).digest()),
    x5t: base64url(createHash("sha1").update(certificate.raw).digest()),
  };
  // No `alg` on the registered key, so the same key verifies both PS256 and RS256 assertions.
  const clientJwk = certificate.publicKey.export({ format: "jwk" });

  const signing = generateKeyPairSync("rsa", { modulusLength: 2048 });
  const signingKid = randomUUID();
  const signingPublicKey: KeyObject = signing.publicKey;

  const stats: OAuthServer["stats"] = { tokenRequests: 0, tokensIssued: 0, errors: [] };
  const injected: Array<{ status: number; body: unknown; headers?: Record<string, string> }> = [];
  const failures = new WeakMap<object, ProviderError>();

  // The issuer must contain the real port, so listen first and attach the provider afterwards.
  let handler: ((req: unknown, res: unknown) => void) | undefined;
  const server = createServer((req, res) => handler!(req, res));
  const host = options.host ?? "127.0.0.1";
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port ?? 0, host, () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  const origin = `http://${host.includes(":") ? `[${host}]` : host}:${port}`;
  const issuer = `${origin}/${tenant}/v2.0`;
  const tokenUrl = `${origin}${tokenPath}`;

  const provider = new Provider(issuer, {
    adapter: memoryAdapter(),
    jwks: { keys: [{ ...signing.privateKey.export({ format: "jwk" }), kid: signingKid, use: "sig", alg: "RS256" }] },
    clients: [
      {
        client_id: options.clientId,
        token_endpoint_auth_method: "private_key_jwt",
        jwks: { keys: [clientJwk] },
        grant_types: ["client_credentials"],
        response_types: [],
        redirect_uris: [],
      },
    ],
    clientAuthMethods: ["private_key_jwt"],
    enabledJWA: { clientAuthSigningAlgValues: ["PS256", "RS256"] },
    routes: { token: tokenPath, jwks: jwksPath },
    ttl: { ClientCredentials: ttl },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // Microsoft names the resource inside the scope ("<resource>/.default") rather than with RFC 8707's
        // `resource` parameter: derive it from there so oidc-provider issues an audience-restricted JWT.
        async defaultResource(ctx: { oidc: { params: { scope?: string } } }, _client: unknown, oneOf?: string[]) {
          if (oneOf) return oneOf;
          const requested = (ctx.oidc.params.scope ?? "").split(" ").filter((s) => s.endsWith("/.default"));
          if (requested.length !== 1) {
            throw new errors.InvalidScope("scope must be exactly one <resource>/.default value", ctx.oidc.params.scope);
          }
          return requested[0]!.slice(0, -"/.default".length);
        },
        // The resource server's scope is what lets the (non-OIDC) ".default" scope through into the token.
        async getResourceServerInfo(_ctx: unknown, indicator: string) {
          if (indicator !== resource) throw new errors.InvalidTarget(`resource ${indicator} is not served here`);
          return { scope, audience: resource, accessTokenTTL: ttl, accessTokenFormat: "jwt", jwt: { sign: { alg: "RS256" } } };
        },
        async useGrantedResource() {
          return false;
        },
      },
    },
    // App-only tokens from Entra carry roles and appid, and no scope claim (Exchange reads roles).
    async extraTokenClaims(_ctx: unknown, token: { clientId: string }) {
      return { roles, appid: token.clientId, azp: token.clientId, tid: tenant };
    },
    formats: {
      customizers: {
        jwt(_ctx: unknown, _token: unknown, jwt: { payload: Record<string, unknown> }) {
          delete jwt.payload.scope;
        },
      },
    },
    // Runs after oidc-provider's own checks (signature, iss, exp, aud), before the jti is spent.
    async assertJwtClientAuthClaimsAndHeader(_ctx: unknown, claims: { aud?: unknown }, header: Record<string, unknown>) {
      // oidc-provider also accepts the issuer as aud (RFC 7523); Entra documents only the token URL.
      if (![claims.aud].flat().includes(tokenUrl)) {
        throw new errors.InvalidClientAuth(`audience (aud) must be the token endpoint ${tokenUrl}`);
      }
      // Entra picks the certificate by the header thumbprint; a wrong one is AADSTS700027 even when the
      // signature would verify.
      const sent = (["x5t#S256", "x5t"] as const).filter((name) => header[name] !== undefined);
      if (sent.length === 0) throw new errors.InvalidClientAuth("the key was not found: no x5t#S256 or x5t header");
      for (const name of sent) {
        if (header[name] !== thumbprints[name]) {
          throw new errors.InvalidClientAuth(`the key was not found: ${name} '${String(header[name])}' is not a registered certificate thumbprint`);
        }
      }
    },
    clientBasedCORS: () => false,
    renderError(ctx: Ctx, out: unknown) {
      ctx.body = out;
    },
  });

  provider.on("grant.error", (ctx: object, err: ProviderError) => {
    failures.set(ctx, err);
    stats.errors.push({ error: err.error ?? err.message, detail: err.error_detail ?? err.error_description });
  });
  provider.on("server_error", (ctx: object, err: ProviderError) => {
    failures.set(ctx, err);
    stats.errors.push({ error: "server_error", detail: err.message });
  });

  // Runs around oidc-provider's router: injected failures, stats, and Microsoft-shaped response bodies.
  provider.use(async (ctx: Ctx, next: () => Promise<void>) => {
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
    await next();
    const body = ctx.body as Record<string, unknown> | undefined;
    if (ctx.status === 200 && typeof body?.access_token === "string") {
      stats.tokensIssued++;
      ctx.body = { token_type: body.token_type, expires_in: body.expires_in, ext_expires_in: body.expires_in, access_token: body.access_token };
    } else if (typeof body?.error === "string") {
      const failure = failures.get(ctx);
      const detail = failure?.error_detail ?? String(body.error_description ?? "");
      const code = aadstsCode(body.error, detail, ctx.status);
      const traceId = randomUUID();
      const correlationId = randomUUID();
      const timestamp = new Date().toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
      const text = AADSTS_TEXT[code]!.replace("{client}", options.clientId).replace("{tenant}", tenant);
      ctx.body = {
        error: body.error,
        error_description: `AADSTS${code}: ${text} [Reason - ${detail}] Trace ID: ${traceId} Correlation ID: ${correlationId} Timestamp: ${timestamp}`,
        error_codes: [code],
        timestamp,
        trace_id: traceId,
        correlation_id: correlationId,
      };
    }
  });

  handler = provider.callback();

  return {
    issuer,
    tokenUrl,
    jwksUrl: `${origin}${jwksPath}`,
    scope,
    async verifyAccessToken(token) {
      let claims: Record<string, unknown>;
      try {
        ({ payload: claims } = await jwtVerify(token, signingPublicKey, { issuer, audience: resource, algorithms: ["RS256"] }));
      } catch (err) {
        return { ok: false, reason: `access token rejected: ${(err as Error).message}` };
      }
      const granted = Array.isArray(claims.roles) ? claims.roles : [];
      const missing = roles.filter((role) => !granted.includes(role));
      if (missing.length > 0) return { ok: false, reason: `access token lacks role(s) ${missing.join(", ")}` };
      return { ok: true, claims };
    },
    stats,
    resetStats() {
      stats.tokenRequests = 0;
      stats.tokensIssued = 0;
      stats.errors.length = 0;
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
