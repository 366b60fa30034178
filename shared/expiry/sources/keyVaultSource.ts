// Every certificate and secret in the vault (narrowed by EXPIRY_WATCH_NAMES), with expiresOn from
// the list calls: one request per page, no per-item reads. Certificate-backed secrets are skipped
// (they are the certificates again). The sender's own certificate (CERT_NAME) and client secret
// (CLIENT_SECRET_NAME) are always included and marked in use.
import type { TokenCredential } from "@azure/identity";
import { azureCredential } from "../../auth/azureCredential.js";
import { errorFinding, type ExpiryFinding, type ExpiryItem } from "../finding.js";
import type { ExpirySource } from "./source.js";

/** Exact names or `prefix*` patterns, case-insensitive like Key Vault names. Empty matches all. */
export function nameMatcher(patterns: string[]): (name: string) => boolean {
  if (patterns.length === 0) return () => true;
  const lowered = patterns.map((p) => p.toLowerCase());
  return (name) => {
    const n = name.toLowerCase();
    return lowered.some((p) => (p.endsWith("*") ? n.startsWith(p.slice(0, -1)) : n === p));
  };
}

function describeError(error: unknown): { detail: string; action: string } {
  const status = (error as { statusCode?: number }).statusCode;
  const message = (error as Error).message?.split("\n")[0] ?? String(error);
  if (status === 401 || status === 403) {
    return { detail: `access denied (${status}): ${message}`, action: "Give the identity the 'Key Vault Reader' role (metadata is enough for the expiry watch) on the vault." };
  }
  return { detail: `${status ?? "network"}: ${message}`, action: "Check KEY_VAULT_URL and that the vault is reachable." };
}

export function keyVaultSource(vaultUrl: string, options: { certName?: string; secretNames?: string[]; watchNames: string[]; credential?: TokenCredential }): ExpirySource {
  const watched = nameMatcher(options.watchNames);
  const inUse = (name: string) => options.certName !== undefined && name.toLowerCase() === options.certName.toLowerCase();
  const secretNames = options.secretNames ?? [];
  const secretInUse = (name: string) => secretNames.some((s) => s.toLowerCase() === name.toLowerCase());
  return {
    name: "key-vault",
    async list() {
      const [{ CertificateClient }, { SecretClient }] = await Promise.all([import("@azure/keyvault-certificates"), import("@azure/keyvault-secrets")]);
      const credential = options.credential ?? (await azureCredential());
      const items: ExpiryItem[] = [];
      const errors: ExpiryFinding[] = [];
      try {
        for await (const certificate of new CertificateClient(vaultUrl, credential).listPropertiesOfCertificates()) {
          const name = certificate.name ?? "";
          if (!watched(name) && !inUse(name)) continue;
          items.push({
            // The expiry (and thumbprint) in the key: a renewed version is a new item.
            key: `kv:certificate:${vaultUrl}:${name}:${certificate.expiresOn?.toISOString() ?? "none"}`,
            name,
            kind: "certificate",
            source: vaultUrl,
            enabled: certificate.enabled !== false,
            ...(certificate.expiresOn ? { expiresOn: certificate.expiresOn } : {}),
            ...(inUse(name) ? { inUse: true } : {}),
          });
        }
      } catch (error) {
        const { detail, action } = describeError(error);
        errors.push(errorFinding(`kv:certificates:${vaultUrl}`, "(certificates)", "certificate", vaultUrl, `cannot list certificates: ${detail}`, action));
      }
      try {
        for await (const secret of new SecretClient(vaultUrl, credential).listPropertiesOfSecrets()) {
          if (secret.managed || (!watched(secret.name) && !secretInUse(secret.name))) continue;
          items.push({
            key: `kv:secret:${vaultUrl}:${secret.name}:${secret.expiresOn?.toISOString() ?? "none"}`,
            name: secret.name,
            kind: "secret",
            source: vaultUrl,
            enabled: secret.enabled !== false,
            ...(secret.expiresOn ? { expiresOn: secret.expiresOn } : {}),
            ...(secretInUse(secret.name) ? { inUse: true } : {}),
          });
        }
      } catch (error) {
        const { detail, action } = describeError(error);
        errors.push(errorFinding(`kv:secrets:${vaultUrl}`, "(secrets)", "secret", vaultUrl, `cannot list secrets: ${detail}`, action));
      }
      if (options.certName && !items.some((i) => i.kind === "certificate" && inUse(i.name)) && errors.length === 0) {
        errors.push(errorFinding(`kv:certificate:${vaultUrl}:${options.certName}`, options.certName, "certificate", vaultUrl, `CERT_NAME "${options.certName}" is not in the vault`, "Check CERT_NAME."));
      }
      for (const name of secretNames) {
        if (errors.length === 0 && !items.some((i) => i.kind === "secret" && i.name.toLowerCase() === name.toLowerCase())) {
          errors.push(errorFinding(`kv:secret:${vaultUrl}:${name}`, name, "secret", vaultUrl, `CLIENT_SECRET_NAME "${name}" is not in the vault`, "Check CLIENT_SECRET_NAME."));
        }
      }
      return { items, errors };
    },
  };
}
