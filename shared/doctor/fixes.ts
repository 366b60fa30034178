// The one place that turns an error code into the setup step it belongs to and the fix for it.
// `queue-mailer doctor` prints it under a failed check; the circuit breaker writes the same step and
// fix into its `circuit.open` log record, so an operator reading the logs gets the answer without
// running anything. The doctor knows more (the token's object id, the certificate's thumbprint, the
// measured clock offset) and fills those in; what is not known stays a named placeholder such as
// <CLIENT_ID>, so the two texts differ only where the doctor could fill something in.
import type { AuthMethod, SendConfig, TransportKind } from "../config.js";
import type { MailerError } from "../errors.js";
import type { DoctorStep } from "./check.js";

/** What the fix texts may fill in. Everything optional: unknown values stay placeholders. */
export interface FixContext {
  method?: AuthMethod;
  transport?: TransportKind;
  clientId?: string;
  tenantId?: string;
  tokenUrl?: string;
  scope?: string;
  /** SMTP_USER: the mailbox the app signs in as. */
  mailbox?: string;
  mailFrom?: string;
  smtpHost?: string;
  smtpPort?: number;
  /** Claims of the access token we got (never the token itself). */
  token?: { objectId?: string; appId?: string; tenantId?: string; audience?: string };
  /** The certificate in use: its SHA-1 thumbprint in hex is what the portal lists. */
  certificate?: { subject: string; thumbprintSha1Hex: string; notAfter: Date; location: string };
  /** This machine's clock minus the token endpoint's (from its Date header), in seconds. */
  clockOffsetSeconds?: number;
  /** The Google service account's numeric client id (for domain-wide delegation) and email. */
  google?: { clientId?: string; clientEmail?: string };
  /** The Key Vault item being read and what for: decides the role a denial names. */
  keyVault?: { vaultUrl: string; name: string; setting: string; use: "certificate" | "secret" | "sign" };
  /** The Azure identity the process runs as (managed identity, az login, environment). */
  azureIdentity?: { appId?: string; objectId?: string; upn?: string };
}

export interface Advice {
  step: DoctorStep;
  fix: string;
}

/** The ids a fix can name, known from the settings alone (the circuit breaker's context). */
export function fixContextFor(config: SendConfig): FixContext {
  const auth = config.auth;
  return {
    method: auth.method,
    transport: config.transport,
    ...("clientId" in auth ? { clientId: auth.clientId, tenantId: auth.tenantId } : {}),
    ...(auth.tokenUrl ? { tokenUrl: auth.tokenUrl } : {}),
    scope: auth.scope,
    mailbox: config.smtp.user,
    mailFrom: config.mailFrom,
    smtpHost: config.smtp.host,
    smtpPort: config.smtp.port,
  };
}

const or = (value: string | undefined, placeholder: string): string => (value !== undefined && value !== "" ? value : `<${placeholder}>`);

export function vaultNameOf(vaultUrl: string | undefined): string | undefined {
  if (!vaultUrl) return undefined;
  try {
    return new URL(vaultUrl).hostname.split(".")[0];
  } catch {
    return undefined;
  }
}

/** `appid=…;oid=…` as Key Vault and Storage name the caller in their 403 answers. */
export function identityInResponse(text: string | undefined): { appId?: string; objectId?: string } {
  const appId = text?.match(/appid=([^;\s'"]+)/i)?.[1];
  const objectId = text?.match(/oid=([^;\s'"]+)/i)?.[1];
  return { ...(appId ? { appId } : {}), ...(objectId ? { objectId } : {}) };
}

function stepOf(code: string): DoctorStep {
  if (code.startsWith("CONFIG_")) return "settings";
  if (code.startsWith("STORAGE_")) return "storage";
  if (code.startsWith("KEYVAULT_")) return "keyvault";
  if (/^(CERT_|GOOGLE_KEY_|SECRET_)/.test(code)) return "credential";
  if (/^TOKEN_(ROLE_MISSING|AUDIENCE_WRONG|TENANT_MISMATCH|USER_MISMATCH|EXPIRED)$/.test(code)) return "token-contents";
  if (code.startsWith("TOKEN_")) return "token";
  if (/^(SMTP|GRAPH)_(SEND_AS_DENIED|RECIPIENT_REJECTED|INVALID_RECIPIENTS|REJECTED|MESSAGE_TOO_LARGE)$/.test(code) || code.startsWith("MESSAGE_")) return "send-test";
  if (code.startsWith("SMTP_") || code.startsWith("GRAPH_")) return "transport";
  if (code.startsWith("DNS_SPF")) return "dns-spf";
  if (code.startsWith("DNS_DKIM")) return "dns-dkim";
  if (code.startsWith("DNS_DMARC")) return "dns-dmarc";
  return "transport";
}

const isMicrosoft = (ctx: FixContext) => ctx.method !== "google-service-account";
const isDelegated = (ctx: FixContext) => ctx.method === "password" || ctx.method === "refresh-token";

/** Where the app registration's pages are, for people who follow the portal. */
function appRegistration(ctx: FixContext): string {
  return `Entra admin center > App registrations > the app with Application (client) ID ${or(ctx.clientId, "CLIENT_ID")}`;
}

/** The permission the transport needs and where it is granted. */
export function permissionFix(ctx: FixContext): string {
  const graph = ctx.transport === "graph";
  const api = graph ? "Microsoft Graph" : "APIs my organization uses > Office 365 Exchange Online";
  if (isDelegated(ctx)) {
    const permission = graph ? "Mail.Send" : "SMTP.Send";
    return `${appRegistration(ctx)} > API permissions > Add a permission > ${api} > Delegated permissions > ${permission}; then "Grant admin consent for <your tenant>" on the same page (or: az ad app permission admin-consent --id ${or(ctx.clientId, "CLIENT_ID")}).`;
  }
  const permission = graph ? "Mail.Send" : "SMTP.SendAsApp";
  return `${appRegistration(ctx)} > API permissions > Add a permission > ${api} > Application permissions > ${permission}; then "Grant admin consent for <your tenant>" on the same page (or: az ad app permission admin-consent --id ${or(ctx.clientId, "CLIENT_ID")}). A new token carries it within minutes.`;
}

function roleForVaultUse(use: "certificate" | "secret" | "sign" | undefined, hint: string | undefined): string[] {
  if (use === "certificate") return ["Key Vault Certificate User"];
  if (use === "secret") return ["Key Vault Secrets User"];
  if (use === "sign") return ["Key Vault Crypto User", "Key Vault Certificate User"];
  const named = [...(hint ?? "").matchAll(/'(Key Vault [A-Za-z]+ User)'/g)].map((m) => m[1] ?? "");
  return named.length > 0 ? named : ["Key Vault Certificate User"];
}

function keyVaultAccessFix(error: Pick<MailerError, "hint" | "response" | "message">, ctx: FixContext): string {
  const roles = roleForVaultUse(ctx.keyVault?.use, error.hint);
  const fromResponse = identityInResponse(error.response ?? error.message);
  const identity = { ...fromResponse, ...ctx.azureIdentity };
  const vault = or(vaultNameOf(ctx.keyVault?.vaultUrl) ?? vaultNameOf(error.message.match(/https:\/\/[^\s/]+/)?.[0]), "vault name");
  const who = identity.upn
    ? `The signed-in user ${identity.upn} (object id ${or(identity.objectId, "object id")})`
    : `The identity in use (app id ${or(identity.appId, "app id")}, object id ${or(identity.objectId, "object id")})`;
  const principalType = identity.upn ? "User" : "ServicePrincipal";
  const grants = roles
    .map((role) => `  az role assignment create --role "${role}" --assignee-object-id ${or(identity.objectId, "object id of the app's managed identity: az identity show -g <group> -n <name> --query principalId")} --assignee-principal-type ${principalType} --scope $(az keyvault show --name ${vault} --query id -o tsv)`)
    .join("\n");
  return `${who} lacks the ${roles.map((r) => `'${r}'`).join(" and ")} role on Key Vault ${vault}. Grant it (role assignments take a few minutes to apply):\n${grants}\n(A vault that uses access policies instead of Azure RBAC: az keyvault set-policy --name ${vault} --object-id ${or(identity.objectId, "object id")} --${ctx.keyVault?.use === "sign" ? "key-permissions sign get" : ctx.keyVault?.use === "secret" ? "secret-permissions get" : "certificate-permissions get --secret-permissions get"}.)`;
}

function clockFix(ctx: FixContext): string {
  const offset = ctx.clockOffsetSeconds;
  const measured = offset === undefined
    ? "The offset could not be measured (the token endpoint sent no Date header)."
    : Math.abs(offset) < 2
      ? `The measured offset to the token endpoint's Date header is ${offset} s, which is fine now: the clock may have been corrected since, or the assertion was made with another clock.`
      : `This machine's clock is ${Math.abs(offset)} s ${offset > 0 ? "ahead of" : "behind"} the token endpoint's (measured from its Date header).`;
  return `${measured} The assertion is valid for 10 minutes from this machine's "now", so the server refuses it when the clocks differ by minutes. Synchronise the clock with NTP (Linux: timedatectl set-ntp true; Windows: w32tm /resync; a container takes the host's clock).`;
}

function tokenFix(code: string, error: Pick<MailerError, "hint" | "response" | "message">, ctx: FixContext): string {
  const clientId = or(ctx.clientId, "CLIENT_ID");
  const tenantId = or(ctx.tenantId, "TENANT_ID");
  const aadsts = code.match(/^TOKEN_AADSTS(\d+)$/)?.[1];
  switch (aadsts) {
    case "700016":
      return `Entra found no app with CLIENT_ID ${clientId} in tenant TENANT_ID ${tenantId}. Copy both from the app registration's Overview page ("Application (client) ID" and "Directory (tenant) ID"). An app registered in another tenant must first be consented in this one: https://login.microsoftonline.com/${tenantId}/adminconsent?client_id=${clientId}`;
    case "90002":
      return `Tenant ${tenantId} does not exist here: set TENANT_ID to the "Directory (tenant) ID" (a GUID) or a verified domain of the tenant. A national cloud needs AUTHORITY_HOST (https://login.microsoftonline.us, https://login.chinacloudapi.cn).`;
    case "700027": {
      const certificate = ctx.certificate
        ? `The certificate in use (${ctx.certificate.location}): ${ctx.certificate.subject}, thumbprint ${ctx.certificate.thumbprintSha1Hex}, expires ${ctx.certificate.notAfter.toISOString().slice(0, 10)}.`
        : "The certificate in use is the one in CERT_PATH or Key Vault CERT_NAME.";
      return `Entra does not know this certificate for app ${clientId}. ${certificate} Upload its public part: ${appRegistration(ctx)} > Certificates & secrets > Certificates > Upload certificate (a .cer/.pem without the key; e.g. az keyvault certificate download --vault-name <vault> --name <CERT_NAME> --file app.cer, or openssl x509 -in <CERT_PATH> -out app.cer; or az ad app credential reset --id ${clientId} --cert @app.cer --append). If a certificate with thumbprint ${ctx.certificate?.thumbprintSha1Hex ?? "<thumbprint>"} is already listed there, the private key in use is not that certificate's.`;
    }
    case "7000215":
      return `The client secret of app ${clientId} is wrong. Put the secret's Value (shown once, when it is created; not its "Secret ID") in CLIENT_SECRET, or in the Key Vault secret named by CLIENT_SECRET_NAME (read again after this error). To make a new one: ${appRegistration(ctx)} > Certificates & secrets > New client secret, or az ad app credential reset --id ${clientId} --append --display-name queue-mailer.`;
    case "7000222":
      return `The client secret of app ${clientId} has expired. Create a new one (${appRegistration(ctx)} > Certificates & secrets > New client secret, or az ad app credential reset --id ${clientId} --append --display-name queue-mailer --years 1), then put its Value in CLIENT_SECRET or add it as a new version of the Key Vault secret named by CLIENT_SECRET_NAME (az keyvault secret set --vault-name <vault> --name <CLIENT_SECRET_NAME> --value <new value>). \`queue-mailer expiry\` warns before the next one expires.`;
    case "700024":
      return clockFix(ctx);
    case "65001":
      return `Consent is missing for app ${clientId}: ${permissionFix(ctx)}`;
    case "500011":
      return `The resource named in TOKEN_SCOPE (${or(ctx.scope, "TOKEN_SCOPE")}) does not exist in tenant ${tenantId}. For SMTP TOKEN_SCOPE must be https://outlook.office365.com/.default (the tenant needs Exchange Online), for TRANSPORT=graph https://graph.microsoft.com/.default; leave TOKEN_SCOPE unset to get the right default.`;
    case "1002012":
      return `TOKEN_SCOPE (${or(ctx.scope, "TOKEN_SCOPE")}) is not a valid scope for the client credentials grant: it must be the resource followed by /.default, e.g. https://outlook.office365.com/.default for SMTP or https://graph.microsoft.com/.default for Graph. Leave TOKEN_SCOPE unset to get the right default.`;
    case "70008":
    case "50173":
      return "The user's sign-in (refresh token) is no longer valid: it expired, or the password was changed or the session revoked. Re-authorise: run `queue-mailer authorize` (signing in as the mailbox user) to store a new refresh token.";
    default:
      break;
  }
  if (aadsts !== undefined) return error.hint ?? `Look up AADSTS${aadsts} (https://login.microsoftonline.com/error?code=${aadsts}) and fix the app registration or settings it names.`;
  if (code === "TOKEN_UNAUTHORIZED_CLIENT" && ctx.method === "google-service-account") {
    return `Domain-wide delegation is missing for this service account or scope. In the Google Admin console: Security > Access and data control > API controls > Manage Domain Wide Delegation > Add new: Client ID ${or(ctx.google?.clientId, "the key's client_id")}${ctx.google?.clientEmail ? ` (${ctx.google.clientEmail})` : ""}, OAuth scopes ${or(ctx.scope, "https://mail.google.com/")}. A new grant can take minutes (sometimes hours) to apply.`;
  }
  if (code === "TOKEN_INVALID_GRANT") {
    if (/short-lived token|reasonable timeframe/i.test(error.response ?? error.message)) return clockFix(ctx);
    if (error.hint && ctx.method === "google-service-account") return error.hint;
    return error.hint ?? "The token endpoint refused the grant: a stored sign-in (refresh token) expired or was revoked, or the user or password is wrong. Re-authorise: sign in again as the mailbox user.";
  }
  if (code === "TOKEN_UNREACHABLE") {
    const host = hostOf(ctx.tokenUrl) ?? "the token endpoint";
    return `No answer from ${or(ctx.tokenUrl, "TOKEN_URL")}: check TOKEN_URL / AUTHORITY_HOST, and that this machine may open HTTPS connections to ${host}:443 (firewall, NSG, DNS). Behind a proxy, the proxy must let ${host} through.`;
  }
  const httpStatus = code.match(/^TOKEN_HTTP_(\d{3})$/)?.[1];
  if (httpStatus !== undefined) {
    const host = hostOf(ctx.tokenUrl) ?? "the token endpoint";
    return httpStatus === "407"
      ? `A proxy between this machine and ${host} wants authentication (407): allow ${host}:443 through it for this machine.`
      : `The answer (HTTP ${httpStatus}) is not an OAuth error: something between this machine and ${host} answered instead of the token endpoint (a proxy, firewall or gateway page), or TOKEN_URL (${or(ctx.tokenUrl, "TOKEN_URL")}) is not a token endpoint. Check TOKEN_URL / AUTHORITY_HOST and let ${host}:443 through.`;
  }
  if (code === "TOKEN_BAD_RESPONSE") return `TOKEN_URL (${or(ctx.tokenUrl, "TOKEN_URL")}) answered without an access token: is it the OAuth token endpoint (…/oauth2/v2.0/token)?`;
  return error.hint ?? "Check TENANT_ID, CLIENT_ID, TOKEN_SCOPE and the credential registered on the app.";
}

function hostOf(url: string | undefined): string | undefined {
  try {
    return url ? new URL(url).host : undefined;
  } catch {
    return undefined;
  }
}

/** Exchange's commands with the app id, the enterprise application's object id and the mailbox. */
export function exchangeMailboxGrant(ctx: FixContext): string {
  const appId = or(ctx.token?.appId ?? ctx.clientId, "CLIENT_ID");
  const objectId = or(ctx.token?.objectId, "object id of the enterprise application");
  const mailbox = or(ctx.mailbox, "SMTP_USER");
  return [
    "In Exchange Online PowerShell (Connect-ExchangeOnline), register the app's service principal and give it the mailbox:",
    `  New-ServicePrincipal -AppId ${appId} -ObjectId ${objectId} -DisplayName "queue-mailer"`,
    `  Add-MailboxPermission -Identity "${mailbox}" -User ${objectId} -AccessRights FullAccess`,
    `The object id is the enterprise application's (service principal: Entra admin center > Enterprise applications > the app > Object ID, which is the oid of the app's tokens), not the app registration's. Also needed: SMTP.SendAsApp with admin consent (step token-contents) and SMTP AUTH enabled for the mailbox (Get-CASMailbox -Identity "${mailbox}" | fl SmtpClientAuthenticationDisabled). Changes can take up to an hour to apply.`,
  ].join("\n");
}

function tlsFix(error: Pick<MailerError, "message">, ctx: FixContext): string {
  const text = error.message;
  const server = `${or(ctx.smtpHost, "SMTP_HOST")}:${ctx.smtpPort ?? "<SMTP_PORT>"}`;
  if (/self[- ]signed|unable to (get|verify)|UNABLE_TO_VERIFY|issuer certificate/i.test(text)) {
    return `STARTTLS to ${server}: the server's certificate is not signed by a CA this machine trusts (${text.replace(/^SMTP[^:]*:\s*/, "")}). For Exchange Online SMTP_HOST must be smtp.office365.com (a TLS-inspecting proxy or a wrong host presents another certificate). A private CA must be trusted: NODE_EXTRA_CA_CERTS=<ca.pem> (read at process start).`;
  }
  if (/altname|does not match|hostname/i.test(text)) {
    return `STARTTLS to ${server}: the certificate is not issued for SMTP_HOST (${or(ctx.smtpHost, "SMTP_HOST")}). Use the name the certificate is for (Exchange Online: smtp.office365.com, not an IP address or an alias).`;
  }
  if (/expired|not yet valid/i.test(text)) {
    return `STARTTLS to ${server}: the server's certificate is expired or not yet valid (${text.replace(/^SMTP[^:]*:\s*/, "")}); if the certificate is fine, this machine's clock is wrong.`;
  }
  return `STARTTLS to ${server} failed (${text.replace(/^SMTP[^:]*:\s*/, "")}): check SMTP_HOST and SMTP_PORT (587 speaks STARTTLS; 465 is implicit TLS, which is not supported).`;
}

function transportFix(code: string, error: Pick<MailerError, "hint" | "response" | "message">, ctx: FixContext): string {
  const mailbox = or(ctx.mailbox, "SMTP_USER");
  const reply = `${error.response ?? ""} ${error.message}`;
  switch (code) {
    case "SMTP_AUTH_REJECTED":
      if (!isMicrosoft(ctx) || /Username and Password not accepted|gsmtp|support\.google\.com/i.test(reply)) return error.hint ?? "Gmail refused the token for SMTP_USER.";
      if (isDelegated(ctx)) {
        return `Exchange refused the user's token for ${mailbox}: the token must be issued to ${mailbox} itself with the delegated permission SMTP.Send consented (${permissionFix(ctx)}), and SMTP AUTH must be on for the mailbox: Set-CASMailbox -Identity "${mailbox}" -SmtpClientAuthenticationDisabled $false`;
      }
      return exchangeMailboxGrant(ctx);
    case "SMTP_AUTH_DISABLED":
      return [
        `SMTP AUTH is turned off for ${mailbox} or for the whole tenant. In Exchange Online PowerShell:`,
        `  Set-CASMailbox -Identity "${mailbox}" -SmtpClientAuthenticationDisabled $false`,
        "  (tenant-wide: Set-TransportConfig -SmtpClientAuthenticationDisabled $false; the mailbox setting wins over the tenant's)",
        "Security Defaults in Entra ID also block SMTP AUTH: turn them off in favour of Conditional Access, or use TRANSPORT=graph.",
      ].join("\n");
    case "SMTP_TLS_FAILED":
      return tlsFix(error, ctx);
    case "SMTP_CONNECTION_FAILED":
      return `No SMTP conversation with ${or(ctx.smtpHost, "SMTP_HOST")}:${ctx.smtpPort ?? "<SMTP_PORT>"}: check SMTP_HOST and SMTP_PORT (smtp.office365.com:587, smtp.gmail.com:587) and that outbound TCP to that port is allowed from here (Azure blocks port 25, not 587).`;
    case "SMTP_SEND_AS_DENIED":
    case "GRAPH_SEND_AS_DENIED": {
      const from = or(ctx.mailFrom, "MAIL_FROM");
      return [
        `The server refused From ${from}: ${mailbox} may not send as it. Either send from the mailbox itself (MAIL_FROM=${mailbox}, or leave MAIL_FROM unset), or grant SendAs in Exchange Online PowerShell:`,
        `  Add-RecipientPermission -Identity "${from}" -Trustee "${mailbox}" -AccessRights SendAs -Confirm:$false`,
        "(It can take up to an hour to apply.)",
      ].join("\n");
    }
    case "GRAPH_ACCESS_DENIED":
      return `Graph refused Mail.Send for ${mailbox}. ${permissionFix(ctx)} If an application access policy confines the app, ${mailbox} must be in its group: Test-ApplicationAccessPolicy -Identity "${mailbox}" -AppId ${or(ctx.clientId, "CLIENT_ID")}`;
    default:
      return error.hint ?? `The server answered: ${error.response ?? error.message}`;
  }
}

/**
 * The step and the fix for an error, with what `context` knows filled in. The error's own hint is
 * the fallback for codes without a richer text here, so every code gets some fix.
 */
export function adviceFor(error: Pick<MailerError, "code" | "hint" | "response" | "message">, context: FixContext = {}): Advice {
  const code = error.code;
  const step = stepOf(code);
  switch (step) {
    case "keyvault":
      if (code === "KEYVAULT_ACCESS_DENIED") return { step, fix: keyVaultAccessFix(error, context) };
      if (code === "KEYVAULT_NOT_FOUND") {
        const where = context.keyVault ? `${context.keyVault.setting} ("${context.keyVault.name}") in ${context.keyVault.vaultUrl}` : "the item's name setting";
        return { step, fix: `${error.hint ?? ""} Check ${where}: az keyvault ${context.keyVault?.use === "secret" ? "secret" : "certificate"} list --vault-name ${or(vaultNameOf(context.keyVault?.vaultUrl), "vault name")} -o table`.trim() };
      }
      if (code === "KEYVAULT_UNAVAILABLE") {
        const host = hostOf(context.keyVault?.vaultUrl) ?? "the vault";
        return { step, fix: `Key Vault did not answer usefully: check KEY_VAULT_URL, and that this machine may reach ${host}:443 (the vault's Networking page: public access or this network / private endpoint). Throttling (429) passes by itself.` };
      }
      return { step, fix: error.hint ?? "Check KEY_VAULT_URL and the item's name." };
    case "token":
      return { step, fix: tokenFix(code, error, context) };
    case "transport":
    case "send-test":
      return { step, fix: transportFix(code, error, context) };
    default:
      return { step, fix: error.hint ?? "See the message above." };
  }
}
