// Step 4: the access token. One token serves every send in the process: concurrent callers share
// one request (single flight), the token is reused until REFRESH_MARGIN before it expires, and an
// SMTP 535 drops it once so the next connection fetches a fresh one.
import type { CredentialSource, TokenRequest } from "../auth/credentialSource.js";
import { MailerError, toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
import { tokenNetworkError, tokenResponseError } from "./tokenErrors.js";

export interface AccessToken {
  /** Secret: never log it. */
  token: string;
  expiresAt: Date;
}

export interface TokenProviderOptions {
  /** Says where the request goes and what it carries; the provider only does the HTTP. */
  credential: CredentialSource;
  logger: Logger;
  refreshMarginSeconds?: number;
  timeoutMs?: number;
  now?: () => number;
}

export const REFRESH_MARGIN_SECONDS = 300;
/** Several pooled connections may all see 535 for the same stale token; renew once for them all. */
const RENEW_COALESCE_MS = 10_000;

export class TokenProvider {
  readonly stats = { requests: 0, failures: 0 };
  private cached: AccessToken | undefined;
  private inflight: Promise<AccessToken> | undefined;
  private lastRenewAt = -Infinity;
  private readonly now: () => number;

  constructor(private readonly options: TokenProviderOptions) {
    this.now = options.now ?? Date.now;
  }

  getToken(): Promise<AccessToken> {
    const margin = (this.options.refreshMarginSeconds ?? REFRESH_MARGIN_SECONDS) * 1000;
    if (this.cached && this.cached.expiresAt.getTime() - margin > this.now()) return Promise.resolve(this.cached);
    this.inflight ??= this.request().finally(() => {
      this.inflight = undefined;
    });
    return this.inflight;
  }

  /** The server refused the token (535 at AUTH): fetch a new one, once per burst of refusals. */
  renew(): Promise<AccessToken> {
    if (this.now() - this.lastRenewAt > RENEW_COALESCE_MS && !this.inflight) {
      this.lastRenewAt = this.now();
      this.cached = undefined;
      this.options.logger.log("warn", "token.renew", { reason: "rejected by the mail server" });
    }
    return this.getToken();
  }

  private async request(): Promise<AccessToken> {
    const { credential, logger } = this.options;
    for (let attempt = 1; ; attempt++) {
      const tokenRequest = await credential.tokenRequest();
      let answer: { token: AccessToken; response: Record<string, unknown> };
      try {
        answer = await this.post(tokenRequest);
      } catch (error) {
        // A credential that changes with use may know better (refresh-token: another instance
        // rotated it meanwhile, so try once more; or say to sign in again).
        if (!credential.refused) throw error;
        const next = await credential.refused(toMailerError(error));
        if (next === "retry" && attempt === 1) continue;
        throw next === "retry" ? error : next;
      }
      // Before the token is cached or used: a rotated refresh token is stored first.
      await credential.accepted?.(answer.response);
      this.cached = answer.token;
      logger.log("info", "token.acquired", { method: credential.method, tokenUrl: tokenRequest.url, expiresAt: answer.token.expiresAt.toISOString() });
      return answer.token;
    }
  }

  /** One POST to the token endpoint: the token and the whole parsed answer, or a classified error. */
  private async post({ url: tokenUrl, form, headers }: TokenRequest): Promise<{ token: AccessToken; response: Record<string, unknown> }> {
    const { credential, logger } = this.options;
    const body = new URLSearchParams(form);
    this.stats.requests += 1;
    const started = this.now();
    let response: Response;
    let text: string;
    try {
      response = await fetch(tokenUrl, {
        method: "POST",
        headers: { ...headers, "content-type": "application/x-www-form-urlencoded", accept: "application/json" },
        body,
        signal: AbortSignal.timeout(this.options.timeoutMs ?? 15_000),
      });
      // The body can stall or break too: same classification as a failed connection.
      text = await response.text();
    } catch (error) {
      this.stats.failures += 1;
      throw tokenNetworkError(error, tokenUrl);
    }
    if (!response.ok) {
      this.stats.failures += 1;
      const error = tokenResponseError(response.status, text, response.headers.get("retry-after"), tokenUrl);
      // A rejected credential may mean the certificate was renewed: read it again next time.
      if (error.kind === "config") credential.invalidate();
      logger.log("error", "token.failed", { error: error.toJSON() });
      throw error;
    }
    let parsed: { access_token?: unknown; expires_in?: unknown } & Record<string, unknown>;
    try {
      const json: unknown = JSON.parse(text);
      parsed = json !== null && typeof json === "object" ? (json as typeof parsed) : {};
    } catch {
      parsed = {};
    }
    if (typeof parsed.access_token !== "string" || parsed.access_token.length === 0) {
      this.stats.failures += 1;
      throw new MailerError("TOKEN_BAD_RESPONSE", `token endpoint ${tokenUrl} answered ${response.status} without an access_token`, { kind: "transient", command: `POST ${tokenUrl}` });
    }
    const expiresIn = Number(parsed.expires_in);
    const expiresAt = new Date(started + (Number.isFinite(expiresIn) && expiresIn > 0 ? expiresIn : 3600) * 1000);
    return { token: { token: parsed.access_token, expiresAt }, response: parsed };
  }
}
