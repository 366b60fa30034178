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
      hint: use === "secret" ? "Check the secret's name setting and that the secret is enabled." : "Check CERT_NAME; the certificate's key policy must be exportable to sign locally (or use CERT_SIGNING=vault).",
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

/**
 * The certificate through the certificates API (public part, current version) and its private key
 * through the secrets API under the same name and version: that is where Key Vault keeps an
 * exportable certificate's key, as PKCS#12 (default) or PEM depending on the certificate policy.
 * Read once; afterwards, at most every `renewalCheckSeconds`, one metadata read tells whether a
 * renewed version appeared, and only then is the new key read.
 */
export function keyVaultCertificateSource(
  vaultUrl: string,
  name: string,
  logger: Logger,
  options: { credential?: TokenCredential; renewalCheckSeconds?: number; now?: () => number } = {},
): CertificateSource {
  const now = options.now ?? Date.now;
  const checkEveryMs = (options.renewalCheckSeconds ?? RENEWAL_CHECK_SECONDS) * 1000;
  const getClients = lazy(async () => {
    const [{ CertificateClient }, { SecretClient }] = await Promise.all([import("@azure/keyvault-certificates"), import("@azure/keyvault-secrets")]);
    const tokenCredential = options.credential ?? (await azureCredential());
    return { certificates: new CertificateClient(vaultUrl, tokenCredential), secrets: new SecretClient(vaultUrl, tokenCredential) };
  });

  async function currentVersion(): Promise<string | undefined> {
    const { certificates } = await getClients();
    try {
      const certificate = await certificates.getCertificate(name);
      if (certificate.properties.enabled === false) {
        throw new MailerError("KEYVAULT_CERT_DISABLED", `Key Vault certificate "${name}" is disabled`, { kind: "config", hint: "Enable it or set CERT_NAME to the current certificate." });
      }
      return certificate.properties.version;
    } catch (error) {
      throw error instanceof MailerError ? error : keyVaultError(error, "certificate", vaultUrl, name);
    }
  }

  async function readVersion(version: string | undefined): Promise<SigningCertificate> {
    const { secrets } = await getClients();
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

  let cached: { signing: SigningCertificate; version: string | undefined; checkedAt: number } | undefined;
  let pending: Promise<SigningCertificate> | undefined;

  async function refresh(): Promise<SigningCertificate> {
    if (cached && now() - cached.checkedAt < checkEveryMs) return cached.signing;
    const version = await currentVersion();
    if (cached && version === cached.version) {
      cached.checkedAt = now();
      return cached.signing;
    }
    if (cached) logger.log("info", "certificate.renewed", { name, previousVersion: cached.version, version });
    const signing = await readVersion(version);
    cached = { signing, version, checkedAt: now() };
    return signing;
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

export function certificateSourceFor(location: CertificateLocation, logger: Logger): CertificateSource {
  return location.kind === "file"
    ? fileCertificateSource(location.path, location.password)
    : keyVaultCertificateSource(location.vaultUrl, location.name, logger);
}
