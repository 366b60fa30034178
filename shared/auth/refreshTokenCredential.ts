// AUTH_METHOD=refresh-token: delegated access for a user who signed in once with `queue-mailer
// authorize` (authorization code with PKCE, or the device flow). The sender redeems the stored
// refresh token (RFC 6749 section 6) for an access token that carries the user (Exchange: `scp`
// SMTP.Send, `upn` = SMTP_USER), once per token lifetime like every other method.
//
// What makes it safe to run unattended:
// - Rotation: when the answer carries a new refresh token, it is stored (a new Key Vault version, or
//   the file replaced atomically) before the access token is used. If storing fails, the new token
//   stays in memory and is used for the next redemption, the error is logged naming the setting,
//   and the store is retried with backoff; meanwhile this instance keeps the redeem lease, so no
//   other instance redeems the stale stored token (which a rotating server would treat as theft).
// - One redeemer at a time across instances (shared/auth/refreshTokenLease.ts): the lease is held
//   from reading the stored token until the token that came back is stored. The others wait, then
//   read the token just stored.
// - invalid_grant is first answered by reading the store once more (another instance, or a new
//   `queue-mailer authorize`, may have stored a newer token) and trying that one; only then is it a
//   configuration failure (kind config: the circuit opens, nothing is poisoned) whose hint says to
//   run `queue-mailer authorize`.
import type { AuthConfig } from "../config.js";
import { MailerError, toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
import { registerSecret } from "../redact.js";
import { clientSecretAuthentication } from "./clientAuthentication.js";
import type { CredentialSource } from "./credentialSource.js";
import { processRedeemLeases, tableRedeemLeases, type RedeemLease, type RedeemLeases } from "./refreshTokenLease.js";
import { refreshTokenStoreFor, type RefreshTokenStore, type StoredRefreshToken } from "./refreshTokenStore.js";
import { secretSourceFor, type SecretSource } from "./secretSource.js";

export type RefreshTokenAuth = Extract<AuthConfig, { method: "refresh-token" }>;

export interface RefreshTokenParts {
  store?: RefreshTokenStore;
  leases?: RedeemLeases;
  clientSecrets?: SecretSource;
  /** First wait before retrying a failed store (doubles up to a minute). Default 1 s. */
  storeRetryMs?: number;
}

/** The OAuth error word of a token endpoint refusal ("400 invalid_grant AADSTS…" → invalid_grant). */
function oauthError(error: MailerError): string | undefined {
  return /^\d{3} ([a-z_]+)\b/.exec(error.response ?? "")?.[1];
}

/** The user's grant itself was refused: only a new sign-in helps. */
const GRANT_REFUSED = new Set(["invalid_grant", "interaction_required"]);

export function refreshTokenCredential(auth: RefreshTokenAuth, logger: Logger, parts: RefreshTokenParts = {}): CredentialSource {
  const store = parts.store ?? refreshTokenStoreFor(auth.refreshToken);
  const leases = parts.leases ?? (auth.lease ? tableRedeemLeases(auth.lease, store.where) : processRedeemLeases());
  const clientSecrets = parts.clientSecrets ?? (auth.clientSecret ? secretSourceFor(auth.clientSecret, "client secret", logger) : undefined);
  const firstRetryMs = parts.storeRetryMs ?? 1_000;

  /** Held from reading the stored token until the answer is dealt with (and while a store is retried). */
  let lease: RedeemLease | undefined;
  /** What the request in flight carries. */
  let sent: StoredRefreshToken | undefined;
  /** A rotated token that could not be stored yet: newer than the store, so it is the one to use. */
  let unsaved: StoredRefreshToken | undefined;
  let retryTimer: NodeJS.Timeout | undefined;
  let retryMs = firstRetryMs;

  function releaseLease(): void {
    // Never while the newest token exists only here: another instance would redeem the stale one.
    if (unsaved) return;
    lease?.release();
    lease = undefined;
  }

  async function save(next: StoredRefreshToken): Promise<boolean> {
    try {
      const { version } = await store.write(next);
      unsaved = undefined;
      clearTimeout(retryTimer);
      retryMs = firstRetryMs;
      logger.log("info", "refresh_token.rotated", { where: store.where, ...(version ? { version } : {}), ...(next.user ? { user: next.user } : {}) });
      return true;
    } catch (error) {
      unsaved = next;
      const failure = toMailerError(error, "REFRESH_TOKEN_STORE_FAILED");
      logger.log("error", "refresh_token.store_failed", {
        setting: store.setting,
        where: store.where,
        error: failure.toJSON(),
        retryInSeconds: retryMs / 1000,
        note: `The server rotated the refresh token and the new one could not be stored in ${store.setting}: it is kept in memory and used from here, and storing it is retried. This instance holds the redeem lease until then, so that no other instance redeems the old one.`,
      });
      scheduleStoreRetry();
      return false;
    }
  }

  function scheduleStoreRetry(): void {
    clearTimeout(retryTimer);
    // Not unref'd: a process that exits now would lose the only copy of the new token.
    retryTimer = setTimeout(() => {
      retryTimer = undefined;
      const pending = unsaved;
      if (!pending) return;
      void save(pending).then((stored) => {
        if (stored && !sent) releaseLease();
      });
    }, retryMs);
    retryMs = Math.min(retryMs * 2, 60_000);
  }

  /** The refusal as a configuration failure that says to sign in again, and where the token lives. */
  function signInAgain(error: MailerError): MailerError {
    const hint = `The refresh token in ${store.setting} (${store.where}) was refused and no newer one is stored: a user must sign in again with \`queue-mailer authorize\` (or \`queue-mailer authorize --device-code\`), which stores a new one there; sending resumes by itself.${error.hint ? ` ${error.hint}` : ""}`;
    const failure = new MailerError(error.code, error.message, {
      kind: "config",
      hint,
      ...(error.response === undefined ? {} : { response: error.response }),
      ...(error.command === undefined ? {} : { command: error.command }),
    });
    logger.log("error", "refresh_token.refused", { where: store.where, error: failure.toJSON() });
    return failure;
  }

  return {
    method: "refresh-token",
    async tokenRequest() {
      // Already held while a failed store is retried.
      lease ??= await leases.acquire();
      try {
        // Read under the lease: another instance may have rotated the token a moment ago.
        const current = unsaved ?? (await store.read());
        const secret = await clientSecrets?.load();
        sent = current;
        const client = secret ? clientSecretAuthentication(auth.clientId, secret.value, auth.clientAuth) : { form: { client_id: auth.clientId } };
        return {
          url: auth.tokenUrl,
          form: { grant_type: "refresh_token", ...client.form, refresh_token: current.token, scope: auth.scope },
          ...("headers" in client && client.headers ? { headers: client.headers } : {}),
        };
      } catch (error) {
        sent = undefined;
        releaseLease();
        throw error;
      }
    },
    async accepted(response) {
      const used = sent;
      try {
        const next = response["refresh_token"];
        if (typeof next === "string" && next.length > 0 && next !== used?.token) {
          registerSecret(next);
          await save({ token: next, ...(used?.user ? { user: used.user } : {}), ...(used?.authorizedAt ? { authorizedAt: used.authorizedAt } : {}), rotatedAt: new Date() });
        } else {
          logger.log("debug", "refresh_token.not_rotated", { where: store.where });
        }
      } finally {
        sent = undefined;
        releaseLease();
      }
    },
    async refused(error) {
      const used = sent;
      try {
        if (error.kind !== "config" || !GRANT_REFUSED.has(oauthError(error) ?? "")) return error;
        if (unsaved && used?.token === unsaved.token) {
          // The newest token, kept only in memory, was refused: it is dead, and the store holds an
          // older one that a rotating server would take for a stolen token. Stop retrying the store.
          unsaved = undefined;
          clearTimeout(retryTimer);
          return signInAgain(error);
        }
        let stored: StoredRefreshToken | undefined;
        try {
          stored = await store.read();
        } catch {
          stored = undefined;
        }
        if (stored && stored.token !== used?.token) {
          logger.log("info", "refresh_token.reread", { where: store.where, note: "the token endpoint refused the refresh token, but a newer one is stored (another instance rotated it, or `queue-mailer authorize` ran): trying that one" });
          return "retry";
        }
        return signInAgain(error);
      } finally {
        sent = undefined;
        releaseLease();
      }
    },
    invalidate() {
      clientSecrets?.invalidate();
    },
  };
}
