// AUTH_METHOD=google-service-account: the JWT bearer grant with a service account key. (Being built: see issue 9.)
import type { AuthConfig } from "../config.js";
import { MailerError } from "../errors.js";
import type { Logger } from "../log.js";
import type { CredentialSource } from "./credentialSource.js";

export function googleServiceAccountCredential(_auth: Extract<AuthConfig, { method: "google-service-account" }>, _logger: Logger): CredentialSource {
  return {
    method: "google-service-account",
    tokenRequest: () => Promise.reject(new MailerError("AUTH_METHOD_UNAVAILABLE", "AUTH_METHOD=google-service-account is not available in this build", { kind: "config" })),
    invalidate() {},
  };
}
