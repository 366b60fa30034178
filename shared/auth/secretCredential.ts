// AUTH_METHOD=secret: client credentials with a client secret. (Being built: see issue 9.)
import type { AuthConfig } from "../config.js";
import { MailerError } from "../errors.js";
import type { Logger } from "../log.js";
import type { CredentialSource } from "./credentialSource.js";

export function secretCredential(_auth: Extract<AuthConfig, { method: "secret" }>, _logger: Logger): CredentialSource {
  return {
    method: "secret",
    tokenRequest: () => Promise.reject(new MailerError("AUTH_METHOD_UNAVAILABLE", "AUTH_METHOD=secret is not available in this build", { kind: "config" })),
    invalidate() {},
  };
}
