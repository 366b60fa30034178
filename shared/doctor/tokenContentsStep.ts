// Step 6: what the token says, decoded here and never printed: its audience (the resource it is
// for), tenant, expiry, and the permission the transport needs: SMTP.SendAsApp (app-only) or
// SMTP.Send (delegated) for Exchange SMTP, Mail.Send for Graph. A missing permission fails here,
// before any SMTP, with the portal path and the admin-consent step.
import type { SendConfig } from "../config.js";
import type { AccessToken } from "../token/tokenProvider.js";
import { fail, pass, skip, warn, type Check } from "./check.js";
import { permissionFix, type FixContext } from "./fixes.js";
import { claimsOf, permissionsOf, stringClaim } from "./tokenClaims.js";

/** Exchange Online's names: its resource URIs and its app id. */
const EXCHANGE_AUDIENCES = ["https://outlook.office365.com", "https://outlook.office.com", "00000002-0000-0ff1-ce00-000000000000"];
/** Microsoft Graph's resource URI and app id. */
const GRAPH_AUDIENCES = ["https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"];
const GUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export interface TokenContentsResult {
  check: Check;
  /** Claims worth naming in later fixes (object id and app id for Exchange's commands). */
  token: NonNullable<FixContext["token"]>;
  /** Whether the transport can be tried at all: a token without the permission cannot work. */
  transportMayWork: boolean;
}

const normalise = (audience: string) => audience.replace(/\/+$/, "").toLowerCase();

export function tokenContentsStep(config: SendConfig, token: AccessToken, context: FixContext, now = new Date()): TokenContentsResult {
  const claims = claimsOf(token.token);
  if (!claims) {
    // Google's access tokens (ya29.…) are opaque: only Gmail can say what they allow (step transport).
    return { check: skip("token-contents", `the token is opaque (not a JWT): ${config.auth.method === "google-service-account" ? "Gmail checks its scope at step transport" : "its permissions show at step transport"}; expires ${token.expiresAt.toISOString()}`), token: {}, transportMayWork: true };
  }
  const audience = [claims["aud"]].flat().filter((a): a is string => typeof a === "string");
  const tenant = stringClaim(claims, "tid");
  const objectId = stringClaim(claims, "oid");
  const appId = stringClaim(claims, "appid") ?? stringClaim(claims, "azp");
  const exp = typeof claims["exp"] === "number" ? new Date(claims["exp"] * 1000) : token.expiresAt;
  const { roles, scopes } = permissionsOf(claims);
  const delegated = scopes.length > 0 && roles.length === 0;
  const facts = { ...(objectId ? { objectId } : {}), ...(appId ? { appId } : {}), ...(tenant ? { tenantId: tenant } : {}), ...(audience[0] ? { audience: audience[0] } : {}) };
  const described = [
    `aud ${audience.join(", ") || "?"}`,
    `tid ${tenant ?? "?"}`,
    ...(appId ? [`appid ${appId}`] : []),
    ...(objectId ? [`oid ${objectId}`] : []),
    delegated ? `scp ${scopes.join(" ")}${stringClaim(claims, "upn") ? ` for ${stringClaim(claims, "upn")}` : ""}` : `roles ${roles.join(", ") || "(none)"}`,
    `expires ${exp.toISOString()}`,
  ].join(", ");

  if (config.auth.method === "google-service-account") {
    const scope = stringClaim(claims, "scope") ?? stringClaim(claims, "scp");
    if (scope !== undefined && !scope.split(" ").includes("https://mail.google.com/")) {
      return { check: fail("token-contents", "TOKEN_ROLE_MISSING", `the token's scope is "${scope}", without https://mail.google.com/`, "Set TOKEN_SCOPE to https://mail.google.com/ (its default for this method) and grant that scope in domain-wide delegation."), token: facts, transportMayWork: false };
    }
    return { check: pass("token-contents", described), token: facts, transportMayWork: true };
  }

  const graph = config.transport === "graph";
  const wanted = graph ? GRAPH_AUDIENCES : EXCHANGE_AUDIENCES;
  const audienceOk = audience.some((a) => wanted.includes(normalise(a)) || (graph && normalise(a).startsWith(normalise(config.graph.url))));
  if (!audienceOk) {
    const scope = graph ? "https://graph.microsoft.com/.default" : "https://outlook.office365.com/.default";
    return {
      check: fail("token-contents", "TOKEN_AUDIENCE_WRONG", `the token is for ${audience.join(", ") || "no audience"}, not ${graph ? "Microsoft Graph" : "Exchange Online"} (${described})`, `TOKEN_SCOPE (${config.auth.scope}) asks for the wrong resource: set it to ${scope}${config.auth.method === "password" ? ` (delegated: ${graph ? "https://graph.microsoft.com/Mail.Send" : "https://outlook.office365.com/SMTP.Send"})` : ""}, or leave it unset for the default of TRANSPORT=${config.transport}.`),
      token: facts,
      transportMayWork: false,
    };
  }
  const expected = "tenantId" in config.auth ? config.auth.tenantId : "";
  if (tenant && GUID.test(expected) && tenant.toLowerCase() !== expected.toLowerCase()) {
    return { check: fail("token-contents", "TOKEN_TENANT_MISMATCH", `the token is from tenant ${tenant}, but TENANT_ID is ${expected}`, "Set TENANT_ID to the tenant of the mailbox (Directory (tenant) ID), and TOKEN_URL/AUTHORITY_HOST to that tenant's endpoint."), token: facts, transportMayWork: false };
  }
  const needed = graph ? "Mail.Send" : delegated ? "SMTP.Send" : "SMTP.SendAsApp";
  const granted = delegated ? scopes : roles;
  if (!granted.includes(needed)) {
    const kind = delegated ? "delegated permission (scp)" : "application permission (roles)";
    return {
      check: fail("token-contents", "TOKEN_ROLE_MISSING", `the token carries no ${needed} ${kind}: ${described}`, permissionFix({ ...context, token: facts })),
      token: facts,
      transportMayWork: false,
    };
  }
  if (exp.getTime() <= now.getTime()) {
    return { check: warn("token-contents", "TOKEN_EXPIRED", `the token expired at ${exp.toISOString()} by this machine's clock (${described})`, "The token endpoint and this machine disagree about the time: synchronise the clock (NTP)."), token: facts, transportMayWork: true };
  }
  return { check: pass("token-contents", described), token: facts, transportMayWork: true };
}
