// AUTH_METHOD=password: the resource owner password credentials grant (RFC 6749 4.3), kept for
// tenants that still run mailboxes on a user's password. The token is delegated: it carries the
// user (upn) and `scp` SMTP.Send, and Exchange accepts it only for that user's mailbox (SMTP_USER).
// Microsoft discourages the grant: it cannot do MFA, so Conditional Access or Security Defaults break
// it, and federated users without password hash sync cannot use it. A public client sends only its
// client_id ("Allow public client flows" on); a confidential one adds its secret (CLIENT_AUTH).
import type { AuthConfig } from "../config.js";
import type { Logger } from "../log.js";
import { clientSecretAuthentication } from "./clientAuthentication.js";
import type { CredentialSource } from "./credentialSource.js";
import { secretSourceFor, type SecretSource } from "./secretSource.js";

export type PasswordAuth = Extract<AuthConfig, { method: "password" }>;

/** The deprecation warning is for the operator, once per process, not once per mailer or message. */
let deprecationWarned = false;

export function passwordCredential(
  auth: PasswordAuth,
  logger: Logger,
  passwords: SecretSource = secretSourceFor(auth.password, "mailbox password", logger),
  clientSecrets: SecretSource | undefined = auth.clientSecret ? secretSourceFor(auth.clientSecret, "client secret", logger) : undefined,
): CredentialSource {
  if (!deprecationWarned) {
    deprecationWarned = true;
    logger.log("warn", "auth.password_grant_deprecated", {
      method: "password",
      user: auth.username,
      problem: "AUTH_METHOD=password uses the resource owner password grant, which Microsoft deprecates: it cannot do multi-factor authentication, so MFA, Conditional Access or Security Defaults on the mailbox account make it fail (AADSTS50076/50079), and federated accounts cannot use it.",
      action: "Move to AUTH_METHOD=certificate (app-only: SMTP.SendAsApp plus the mailbox grant in Exchange; see the README's Azure setup), or, where the tenant allows only delegated access, to the delegated refresh-token flow (a user signs in once, interactively with MFA).",
    });
  }
  return {
    method: "password",
    async tokenRequest() {
      const [password, secret] = await Promise.all([passwords.load(), clientSecrets?.load()]);
      const client = secret ? clientSecretAuthentication(auth.clientId, secret.value, auth.clientAuth) : { form: { client_id: auth.clientId } };
      return {
        url: auth.tokenUrl,
        form: { grant_type: "password", ...client.form, username: auth.username, password: password.value, scope: auth.scope },
        ...("headers" in client && client.headers ? { headers: client.headers } : {}),
      };
    },
    invalidate() {
      // Either may have been the one refused (50126 names the password, 7000215 the secret); both
      // Key Vault reads are cheap, and a value from a setting stays what it is.
      passwords.invalidate();
      clientSecrets?.invalidate();
    },
  };
}
