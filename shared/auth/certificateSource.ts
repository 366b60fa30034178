// Where the signing certificate lives: a local file (development, on-premises) or Key Vault.
// Either way it is read once and kept in memory; `invalidate()` (called when the token endpoint
// rejects our key) makes the next `load()` read it again, which is also how a renewed certificate
// is picked up.
import { readFile } from "node:fs/promises";
import type { TokenCredential } from "@azure/identity";
import type { CertificateLocation } from "../config.js";
import { MailerError } from "../errors.js";
import { lazy } from "../lazy.js";
import type { Logger } from "../log.js";
import { parseCertificateFile, parsePemBundle, parsePkcs12, type SigningCertificate } from "./signingCertificate.js";
import { azureCredential } from "./azureCredential.js";

export interface CertificateSource {
  load(): Promise<SigningCertificate>;
  invalidate(): void;
}

/** Caches one in-flight or finished load; a failed load is not cached. */
function cachedSource(read: () => Promise<SigningCertificate>): CertificateSource {
  const load = lazy(read);
  return { load, invalidate: load.reset };
}

export function fileCertificateSource(path: string, password?: string): CertificateSource {
  return cachedSource(async () => {
    let bytes: Buffer;
    try {
      bytes = await readFile(path);
    } catch (error) {
      throw new MailerError("CERT_FILE_UNREADABLE", `CERT_PATH ${path} cannot be read: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`, {
        kind: "config",
        hint: "Set CERT_PATH to a PEM (certificate + private key) or .pfx file readable by this process.",
      });
    }
    return parseCertificateFile(bytes, path, password);
  });
}

interface RestLikeError {
  statusCode?: number;
  code?: string;
  message?: string;
}

/** What was being done in the vault: it decides the role an access denial names. */
export type KeyVaultUse = "certificate" | "secret" | "sign";

const rolesFor: Record<KeyVaultUse, string> = {
  certificate: "Grant the app's identity the 'Key Vault Certificate User' role on the vault (it reads the certificate and its exportable key).",
  secret: "Grant the app's identity the 'Key Vault Secrets User' role on the vault (or on this secret).",
  sign: "CERT_SIGNING=vault signs inside the vault: grant the app's identity the 'Key Vault Crypto User' role (sign) and 'Key Vault Certificate User' (to read the public certificate).",
};

export function keyVaultError(error: unknown, what: string, vaultUrl: string, name: string, use: KeyVaultUse = "certificate"): MailerError {
  const rest = error as RestLikeError & { response?: { headers?: { get?(name: string): string | undefined } } };
  const status = rest.statusCode;
  const detail = `${rest.code ?? ""} ${rest.message ?? String(error)}`.trim();
  if (status === 401 || status === 403) {
    return new MailerError("KEYVAULT_ACCESS_DENIED", `Key Vault ${vaultUrl} refused to ${use === "sign" ? "sign with" : "read"} ${what} "${name}" (${status}): ${detail}`, {
      kind: "config",
      response: detail,
      hint: rolesFor[use],
      cause: error,
    });
  }
  if (status === 404) {
    return new MailerError("KEYVAULT_NOT_FOUND", `Key Vault ${vaultUrl} has no ${what} "${name}"${what === "private key" ? " (is the certificate exportable?)" : ""}`, {
      kind: "config",
      response: detail,
      hint: use === "secret"
        ? "Check the secret's name setting and that the secret is enabled."
        : use === "sign"
          ? "Check CERT_NAME: the current version of the certificate must have its key in the vault (a certificate still pending issuance has none yet)."
          : "Check CERT_NAME; the certificate's key policy must be exportable to sign locally (or use CERT_SIGNING=vault).",
      cause: error,
    });
  }
  // Throttling, server errors, network: worth retrying, no sooner than the vault asked.
  const retryAfter = rest.response?.headers?.get?.("retry-after");
  return new MailerError("KEYVAULT_UNAVAILABLE", `Key Vault ${vaultUrl} could not be read (${status ?? "network"}): ${detail}`, {
    kind: "transient",
    response: detail,
    cause: error,
    ...(retryAfter !== undefined && /^\d+$/.test(retryAfter) ? { retryAfterSeconds: Number(retryAfter) } : {}),
  });
}

/** How often a cached Key Vault certificate is checked for a newer version (at the next token request). */
export const RENEWAL_CHECK_SECONDS = 30 * 60;

export interface KeyVaultCertificateOptions {
  credential?: TokenCredential;
  renewalCheckSeconds?: number;
  now?: () => number;
}

/**
 * Follows the current version of a Key Vault certificate and keeps what `build` makes of it (a
 * signing certificate with its exported key, or a signer that signs inside the vault). The
 * certificate is read once; afterwards, at most every `renewalCheckSeconds`, one metadata read
 * tells whether a renewed version appeared, and only then is `build` called again.
 * `invalidate()` (the token endpoint rejected us) makes the next `load()` read the current version.
 */
export function followKeyVaultCertificate<T>(
  vaultUrl: string,
  name: string,
  logger: Logger,
  build: (certificate: import("@azure/keyvault-certificates").KeyVaultCertificateWithPolicy, credential: TokenCredential) => Promise<T>,
  options: KeyVaultCertificateOptions = {},
): { load(): Promise<T>; invalidate(): void } {
  const now = options.now ?? Date.now;
  const checkEveryMs = (options.renewalCheckSeconds ?? RENEWAL_CHECK_SECONDS) * 1000;
  const getClient = lazy(async () => {
    const { CertificateClient } = await import("@azure/keyvault-certificates");
    const tokenCredential = options.credential ?? (await azureCredential());
    return { certificates: new CertificateClient(vaultUrl, tokenCredential), tokenCredential };
  });

  async function current(): Promise<import("@azure/keyvault-certificates").KeyVaultCertificateWithPolicy> {
    const { certificates } = await getClient();
    try {
      const certificate = await certificates.getCertificate(name);
      if (certificate.properties.enabled === false) {
        throw new MailerError("KEYVAULT_CERT_DISABLED", `Key Vault certificate "${name}" is disabled`, { kind: "config", hint: "Enable it or set CERT_NAME to the current certificate." });
      }
      return certificate;
    } catch (error) {
      throw error instanceof MailerError ? error : keyVaultError(error, "certificate", vaultUrl, name);
    }
  }

  let cached: { value: T; version: string | undefined; checkedAt: number } | undefined;
  let pending: Promise<T> | undefined;

  async function refresh(): Promise<T> {
    if (cached && now() - cached.checkedAt < checkEveryMs) return cached.value;
    const certificate = await current();
    const version = certificate.properties.version;
    if (cached && version === cached.version) {
      cached.checkedAt = now();
      return cached.value;
    }
    if (cached) logger.log("info", "certificate.renewed", { name, previousVersion: cached.version, version });
    const value = await build(certificate, (await getClient()).tokenCredential);
    cached = { value, version, checkedAt: now() };
    return value;
  }

  return {
    load() {
      pending ??= refresh().finally(() => {
        pending = undefined;
      });
      return pending;
    },
    invalidate() {
      cached = undefined;
    },
  };
}

/**
 * The certificate through the certificates API (public part, current version) and its private key
 * through the secrets API under the same name and version: that is where Key Vault keeps an
 * exportable certificate's key, as PKCS#12 (default) or PEM depending on the certificate policy.
 */
export function keyVaultCertificateSource(vaultUrl: string, name: string, logger: Logger, options: KeyVaultCertificateOptions = {}): CertificateSource {
  const getSecrets = lazy(async () => {
    const { SecretClient } = await import("@azure/keyvault-secrets");
    return new SecretClient(vaultUrl, options.credential ?? (await azureCredential()));
  });

  async function readVersion(version: string | undefined): Promise<SigningCertificate> {
    const secrets = await getSecrets();
    let secret: import("@azure/keyvault-secrets").KeyVaultSecret;
    try {
      secret = await secrets.getSecret(name, version === undefined ? {} : { version });
    } catch (error) {
      throw keyVaultError(error, "private key", vaultUrl, name);
    }
    const source = `${vaultUrl.replace(/\/$/, "")}/certificates/${name}/${version ?? "latest"}`;
    const value = secret.value ?? "";
    const contentType = secret.properties.contentType ?? "";
    const parsed = contentType === "application/x-pem-file" || value.includes("-----BEGIN")
      ? parsePemBundle(value, source)
      : parsePkcs12(Buffer.from(value, "base64"), source, "");
    logger.log("info", "certificate.loaded", { source, contentType: contentType || "unknown", thumbprintSha256: parsed.thumbprintSha256, notAfter: parsed.notAfter.toISOString() });
    return parsed;
  }

  return followKeyVaultCertificate(vaultUrl, name, logger, (certificate) => readVersion(certificate.properties.version), options);
}

export function certificateSourceFor(location: CertificateLocation, logger: Logger): CertificateSource {
  return location.kind === "file"
    ? fileCertificateSource(location.path, location.password)
    : keyVaultCertificateSource(location.vaultUrl, location.name, logger);
}
