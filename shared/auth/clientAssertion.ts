// The client assertion: a short-lived JWT signed with the certificate's key that proves to the
// token endpoint who we are (RFC 7523 client authentication, Microsoft's "certificate credentials").
// Header and claims are built here once; only the signing step differs between a key we hold
// (CERT_PATH, an exportable Key Vault certificate) and a key that stays in Key Vault
// (CERT_SIGNING=vault, shared/auth/vaultSigningCredential.ts). Both go through the same compact
// JWS serialization (RFC 7515 section 7.1), so the tests of one cover the other.
import { constants, randomUUID, sign } from "node:crypto";
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

/** What differs between signing here and signing in Key Vault: the key, reached through `sign`. */
export interface AssertionSigner {
  /** base64url SHA-256 of the certificate's DER (`x5t#S256`). */
  thumbprintSha256: string;
  /** base64url SHA-1 of the certificate's DER (legacy `x5t`, RS256 only). */
  thumbprintSha1: string;
  /** The raw JWS signature over `signingInput` (ASCII of `base64url(header).base64url(claims)`). */
  sign(alg: AssertionAlg, signingInput: Buffer): Promise<Uint8Array>;
}

/** Where the current signer comes from: read once, read again after `invalidate()` (a rejection). */
export interface AssertionSignerSource {
  load(): Promise<SigningCertificate | AssertionSigner>;
  invalidate(): void;
}

/** A certificate whose private key is in this process (file, exported from Key Vault) signs here. */
export function localSigner(signing: SigningCertificate): AssertionSigner {
  return {
    thumbprintSha256: signing.thumbprintSha256,
    thumbprintSha1: signing.thumbprintSha1,
    sign: async (alg, signingInput) =>
      sign("sha256", signingInput, alg === "PS256"
        // RFC 7518 3.5: PS256 is RSASSA-PSS with SHA-256, MGF1 SHA-256 and a 32-byte salt.
        ? { key: signing.privateKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }
        : { key: signing.privateKey, padding: constants.RSA_PKCS1_PADDING }),
  };
}

function isSigner(key: SigningCertificate | AssertionSigner): key is AssertionSigner {
  return typeof (key as Partial<AssertionSigner>).sign === "function";
}

export async function createClientAssertion(
  key: SigningCertificate | AssertionSigner,
  options: { clientId: string; audience: string; alg: AssertionAlg; now?: Date },
): Promise<ClientAssertion> {
  const signer = isSigner(key) ? key : localSigner(key);
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
  const header: Record<string, string> = { alg: options.alg, typ: "JWT", "x5t#S256": signer.thumbprintSha256 };
  if (options.alg === "RS256") header["x5t"] = signer.thumbprintSha1;
  const signingInput = `${base64url(JSON.stringify(header))}.${base64url(JSON.stringify(claims))}`;
  const signature = await signer.sign(options.alg, Buffer.from(signingInput, "ascii"));
  return { jwt: `${signingInput}.${Buffer.from(signature).toString("base64url")}`, claims, header };
}

function base64url(text: string): string {
  return Buffer.from(text, "utf8").toString("base64url");
}
