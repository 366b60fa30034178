// A CredentialSource turns our configured identity into one token request: where it goes, the form
// fields and any header. The TokenProvider does the HTTP, the caching, the single flight and the
// error handling for every method; a new auth method is one new file implementing this interface
// and one line in credentialSourceFor below.
//
// Two optional hooks let a credential see how its request ended, for methods whose credential
// changes with each use (refresh-token: the answer carries the next refresh token, which must be
// stored before the access token is used, and one instance at a time may redeem). Methods without
// them are unaffected; the TokenProvider awaits each hook before it returns or throws.
import type { AuthConfig, AuthMethod } from "../config.js";
import type { MailerError } from "../errors.js";
import type { Logger } from "../log.js";
import { certificateCredential } from "./certificateCredential.js";
import { googleServiceAccountCredential } from "./googleServiceAccountCredential.js";
import { passwordCredential } from "./passwordCredential.js";
import { refreshTokenCredential } from "./refreshTokenCredential.js";
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
  /**
   * Optional: the token endpoint answered 200 with an access token. Gets the parsed JSON answer
   * (secret: it holds the tokens) and is awaited before the access token is cached or used.
   */
  accepted?(response: Record<string, unknown>): Promise<void>;
  /**
   * Optional: the request failed (HTTP error, network, an answer without an access token). Resolves
   * "retry" when the credential has something new to send (one more request follows at once, never
   * more than one), or the error to throw: the same one or one with a hint of this method's own.
   */
  refused?(error: MailerError): Promise<MailerError | "retry">;
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
    case "refresh-token":
      return refreshTokenCredential(auth, logger);
  }
}
