// A CredentialSource turns our configured identity into one token request: where it goes, the form
// fields and any header. The TokenProvider does the HTTP, the caching, the single flight and the
// error handling for every method; a new auth method is one new file implementing this interface
// and one line in credentialSourceFor below.
import type { AuthConfig, AuthMethod } from "../config.js";
import type { Logger } from "../log.js";
import { certificateCredential } from "./certificateCredential.js";
import { googleServiceAccountCredential } from "./googleServiceAccountCredential.js";
import { passwordCredential } from "./passwordCredential.js";
import { secretCredential } from "./secretCredential.js";
import { vaultSigningCredential } from "./vaultSigningCredential.js";

export interface TokenRequest {
  /** The token endpoint. */
  url: string;
  /** Form fields, all of them: grant_type, client_id, scope and the credential itself. Secret. */
  form: Record<string, string>;
  /** Extra request headers (HTTP Basic client authentication). Secret. */
  headers?: Record<string, string>;
}

export interface CredentialSource {
  readonly method: AuthMethod;
  /** One token request; signed assertions are made fresh for each (a new jti every time). */
  tokenRequest(): Promise<TokenRequest>;
  /** The token endpoint rejected our credential: forget cached material (a renewal may be waiting). */
  invalidate(): void;
}

export function credentialSourceFor(auth: AuthConfig, logger: Logger): CredentialSource {
  switch (auth.method) {
    case "certificate":
      return auth.signing === "vault" ? vaultSigningCredential(auth, logger) : certificateCredential(auth, logger);
    case "secret":
      return secretCredential(auth, logger);
    case "google-service-account":
      return googleServiceAccountCredential(auth, logger);
    case "password":
      return passwordCredential(auth, logger);
  }
}
