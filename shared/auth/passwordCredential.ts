// AUTH_METHOD=password: the resource owner password grant (legacy). (Being built: see issue 9.)
import type { AuthConfig } from "../config.js";
import { MailerError } from "../errors.js";
import type { Logger } from "../log.js";
import type { CredentialSource } from "./credentialSource.js";

export function passwordCredential(_auth: Extract<AuthConfig, { method: "password" }>, _logger: Logger): CredentialSource {
  return {
    method: "password",
    tokenRequest: () => Promise.reject(new MailerError("AUTH_METHOD_UNAVAILABLE", "AUTH_METHOD=password is not available in this build", { kind: "config" })),
    invalidate() {},
  };
}
