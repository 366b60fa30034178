// The client assertion: a short-lived JWT signed with the certificate's key that proves to the
// token endpoint who we are (RFC 7523 client authentication, Microsoft's "certificate credentials").
import { randomUUID } from "node:crypto";
import { SignJWT } from "jose";
import type { AssertionAlg } from "../config.js";
import type { SigningCertificate } from "./signingCertificate.js";

/** Entra accepts at most 10 minutes; shorter limits the damage of a leaked assertion. */
export const ASSERTION_LIFETIME_SECONDS = 600;

export interface AssertionClaims {
  aud: string;
  iss: string;
  sub: string;
  jti: string;
  nbf: number;
  iat: number;
  exp: number;
}

export interface ClientAssertion {
  /** The signed JWT. Secret: never log it. */
  jwt: string;
  /** What it says, safe to log. */
  claims: AssertionClaims;
  header: Record<string, string>;
}

export async function createClientAssertion(
  signing: SigningCertificate,
  options: { clientId: string; audience: string; alg: AssertionAlg; now?: Date },
): Promise<ClientAssertion> {
  const now = Math.floor((options.now ?? new Date()).getTime() / 1000);
  const claims: AssertionClaims = {
    aud: options.audience,
    iss: options.clientId,
    sub: options.clientId,
    jti: randomUUID(),
    nbf: now,
    iat: now,
    exp: now + ASSERTION_LIFETIME_SECONDS,
  };
  // PS256 + x5t#S256 is what Entra and msal-node use now; RS256 + SHA-1 x5t is the deprecated
  // form some servers (ADFS) still require, so it carries both thumbprints.
  const header: Record<string, string> = { alg: options.alg, typ: "JWT", "x5t#S256": signing.thumbprintSha256 };
  if (options.alg === "RS256") header["x5t"] = signing.thumbprintSha1;
  const jwt = await new SignJWT({ ...claims })
    .setProtectedHeader(header as { alg: string })
    .sign(signing.privateKey);
  return { jwt, claims, header };
}
