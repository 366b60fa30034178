// AUTH_METHOD=google-service-account: a Google Workspace service account with domain-wide
// delegation sends as a user of the domain. The token request is the RFC 7523 authorization grant
// (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<jwt>`): the assertion, signed
// RS256 with the service account's key, is the whole credential. There is no client_id and no scope
// form field; the scope travels as a claim, and `sub` names the user to impersonate (SMTP_USER).
import { createPrivateKey, type KeyObject } from "node:crypto";
import { readFile } from "node:fs/promises";
import { SignJWT } from "jose";
import type { AuthConfig } from "../config.js";
import { MailerError } from "../errors.js";
import { lazy } from "../lazy.js";
import type { Logger } from "../log.js";
import { registerSecret } from "../redact.js";
import type { CredentialSource } from "./credentialSource.js";
import { secretSourceFor } from "./secretSource.js";

export type GoogleServiceAccountAuth = Extract<AuthConfig, { method: "google-service-account" }>;
export type GoogleKeyLocation = GoogleServiceAccountAuth["key"];

export const GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token";
export const JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/**
 * Google refuses assertions living longer than 60 minutes. Ours is sent once, right after it is
 * made, so it only has to survive the round trip and ordinary clock lag: 10 minutes does (the same
 * as our Microsoft assertions), and a leaked one is useless sooner. A clock more than 10 minutes
 * behind Google's gets "Token must be a short-lived token ... reasonable timeframe", which the
 * TOKEN_INVALID_GRANT hint points at.
 */
export const GOOGLE_ASSERTION_LIFETIME_SECONDS = 600;

/** The parts of a service account JSON key we use. `privateKey` is secret. */
export interface ServiceAccountKey {
  clientEmail: string;
  /** The numeric client ID domain-wide delegation is granted to (not secret). */
  clientId: string | undefined;
  privateKeyId: string;
  privateKey: KeyObject;
  tokenUri: string | undefined;
  /** Where Google publishes the key's certificate (its notBefore is the key's creation time). */
  x509CertUrl: string | undefined;
}

/** The setting that points at the key, for error messages: never the key itself. */
export function keySetting(location: GoogleKeyLocation): string {
  return location.kind === "file" ? `GOOGLE_KEY_PATH (${location.path})` : `GOOGLE_KEY_NAME (secret "${location.name}" in ${location.vaultUrl})`;
}

const KEY_FIX = "Create a JSON key for the service account (Google Cloud console > IAM & Admin > Service accounts > Keys > Add key > Create new key > JSON) and use that file unchanged";

function invalidKey(location: GoogleKeyLocation, problem: string): MailerError {
  const fix = location.kind === "file" ? `${KEY_FIX}: point GOOGLE_KEY_PATH at it.` : `${KEY_FIX}: store its whole content as a new version of the Key Vault secret named by GOOGLE_KEY_NAME.`;
  return new MailerError("GOOGLE_KEY_INVALID", `${keySetting(location)} is not a Google service account key: ${problem}`, { kind: "config", hint: fix });
}

function isAllowedUrl(value: string): boolean {
  try {
    const url = new URL(value);
    return url.protocol === "https:" || (url.protocol === "http:" && ["127.0.0.1", "localhost", "[::1]"].includes(url.hostname));
  } catch {
    return false;
  }
}

/**
 * Checks a key's JSON and returns what the grant needs. Problems are described by field name only:
 * parser messages are not passed on because they quote the text, which holds the private key.
 */
export function parseServiceAccountKey(text: string, location: GoogleKeyLocation): ServiceAccountKey {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw invalidKey(location, "it is not JSON");
  }
  if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) throw invalidKey(location, "it is not a JSON object");
  const key = parsed as Record<string, unknown>;
  if (typeof key.private_key === "string") registerSecret(key.private_key);
  if (key.type !== "service_account") {
    const what = key.type === "authorized_user" ? "a user's OAuth credential" : key.type === "external_account" ? "a workload identity federation configuration" : `type "${String(key.type)}"`;
    throw invalidKey(location, `it is ${what}, not a service account key ("type": "service_account")`);
  }
  const field = (name: string): string | undefined => (typeof key[name] === "string" && (key[name] as string).trim() !== "" ? (key[name] as string).trim() : undefined);
  const clientEmail = field("client_email");
  if (!clientEmail || !clientEmail.includes("@")) throw invalidKey(location, "client_email is missing");
  const privateKeyId = field("private_key_id");
  if (!privateKeyId) throw invalidKey(location, "private_key_id is missing");
  const pem = field("private_key");
  if (!pem || !pem.includes("-----BEGIN PRIVATE KEY-----")) throw invalidKey(location, "private_key is missing or not a PKCS#8 PEM block (-----BEGIN PRIVATE KEY-----)");
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey({ key: pem, format: "pem" });
  } catch {
    throw invalidKey(location, "private_key cannot be read as a PKCS#8 private key");
  }
  if (privateKey.asymmetricKeyType !== "rsa") throw invalidKey(location, `private_key is an ${String(privateKey.asymmetricKeyType)} key; Google service account keys are RSA`);
  const tokenUri = field("token_uri");
  // The assertion goes wherever token_uri says: only to an https endpoint (or one on this machine).
  if (tokenUri && !isAllowedUrl(tokenUri)) throw invalidKey(location, `token_uri must be an https URL, got "${tokenUri}"`);
  const x509CertUrl = field("client_x509_cert_url");
  return {
    clientEmail,
    clientId: field("client_id"),
    privateKeyId,
    privateKey,
    tokenUri,
    x509CertUrl: x509CertUrl && isAllowedUrl(x509CertUrl) ? x509CertUrl : undefined,
  };
}

/** Reads the key's JSON from its file or Key Vault secret; `invalidate()` makes the next load read again. */
export function serviceAccountKeySource(location: GoogleKeyLocation, logger: Logger): { load(): Promise<ServiceAccountKey & { source: string }>; invalidate(): void } {
  const secret = location.kind === "keyVault" ? secretSourceFor({ kind: "keyVault", vaultUrl: location.vaultUrl, name: location.name }, "Google service account key", logger) : undefined;
  const load = lazy(async () => {
    let text: string;
    let source: string;
    if (location.kind === "file") {
      try {
        text = await readFile(location.path, "utf8");
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code ?? "error";
        throw new MailerError("GOOGLE_KEY_UNREADABLE", `GOOGLE_KEY_PATH (${location.path}) cannot be read: ${code}`, {
          kind: "config",
          hint: "Set GOOGLE_KEY_PATH to the service account's JSON key file, readable by this process.",
          cause: error,
        });
      }
      source = location.path;
    } else {
      const loaded = await secret!.load();
      text = loaded.value;
      source = loaded.source;
    }
    let key: ServiceAccountKey;
    try {
      key = parseServiceAccountKey(text, location);
    } catch (error) {
      // A fixed secret version must be read on the next attempt, not the cached broken one.
      secret?.invalidate();
      throw error;
    }
    // client_id is what the Workspace admin enters for domain-wide delegation: worth seeing in the log.
    logger.log("info", "google.key.loaded", { source, clientEmail: key.clientEmail, clientId: key.clientId, privateKeyId: key.privateKeyId });
    return { ...key, source };
  });
  return {
    load,
    invalidate() {
      load.reset();
      secret?.invalidate();
    },
  };
}

export function googleServiceAccountCredential(auth: GoogleServiceAccountAuth, logger: Logger): CredentialSource {
  const keys = serviceAccountKeySource(auth.key, logger);
  return {
    method: "google-service-account",
    async tokenRequest() {
      const key = await keys.load();
      const tokenUrl = auth.tokenUrl ?? key.tokenUri ?? GOOGLE_TOKEN_URL;
      const iat = Math.floor(Date.now() / 1000);
      const header = { alg: "RS256", typ: "JWT", kid: key.privateKeyId };
      const claims = { iss: key.clientEmail, sub: auth.subject, scope: auth.scope, aud: tokenUrl, iat, exp: iat + GOOGLE_ASSERTION_LIFETIME_SECONDS };
      const assertion = await new SignJWT({ scope: claims.scope })
        .setProtectedHeader(header)
        .setIssuer(claims.iss)
        .setSubject(claims.sub)
        .setAudience(claims.aud)
        .setIssuedAt(claims.iat)
        .setExpirationTime(claims.exp)
        .sign(key.privateKey);
      // The claims are worth logging (they are what Google checks); the signed assertion is secret.
      logger.log("debug", "assertion.created", { header, claims });
      return { url: tokenUrl, form: { grant_type: JWT_BEARER_GRANT, assertion } };
    },
    invalidate() {
      keys.invalidate();
    },
  };
}
