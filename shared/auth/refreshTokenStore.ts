// Where the delegated refresh token lives between redemptions: a Key Vault secret
// (REFRESH_TOKEN_NAME; every rotation is written as a new version, so earlier ones stay for an
// audit and a mistaken write can be undone) or a local file for development (REFRESH_TOKEN_PATH;
// written to a temporary file with mode 0600 and renamed over the old one, so a crash mid-write
// leaves the old token or the new one, never half of either).
//
// Only the token is secret. Who signed in and when travel with it (Key Vault tags; the file's JSON)
// so that the expiry watch and `queue-mailer authorize` can say whose grant it is without a token.
import { randomBytes } from "node:crypto";
import { mkdir, open, readFile, rename, rm, stat } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import type { TokenCredential } from "@azure/identity";
import type { RefreshTokenLocation } from "../config.js";
import { MailerError } from "../errors.js";
import { lazy } from "../lazy.js";
import { registerSecret } from "../redact.js";
import { azureCredential } from "./azureCredential.js";
import { keyVaultError } from "./certificateSource.js";

export interface StoredRefreshToken {
  /** Secret: never log it. */
  token: string;
  /** The user who signed in (from the ID token or the access token's claims), if known. */
  user?: string;
  /** When the user signed in (`queue-mailer authorize`). */
  authorizedAt?: Date;
  /** When this token was stored: the sign-in or the last rotation. */
  rotatedAt?: Date;
  /** Key Vault: the secret version holding it. */
  version?: string;
}

export interface RefreshTokenStore {
  /** The setting that names the place: REFRESH_TOKEN_NAME or REFRESH_TOKEN_PATH. */
  readonly setting: string;
  /** The place, for people and logs: the file's absolute path or the secret's URL. */
  readonly where: string;
  /** The current token; REFRESH_TOKEN_MISSING (config) when nobody has signed in yet. */
  read(): Promise<StoredRefreshToken>;
  /** Stores a new token (a new Key Vault version; the file replaced atomically). */
  write(token: { token: string; user?: string; authorizedAt?: Date }): Promise<{ version?: string }>;
}

/** The MIME type we give the Key Vault secret, so that people see what it is. */
export const REFRESH_TOKEN_CONTENT_TYPE = "application/vnd.queue-mailer.refresh-token";

const AUTHORIZE_HINT = "Run `queue-mailer authorize` (or `queue-mailer authorize --device-code` on a machine without a browser) with the same settings: a user signs in once and the refresh token is stored there.";

function missing(setting: string, where: string): MailerError {
  return new MailerError("REFRESH_TOKEN_MISSING", `no refresh token in ${setting} (${where})`, { kind: "config", hint: AUTHORIZE_HINT });
}

export function refreshTokenStoreFor(location: RefreshTokenLocation, options: { credential?: TokenCredential } = {}): RefreshTokenStore {
  return location.kind === "file" ? fileRefreshTokenStore(location.path) : keyVaultRefreshTokenStore(location.vaultUrl, location.name, options.credential);
}

interface TokenFile {
  refresh_token?: unknown;
  user?: unknown;
  authorizedAt?: unknown;
  rotatedAt?: unknown;
}

const dateOf = (value: unknown): Date | undefined => {
  if (typeof value !== "string") return undefined;
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? undefined : date;
};

export function fileRefreshTokenStore(path: string): RefreshTokenStore {
  const where = resolve(path);
  const setting = "REFRESH_TOKEN_PATH";
  return {
    setting,
    where,
    async read() {
      let text: string;
      try {
        text = await readFile(where, "utf8");
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === "ENOENT") throw missing(setting, where);
        throw new MailerError("REFRESH_TOKEN_UNREADABLE", `${setting} ${where} cannot be read: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, { kind: "config", hint: "Check the path and that this process may read it.", cause: error });
      }
      let parsed: TokenFile | undefined;
      try {
        const json: unknown = JSON.parse(text);
        if (json !== null && typeof json === "object") parsed = json as TokenFile;
      } catch {
        // A token pasted into the file by hand: the whole text is the token.
      }
      const token = parsed ? (typeof parsed.refresh_token === "string" ? parsed.refresh_token : "") : text.trim();
      registerSecret(token);
      if (!token) throw missing(setting, where);
      const user = typeof parsed?.user === "string" ? parsed.user : undefined;
      const authorizedAt = dateOf(parsed?.authorizedAt);
      // A token written by hand has no date: the file's modification time is when it was put there.
      const rotatedAt = dateOf(parsed?.rotatedAt) ?? (await stat(where).then((info) => info.mtime, () => undefined));
      return { token, ...(user ? { user } : {}), ...(authorizedAt ? { authorizedAt } : {}), ...(rotatedAt ? { rotatedAt } : {}) };
    },
    async write({ token, user, authorizedAt }) {
      registerSecret(token);
      const content = JSON.stringify({ refresh_token: token, ...(user ? { user } : {}), ...(authorizedAt ? { authorizedAt: authorizedAt.toISOString() } : {}), rotatedAt: new Date().toISOString() }, null, 2) + "\n";
      const temporary = `${where}.${process.pid}.${randomBytes(6).toString("hex")}.tmp`;
      try {
        await mkdir(dirname(where), { recursive: true, mode: 0o700 });
        // Created 0600 from the start ("wx": never an existing file), flushed, then renamed over
        // the old token: readers see the old file or the new one, whole.
        const handle = await open(temporary, "wx", 0o600);
        try {
          await handle.writeFile(content, "utf8");
          await handle.sync();
        } finally {
          await handle.close();
        }
        await rename(temporary, where);
      } catch (error) {
        await rm(temporary, { force: true }).catch(() => undefined);
        throw new MailerError("REFRESH_TOKEN_STORE_FAILED", `the refresh token could not be written to ${setting} ${where}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, {
          kind: "transient",
          hint: "Check that the directory exists and is writable by this process, and that the disk is not full.",
          cause: error,
        });
      }
      return {};
    },
  };
}

/** Key Vault failures, with the role this use needs: reading AND writing versions (Secrets Officer). */
function vaultFailure(error: unknown, vaultUrl: string, name: string, writing: boolean): MailerError {
  const failure = keyVaultError(error, "refresh token secret", vaultUrl, name, "secret");
  if (failure.code === "KEYVAULT_NOT_FOUND" && !writing) return missing("REFRESH_TOKEN_NAME", `${vaultUrl.replace(/\/$/, "")}/secrets/${name}`);
  const denied = failure.code === "KEYVAULT_ACCESS_DENIED";
  return new MailerError(failure.code, writing ? `Key Vault ${vaultUrl} did not store a new version of secret "${name}" (the refresh token): ${failure.response ?? failure.message}` : failure.message, {
    kind: failure.kind,
    ...(failure.response === undefined ? {} : { response: failure.response }),
    ...(failure.retryAfterSeconds === undefined ? {} : { retryAfterSeconds: failure.retryAfterSeconds }),
    ...(denied || failure.hint ? { hint: denied ? `The identity needs the "Key Vault Secrets Officer" role on the vault: it reads the refresh token in REFRESH_TOKEN_NAME (${name}) and writes a new version at every rotation ("Key Vault Secrets User" can only read).` : failure.hint } : {}),
    cause: error,
  });
}

export function keyVaultRefreshTokenStore(vaultUrl: string, name: string, credential?: TokenCredential): RefreshTokenStore {
  const where = `${vaultUrl.replace(/\/$/, "")}/secrets/${name}`;
  const getClient = lazy(async () => {
    const { SecretClient } = await import("@azure/keyvault-secrets");
    return new SecretClient(vaultUrl, credential ?? (await azureCredential()));
  });
  return {
    setting: "REFRESH_TOKEN_NAME",
    where,
    async read() {
      const client = await getClient();
      let secret: import("@azure/keyvault-secrets").KeyVaultSecret;
      try {
        secret = await client.getSecret(name);
      } catch (error) {
        throw vaultFailure(error, vaultUrl, name, false);
      }
      const token = secret.value ?? "";
      registerSecret(token);
      if (!token) throw missing("REFRESH_TOKEN_NAME", where);
      const tags = secret.properties.tags ?? {};
      const authorizedAt = dateOf(tags["authorizedAt"]);
      const rotatedAt = secret.properties.createdOn;
      return {
        token,
        ...(tags["user"] ? { user: tags["user"] } : {}),
        ...(authorizedAt ? { authorizedAt } : {}),
        ...(rotatedAt ? { rotatedAt } : {}),
        ...(secret.properties.version ? { version: secret.properties.version } : {}),
      };
    },
    async write({ token, user, authorizedAt }) {
      registerSecret(token);
      const client = await getClient();
      try {
        const written = await client.setSecret(name, token, {
          contentType: REFRESH_TOKEN_CONTENT_TYPE,
          tags: { ...(user ? { user } : {}), ...(authorizedAt ? { authorizedAt: authorizedAt.toISOString() } : {}) },
        });
        return written.properties.version ? { version: written.properties.version } : {};
      } catch (error) {
        throw vaultFailure(error, vaultUrl, name, true);
      }
    },
  };
}
