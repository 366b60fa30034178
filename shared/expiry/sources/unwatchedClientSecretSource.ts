// The sender's client secret is an app setting (CLIENT_SECRET, or a Key Vault reference the host has
// already resolved): its value says nothing about when it ends, which only the app registration
// knows. Without EXPIRY_CHECK_APP_REGISTRATION the watch cannot see it, and says so every run rather
// than let the secret expire in silence.
import type { ExpiryFinding } from "../finding.js";
import type { ExpirySource } from "./source.js";

export function unwatchedClientSecretSource(setting: string): ExpirySource {
  const notice: ExpiryFinding = {
    key: `setting:${setting}`,
    name: setting,
    kind: "app-secret",
    source: `app setting ${setting}`,
    enabled: true,
    inUse: true,
    status: "unchecked",
    detail: `the client secret in ${setting} has no expiry date this watch can read`,
    action: "Set EXPIRY_CHECK_APP_REGISTRATION=true (and grant the watch's identity Microsoft Graph Application.Read.All) to watch the secret's end date on the app registration, or keep the secret in Key Vault with an expiry date and set CLIENT_SECRET_NAME.",
  };
  return { name: "client-secret-setting", list: () => Promise.resolve({ items: [], errors: [], notices: [notice] }) };
}
