// Reading what a token says without ever showing the token: its claims are decoded here (no
// signature check: the doctor only reports what the server put in it) and only named, non-secret
// claims leave this file.
import { decodeJwt } from "jose";
import { azureCredential } from "../auth/azureCredential.js";

export type Claims = Record<string, unknown>;

/** The claims of a JWT; undefined for an opaque token (Google's, or a test double's). */
export function claimsOf(token: string): Claims | undefined {
  try {
    return decodeJwt(token) as Claims;
  } catch {
    return undefined;
  }
}

export const stringClaim = (claims: Claims | undefined, name: string): string | undefined => {
  const value = claims?.[name];
  return typeof value === "string" && value !== "" ? value : undefined;
};

/** Application permissions (`roles`) and delegated ones (`scp`), as the resource sees them. */
export function permissionsOf(claims: Claims): { roles: string[]; scopes: string[] } {
  const roles = Array.isArray(claims["roles"]) ? (claims["roles"] as unknown[]).filter((r): r is string => typeof r === "string") : [];
  const scopes = (stringClaim(claims, "scp") ?? "").split(" ").filter(Boolean);
  return { roles, scopes };
}

/**
 * Who this process is to Azure (managed identity, `az login`, AZURE_CLIENT_ID…): the claims of a
 * token for `scope` from the same DefaultAzureCredential the sender uses. Undefined when no token
 * can be had, or it is not a JWT.
 */
export async function azureIdentity(scope: string): Promise<{ appId?: string; objectId?: string; upn?: string; tenantId?: string } | undefined> {
  try {
    const credential = await azureCredential();
    const token = await credential.getToken(scope, { abortSignal: AbortSignal.timeout(20_000) });
    const claims = token ? claimsOf(token.token) : undefined;
    if (!claims) return undefined;
    const appId = stringClaim(claims, "appid") ?? stringClaim(claims, "azp");
    const objectId = stringClaim(claims, "oid");
    const upn = stringClaim(claims, "upn") ?? stringClaim(claims, "unique_name");
    const tenantId = stringClaim(claims, "tid");
    return { ...(appId ? { appId } : {}), ...(objectId ? { objectId } : {}), ...(upn ? { upn } : {}), ...(tenantId ? { tenantId } : {}) };
  } catch {
    return undefined;
  }
}
