// A CredentialSource turns our configured identity into the parameters of a token request. The
// TokenProvider does the HTTP, the caching and the error handling for every method; a new auth
// method is one new file implementing this interface.
import type { AuthConfig } from "../config.js";
import type { Logger } from "../log.js";
import { certificateSourceFor, type CertificateSource } from "./certificateSource.js";
import { createClientAssertion } from "./clientAssertion.js";

export interface CredentialSource {
  readonly method: string;
  /** Form fields for the token request, besides grant_type/client_id/scope. */
  tokenRequestParameters(tokenUrl: string): Promise<Record<string, string>>;
  /** The token endpoint rejected our credential: forget cached material (a renewal may be waiting). */
  invalidate(): void;
}

export function certificateCredential(auth: AuthConfig, logger: Logger, certificates: CertificateSource = certificateSourceFor(auth.certificate, logger)): CredentialSource {
  return {
    method: "certificate",
    async tokenRequestParameters(tokenUrl) {
      const signing = await certificates.load();
      const assertion = await createClientAssertion(signing, { clientId: auth.clientId, audience: tokenUrl, alg: auth.assertionAlg });
      // Like nodemailer: log the claims of the assertion, never the signed token.
      logger.log("debug", "assertion.created", { header: assertion.header, claims: assertion.claims });
      return {
        grant_type: "client_credentials",
        client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        client_assertion: assertion.jwt,
      };
    },
    invalidate() {
      certificates.invalidate();
    },
  };
}

export function credentialSourceFor(auth: AuthConfig, logger: Logger): CredentialSource {
  switch (auth.method) {
    case "certificate":
      return certificateCredential(auth, logger);
  }
}
