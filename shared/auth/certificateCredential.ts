// AUTH_METHOD=certificate: client credentials with a certificate client assertion (RFC 7523 client
// authentication, Microsoft's "certificate credentials").
import type { AuthConfig } from "../config.js";
import type { Logger } from "../log.js";
import { certificateSourceFor } from "./certificateSource.js";
import { createClientAssertion, type AssertionSignerSource } from "./clientAssertion.js";
import type { CredentialSource } from "./credentialSource.js";

export type CertificateAuth = Extract<AuthConfig, { method: "certificate" }>;

export function certificateCredential(auth: CertificateAuth, logger: Logger, certificates: AssertionSignerSource = certificateSourceFor(auth.certificate, logger)): CredentialSource {
  return {
    method: "certificate",
    async tokenRequest() {
      const signing = await certificates.load();
      const assertion = await createClientAssertion(signing, { clientId: auth.clientId, audience: auth.tokenUrl, alg: auth.assertionAlg });
      // Like nodemailer: log the claims of the assertion, never the signed token.
      logger.log("debug", "assertion.created", { header: assertion.header, claims: assertion.claims });
      return {
        url: auth.tokenUrl,
        form: {
          grant_type: "client_credentials",
          client_id: auth.clientId,
          scope: auth.scope,
          client_assertion_type: "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
          client_assertion: assertion.jwt,
        },
      };
    },
    invalidate() {
      certificates.invalidate();
    },
  };
}
