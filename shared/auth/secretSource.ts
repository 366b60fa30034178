// A secret the credential needs (client secret, mailbox password, Google key JSON): either the
// value of an app setting (which the Functions host may have filled from a Key Vault reference), or
// a Key Vault secret we read ourselves by name. A Key Vault read is cached; `invalidate()` (the token
// endpoint rejected it) makes the next `load()` read the current version again, which is how a
// rotated secret is picked up without a restart.
import type { TokenCredential } from "@azure/identity";
import type { SecretLocation } from "../config.js";
import { lazy } from "../lazy.js";
import type { Logger } from "../log.js";
import { registerSecret } from "../redact.js";
import { azureCredential } from "./azureCredential.js";
import { keyVaultError } from "./certificateSource.js";

export interface LoadedSecret {
  /** Secret: never log it. */
  value: string;
  /** Where it came from, safe to log: the setting's name or the Key Vault secret's id. */
  source: string;
  version?: string;
  expiresOn?: Date;
}

export interface SecretSource {
  load(): Promise<LoadedSecret>;
  invalidate(): void;
}

export function secretSourceFor(location: SecretLocation, what: string, logger: Logger, options: { credential?: TokenCredential } = {}): SecretSource {
  if (location.kind === "value") {
    const loaded: LoadedSecret = { value: location.value, source: location.setting };
    return { load: () => Promise.resolve(loaded), invalidate() {} };
  }
  const { vaultUrl, name } = location;
  const getClient = lazy(async () => {
    const { SecretClient } = await import("@azure/keyvault-secrets");
    return new SecretClient(vaultUrl, options.credential ?? (await azureCredential()));
  });
  const load = lazy(async (): Promise<LoadedSecret> => {
    const client = await getClient();
    let secret: import("@azure/keyvault-secrets").KeyVaultSecret;
    try {
      secret = await client.getSecret(name);
    } catch (error) {
      throw keyVaultError(error, what, vaultUrl, name, "secret");
    }
    const value = secret.value ?? "";
    registerSecret(value);
    const expiresOn = secret.properties.expiresOn;
    logger.log("info", "secret.loaded", { what, vaultUrl, name, version: secret.properties.version, ...(expiresOn ? { expiresOn: expiresOn.toISOString() } : {}) });
    return { value, source: `${vaultUrl.replace(/\/$/, "")}/secrets/${name}`, ...(secret.properties.version ? { version: secret.properties.version } : {}), ...(expiresOn ? { expiresOn } : {}) };
  });
  return { load, invalidate: load.reset };
}
