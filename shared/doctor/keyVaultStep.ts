// Step 3: Key Vault reachable and the credential readable by the identity the process runs as. A
// 401/403 names that identity (the oid/appid of its Azure token for the vault, or the caller Key
// Vault names in its answer) and the role it lacks: Certificate User (read the certificate and its
// exportable key), Secrets User (client secret, password, Google key), Crypto User (CERT_SIGNING=vault).
import type { AuthConfig } from "../config.js";
import { failed, pass, skip, type Check } from "./check.js";
import type { MaterialOutcome } from "./credentialMaterial.js";
import { identityInResponse, type FixContext } from "./fixes.js";
import { azureIdentity } from "./tokenClaims.js";

/** Where the credential is when it is not in Key Vault, for the skip line. */
function notInVault(auth: AuthConfig): string {
  switch (auth.method) {
    case "certificate":
      return auth.certificate.kind === "file" ? "the certificate is a local file (CERT_PATH)" : "";
    case "secret":
      return `the client secret is an app setting (${auth.clientSecret.kind === "value" ? auth.clientSecret.setting : "CLIENT_SECRET"})`;
    case "password":
      return "the password is an app setting (MAILBOX_PASSWORD)";
    case "google-service-account":
      return "the Google key is a file (GOOGLE_KEY_PATH)";
    case "refresh-token":
      return "the refresh token is a local file (REFRESH_TOKEN_PATH)";
  }
}

export async function keyVaultStep(auth: AuthConfig, outcome: MaterialOutcome, context: FixContext): Promise<Check> {
  if (outcome.vaultItems.length === 0) return skip("keyvault", `not used: ${notInVault(auth)}`);
  const vaultUrl = outcome.vaultItems[0]!.vaultUrl;
  if (outcome.vaultError) {
    const { error, item } = outcome.vaultError;
    let azure: FixContext["azureIdentity"];
    if (error.code === "KEYVAULT_ACCESS_DENIED") {
      // Who we are to the vault: the token's claims first, else the caller the vault named.
      azure = { ...identityInResponse(error.response ?? error.message), ...(await azureIdentity("https://vault.azure.net/.default")) };
    }
    const check = failed("keyvault", error, { ...context, keyVault: item, ...(azure ? { azureIdentity: azure } : {}) });
    if (azure && (azure.objectId || azure.appId)) {
      check.message += ` [identity in use: ${azure.upn ? `${azure.upn}, ` : ""}app id ${azure.appId ?? "?"}, object id ${azure.objectId ?? "?"}]`;
    }
    return check;
  }
  return pass("keyvault", `${vaultUrl}: ${outcome.vaultProof.join("; ") || "reachable"}`);
}
