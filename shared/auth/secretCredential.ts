// AUTH_METHOD=secret: the client credentials grant with a client secret (Microsoft's "shared secret"
// case): app-only, like the certificate, so the app needs SMTP.SendAsApp and the mailbox grant in
// Exchange. The secret is an app setting (possibly a Functions Key Vault reference) or a Key Vault
// secret we read ourselves; after the token endpoint rejects it, the next request reads the vault
// again, so a rotated secret is picked up without a restart.
import type { AuthConfig } from "../config.js";
import type { Logger } from "../log.js";
import { clientSecretAuthentication } from "./clientAuthentication.js";
import type { CredentialSource } from "./credentialSource.js";
import { secretSourceFor, type SecretSource } from "./secretSource.js";

export type SecretAuth = Extract<AuthConfig, { method: "secret" }>;

export function secretCredential(auth: SecretAuth, logger: Logger, secrets: SecretSource = secretSourceFor(auth.clientSecret, "client secret", logger)): CredentialSource {
  return {
    method: "secret",
    async tokenRequest() {
      const secret = await secrets.load();
      // client_secret_post puts client_id and client_secret in the form; client_secret_basic sends
      // both in the Authorization header only (RFC 6749 2.3.1).
      const client = clientSecretAuthentication(auth.clientId, secret.value, auth.clientAuth);
      logger.log("debug", "client_secret.used", { source: secret.source, ...(secret.version ? { version: secret.version } : {}), clientAuth: auth.clientAuth });
      return {
        url: auth.tokenUrl,
        form: { grant_type: "client_credentials", scope: auth.scope, ...client.form },
        ...(client.headers ? { headers: client.headers } : {}),
      };
    },
    invalidate() {
      secrets.invalidate();
    },
  };
}
