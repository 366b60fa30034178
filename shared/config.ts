// The only place that reads settings. Every setting is declared once below with its type, default,
// description and the auth methods it applies to; the README table, local.settings.sample.json and
// infra/ are checked against this list by test/config.test.ts.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { ConfigError } from "./errors.js";
import { registerSecret } from "./redact.js";

export type Env = Readonly<Record<string, string | undefined>>;
export type AuthMethod = "certificate";
export type AssertionAlg = "PS256" | "RS256";

export interface SettingSpec {
  name: string;
  type: "string" | "integer" | "url" | "enum";
  /** Default as the user would write it; a function when it derives from other settings. */
  default?: string;
  description: string;
  /** Which commands need it: "send" (worker, function), "storage" (anything touching the queue). */
  requiredFor?: Array<"send" | "storage">;
  authMethods?: AuthMethod[];
  values?: string[];
  min?: number;
  secret?: boolean;
}

export const settingSpecs: readonly SettingSpec[] = [
  { name: "AzureWebJobsStorage", type: "string", description: "Storage connection string for the mail queue (Azurite locally: `UseDevelopmentStorage=true`). Or use `AzureWebJobsStorage__queueServiceUri` with a managed identity.", secret: true },
  { name: "AzureWebJobsStorage__queueServiceUri", type: "url", description: "Queue service URI for identity-based storage access (managed identity / `az login`), instead of a connection string." },
  { name: "MAIL_QUEUE", type: "string", default: "outbound-email", description: "Queue the application drops messages on; failed messages go to `<MAIL_QUEUE>-poison`." },
  { name: "MAIL_FROM", type: "string", description: "Default From address when a message has none (normally the mailbox in `SMTP_USER`)." },
  { name: "AUTH_METHOD", type: "enum", default: "certificate", values: ["certificate"], description: "How the app proves its identity to the token endpoint." },
  { name: "TENANT_ID", type: "string", requiredFor: ["send"], authMethods: ["certificate"], description: "Directory (tenant) ID of the app registration; used to build `TOKEN_URL`." },
  { name: "CLIENT_ID", type: "string", requiredFor: ["send"], authMethods: ["certificate"], description: "Application (client) ID of the app registration: `iss` and `sub` of the client assertion." },
  { name: "TOKEN_URL", type: "url", default: "https://login.microsoftonline.com/${TENANT_ID}/oauth2/v2.0/token", authMethods: ["certificate"], description: "OAuth2 token endpoint (v2). Plain http is refused except on loopback." },
  { name: "TOKEN_SCOPE", type: "string", default: "https://outlook.office365.com/.default", authMethods: ["certificate"], description: "Scope requested for the SMTP token." },
  { name: "KEY_VAULT_URL", type: "url", authMethods: ["certificate"], description: "Key Vault holding the certificate (e.g. `https://my-vault.vault.azure.net`). Either this with `CERT_NAME`, or `CERT_PATH`." },
  { name: "CERT_NAME", type: "string", authMethods: ["certificate"], description: "Name of the certificate in Key Vault." },
  { name: "CERT_PATH", type: "string", authMethods: ["certificate"], description: "Local certificate instead of Key Vault: a PEM file with certificate and private key (either order), or a `.pfx`/`.p12` file." },
  { name: "CERT_PASSWORD", type: "string", authMethods: ["certificate"], secret: true, description: "Password of a `.pfx` file or of an encrypted PEM private key in `CERT_PATH`." },
  { name: "ASSERTION_ALG", type: "enum", default: "PS256", values: ["PS256", "RS256"], authMethods: ["certificate"], description: "Client assertion signature: `PS256` with `x5t#S256` (current), or `RS256` with SHA-1 `x5t` added (legacy servers, ADFS)." },
  { name: "SMTP_HOST", type: "string", default: "smtp.office365.com", description: "SMTP submission server." },
  { name: "SMTP_PORT", type: "integer", default: "587", min: 1, description: "SMTP port; STARTTLS is required." },
  { name: "SMTP_USER", type: "string", requiredFor: ["send"], description: "Mailbox the app signs in as (XOAUTH2 `user=`); messages are sent from it." },
  { name: "SMTP_MAX_CONNECTIONS", type: "integer", default: "3", min: 1, description: "Pooled SMTP connections per process (Exchange allows 3 per mailbox)." },
  { name: "SEND_RATE_PER_MINUTE", type: "integer", default: "30", min: 0, description: "Messages per minute per mailbox from this process (Exchange: 30); 0 turns the limit off." },
  { name: "SEND_RATE_WINDOW_SECONDS", type: "integer", default: "60", min: 1, description: "The window `SEND_RATE_PER_MINUTE` is counted over (Exchange: a minute). Change only for servers that count differently, or to scale a test down." },
  { name: "MAX_DEQUEUE_COUNT", type: "integer", default: "5", min: 1, description: "Attempts before a message is poisoned; keep equal to `maxDequeueCount` in host.json." },
  { name: "LEASE_SECONDS", type: "integer", default: "60", min: 5, description: "Worker: how long a taken message stays hidden while it is being sent." },
  { name: "RETRY_BASE_SECONDS", type: "integer", default: "10", min: 0, description: "First retry delay after a transient failure; doubles per attempt." },
  { name: "RETRY_MAX_SECONDS", type: "integer", default: "900", min: 0, description: "Upper bound of our own retry backoff; a server's Retry-After can ask for longer (up to the queue's 7 days)." },
  { name: "AzureWebJobsStorage__tableServiceUri", type: "url", description: "Table service URI for identity-based access to the expiry watch's alert state, with `AzureWebJobsStorage__queueServiceUri`." },
  { name: "AzureWebJobsStorage__blobServiceUri", type: "url", description: "Blob service URI for identity-based access to claim-check messages and attachments in `ATTACHMENT_CONTAINER`." },
  { name: "ATTACHMENT_CONTAINER", type: "string", default: "mail-attachments", description: "Blob container for large messages and attachments sent by reference (claim check). Only blob names in this container are accepted, never URLs." },
  { name: "MAX_MESSAGE_BYTES", type: "integer", default: "26214400", min: 1024, description: "Largest message accepted (bodies plus decoded attachments); larger ones are poisoned with MESSAGE_TOO_LARGE. Exchange Online accepts about 25 MB." },
  { name: "ALLOWED_RECIPIENT_DOMAINS", type: "string", description: "Sandbox for staging: comma list of domains; recipients elsewhere make the message poisoned with MESSAGE_RECIPIENT_NOT_ALLOWED. Empty: no restriction." },
  { name: "SEND_LEDGER", type: "enum", default: "true", values: ["true", "false"], description: "Record every send in the `sendledger` table keyed by message id, so a redelivered message that was sent is acknowledged, not sent again." },
  { name: "EXPIRY_CHECK_SCHEDULE", type: "string", default: "0 0 7 * * *", description: "When the expiry watch runs: six-field NCRONTAB, UTC (daily at 07:00 by default)." },
  { name: "EXPIRY_WARN_DAYS", type: "string", default: "30,14,7,3,1", description: "Days before expiry at which to warn; each item warns once per threshold it crosses." },
  { name: "EXPIRY_CRITICAL_DAYS", type: "integer", default: "7", min: 0, description: "Within this many days (and once expired) an item alerts daily, and `queue-mailer expiry` exits non-zero." },
  { name: "EXPIRY_WATCH_NAMES", type: "string", description: "Key Vault items to watch: comma list of names or prefixes ending in `*` (e.g. `smtp-*,api-key`). Empty: every certificate and secret. The sender's own certificate is always watched." },
  { name: "EXPIRY_CHECK_APP_REGISTRATION", type: "enum", default: "false", values: ["true", "false"], description: "Also read the app registration's certificates and client secrets (end dates) through Microsoft Graph; needs the Application.Read.All application permission." },
  { name: "EXPIRY_ALERT_TO", type: "string", description: "Alert email recipients (comma list), enqueued on MAIL_QUEUE like any message. Empty: no email alerts." },
  { name: "EXPIRY_WEBHOOK_URL", type: "url", description: "Incoming webhook (Teams or Slack) that receives alerts as JSON `{ \"text\": … }`. Empty: no webhook.", secret: true },
  { name: "WORKER_BATCH_SIZE", type: "integer", default: "16", min: 1, description: "Worker: messages taken per poll (at most 32), like `batchSize` in host.json." },
];

export interface StorageConfig {
  connectionString?: string;
  queueServiceUri?: string;
  tableServiceUri?: string;
  blobServiceUri?: string;
  queueName: string;
  poisonQueueName: string;
  /** Claim-check messages and attachments by reference. */
  attachmentContainer: string;
}

export type CertificateLocation =
  | { kind: "keyVault"; vaultUrl: string; name: string }
  | { kind: "file"; path: string; password?: string };

export interface AuthConfig {
  method: AuthMethod;
  tenantId: string;
  clientId: string;
  tokenUrl: string;
  scope: string;
  assertionAlg: AssertionAlg;
  certificate: CertificateLocation;
}

export interface SmtpConfig {
  host: string;
  port: number;
  user: string;
  maxConnections: number;
  ratePerMinute: number;
  rateWindowSeconds: number;
}

export interface QueuePolicy {
  maxDequeueCount: number;
  leaseSeconds: number;
  retryBaseSeconds: number;
  retryMaxSeconds: number;
  batchSize: number;
}

export interface MessagePolicy {
  maxMessageBytes: number;
  /** Lower-case domains; empty means every domain. */
  allowedRecipientDomains: string[];
  sendLedger: boolean;
}

export interface SendConfig {
  storage: StorageConfig;
  mailFrom: string;
  messages: MessagePolicy;
  auth: AuthConfig;
  smtp: SmtpConfig;
  queue: QueuePolicy;
}

/**
 * Settings as the process sees them: the environment, plus `Values` of local.settings.json (the
 * Functions host's local file) when present. The environment wins, as under `func start`.
 */
export function readSettings(cwd = process.cwd(), env: Env = process.env): Env {
  const file = join(cwd, "local.settings.json");
  let values: Record<string, string> = {};
  if (existsSync(file)) {
    try {
      const parsed = JSON.parse(readFileSync(file, "utf8")) as { Values?: Record<string, unknown> };
      values = Object.fromEntries(Object.entries(parsed.Values ?? {}).map(([k, v]) => [k, String(v)]));
    } catch (error) {
      throw new ConfigError([{ setting: "local.settings.json", problem: `cannot be read as JSON (${(error as Error).message}); fix or delete the file` }]);
    }
  }
  const merged: Record<string, string | undefined> = { ...values };
  for (const [key, value] of Object.entries(env)) if (value !== undefined) merged[key] = value;
  return merged;
}

/** Reads typed values and collects every problem, so one run names all of them. */
class SettingReader {
  readonly problems: Array<{ setting: string; problem: string }> = [];
  constructor(private readonly env: Env) {}

  private spec(name: string): SettingSpec {
    const spec = settingSpecs.find((s) => s.name === name);
    if (!spec) throw new Error(`undeclared setting ${name}`);
    return spec;
  }

  raw(name: string): string | undefined {
    const value = this.env[name]?.trim();
    const spec = this.spec(name);
    if (spec.secret) registerSecret(value);
    return value === "" || value === undefined ? spec.default : value;
  }

  required(name: string, fix: string): string {
    const value = this.raw(name);
    if (value === undefined) this.problems.push({ setting: name, problem: `is not set. ${fix}` });
    return value ?? "";
  }

  integer(name: string): number {
    const spec = this.spec(name);
    const value = this.raw(name) ?? "0";
    const parsed = Number(value);
    if (!/^-?\d+$/.test(value) || (spec.min !== undefined && parsed < spec.min)) {
      this.problems.push({ setting: name, problem: `must be a whole number${spec.min === undefined ? "" : ` ≥ ${spec.min}`}, got "${value}"` });
    }
    return parsed;
  }

  oneOf<T extends string>(name: string): T {
    const spec = this.spec(name);
    const value = this.raw(name) ?? "";
    if (!spec.values?.includes(value)) {
      this.problems.push({ setting: name, problem: `must be one of ${spec.values?.join(", ")}, got "${value}"` });
    }
    return value as T;
  }

  url(name: string, value: string | undefined, { allowLoopbackHttp }: { allowLoopbackHttp: boolean }): string {
    if (value === undefined) return "";
    let parsed: URL;
    try {
      parsed = new URL(value);
    } catch {
      this.problems.push({ setting: name, problem: `is not a URL: "${value}"` });
      return value;
    }
    const loopback = ["127.0.0.1", "localhost", "[::1]"].includes(parsed.hostname);
    if (parsed.protocol !== "https:" && !(allowLoopbackHttp && parsed.protocol === "http:" && loopback)) {
      this.problems.push({ setting: name, problem: `must use https (plain http is allowed only for loopback hosts), got "${value}"` });
    }
    return value;
  }

  throwIfProblems(): void {
    if (this.problems.length > 0) throw new ConfigError(this.problems);
  }
}

function storageConfig(reader: SettingReader): StorageConfig {
  const connectionString = reader.raw("AzureWebJobsStorage");
  const queueServiceUri = reader.raw("AzureWebJobsStorage__queueServiceUri");
  const tableServiceUri = reader.raw("AzureWebJobsStorage__tableServiceUri");
  const blobServiceUri = reader.raw("AzureWebJobsStorage__blobServiceUri");
  if (!connectionString && !queueServiceUri) {
    reader.problems.push({
      setting: "AzureWebJobsStorage",
      problem: "is not set. Set it to the storage account's connection string (`UseDevelopmentStorage=true` for Azurite), or set AzureWebJobsStorage__queueServiceUri to use a managed identity.",
    });
  }
  if (queueServiceUri) reader.url("AzureWebJobsStorage__queueServiceUri", queueServiceUri, { allowLoopbackHttp: true });
  const queueName = reader.raw("MAIL_QUEUE") ?? "outbound-email";
  if (!/^[a-z0-9](?!.*--)[a-z0-9-]{1,54}[a-z0-9]$/.test(queueName)) {
    reader.problems.push({ setting: "MAIL_QUEUE", problem: `"${queueName}" is not a valid queue name (3-63 lower-case letters, digits and single hyphens; the poison queue adds "-poison")` });
  }
  return {
    ...(connectionString ? { connectionString } : {}),
    ...(queueServiceUri ? { queueServiceUri } : {}),
    ...(tableServiceUri ? { tableServiceUri } : {}),
    ...(blobServiceUri ? { blobServiceUri } : {}),
    queueName,
    poisonQueueName: `${queueName}-poison`,
    attachmentContainer: reader.raw("ATTACHMENT_CONTAINER") ?? "mail-attachments",
  };
}

/** What `enqueue` and other queue-only commands need. */
export function loadStorageConfig(env: Env): StorageConfig {
  const reader = new SettingReader(env);
  const storage = storageConfig(reader);
  reader.throwIfProblems();
  return storage;
}

/** What the sender needs (the function and `queue-mailer worker`). Throws one ConfigError naming every problem. */
export function loadSendConfig(env: Env): SendConfig {
  const reader = new SettingReader(env);
  const storage = storageConfig(reader);
  const method = reader.oneOf<AuthMethod>("AUTH_METHOD");
  const clientId = reader.required("CLIENT_ID", "Set it to the Application (client) ID from the app registration's Overview page.");
  const explicitTokenUrl = env["TOKEN_URL"]?.trim();
  const tenantId = explicitTokenUrl
    ? (reader.raw("TENANT_ID") ?? "")
    : reader.required("TENANT_ID", "Set it to the Directory (tenant) ID from the app registration's Overview page (or set TOKEN_URL).");
  const tokenUrl = reader.url(
    "TOKEN_URL",
    explicitTokenUrl || `https://login.microsoftonline.com/${encodeURIComponent(tenantId)}/oauth2/v2.0/token`,
    { allowLoopbackHttp: true },
  );

  const vaultUrl = reader.raw("KEY_VAULT_URL");
  const certName = reader.raw("CERT_NAME");
  const certPath = reader.raw("CERT_PATH");
  const certPassword = reader.raw("CERT_PASSWORD");
  let certificate: CertificateLocation = { kind: "file", path: "" };
  if (certPath) {
    certificate = { kind: "file", path: certPath, ...(certPassword ? { password: certPassword } : {}) };
  } else if (vaultUrl || certName) {
    if (!vaultUrl) reader.problems.push({ setting: "KEY_VAULT_URL", problem: "is not set but CERT_NAME is. Set it to the vault's URI, e.g. https://my-vault.vault.azure.net" });
    if (!certName) reader.problems.push({ setting: "CERT_NAME", problem: "is not set but KEY_VAULT_URL is. Set it to the certificate's name in that vault." });
    reader.url("KEY_VAULT_URL", vaultUrl, { allowLoopbackHttp: false });
    certificate = { kind: "keyVault", vaultUrl: vaultUrl ?? "", name: certName ?? "" };
  } else {
    reader.problems.push({ setting: "KEY_VAULT_URL", problem: "is not set, and neither is CERT_PATH. Set KEY_VAULT_URL and CERT_NAME (certificate in Key Vault), or CERT_PATH (local PEM or PFX file)." });
  }

  const smtpUser = reader.required("SMTP_USER", "Set it to the mailbox address the app sends as (it needs SMTP AUTH enabled and a FullAccess grant for the app's service principal).");
  const auth: AuthConfig = {
    method,
    tenantId,
    clientId,
    tokenUrl,
    scope: reader.raw("TOKEN_SCOPE") ?? "",
    assertionAlg: reader.oneOf<AssertionAlg>("ASSERTION_ALG"),
    certificate,
  };
  const smtp: SmtpConfig = {
    host: reader.raw("SMTP_HOST") ?? "",
    port: reader.integer("SMTP_PORT"),
    user: smtpUser,
    maxConnections: reader.integer("SMTP_MAX_CONNECTIONS"),
    ratePerMinute: reader.integer("SEND_RATE_PER_MINUTE"),
    rateWindowSeconds: reader.integer("SEND_RATE_WINDOW_SECONDS"),
  };
  const queue: QueuePolicy = {
    maxDequeueCount: reader.integer("MAX_DEQUEUE_COUNT"),
    leaseSeconds: reader.integer("LEASE_SECONDS"),
    retryBaseSeconds: reader.integer("RETRY_BASE_SECONDS"),
    retryMaxSeconds: reader.integer("RETRY_MAX_SECONDS"),
    batchSize: Math.min(32, reader.integer("WORKER_BATCH_SIZE")),
  };
  const messages: MessagePolicy = {
    maxMessageBytes: reader.integer("MAX_MESSAGE_BYTES"),
    allowedRecipientDomains: (reader.raw("ALLOWED_RECIPIENT_DOMAINS") ?? "").split(",").map((d) => d.trim().toLowerCase()).filter(Boolean),
    sendLedger: reader.oneOf<"true" | "false">("SEND_LEDGER") === "true",
  };
  reader.throwIfProblems();
  return { storage, mailFrom: reader.raw("MAIL_FROM") ?? smtpUser, messages, auth, smtp, queue };
}

export interface ExpiryConfig {
  keyVault?: { vaultUrl: string; certName?: string };
  certificateFile?: { path: string; password?: string };
  /** Read the app registration's credentials through Microsoft Graph. */
  appRegistration?: { clientId: string };
  /** Names or `prefix*` patterns; empty means everything in the vault. */
  watchNames: string[];
  /** Descending. */
  warnDays: number[];
  criticalDays: number;
  schedule: string;
  alertTo: string[];
  webhookUrl?: string;
}

/**
 * What the expiry watch reads: only the credential settings. `queue-mailer expiry` needs nothing
 * more; the timer function adds storage (alert state, email channel) through loadStorageConfig.
 */
export function loadExpiryConfig(env: Env): ExpiryConfig {
  const reader = new SettingReader(env);
  const vaultUrl = reader.raw("KEY_VAULT_URL");
  const certName = reader.raw("CERT_NAME");
  const certPath = reader.raw("CERT_PATH");
  const certPassword = reader.raw("CERT_PASSWORD");
  const checkApp = reader.oneOf<"true" | "false">("EXPIRY_CHECK_APP_REGISTRATION") === "true";
  const clientId = checkApp ? reader.required("CLIENT_ID", "EXPIRY_CHECK_APP_REGISTRATION=true reads the app registration with this Application (client) ID.") : "";
  if (vaultUrl) reader.url("KEY_VAULT_URL", vaultUrl, { allowLoopbackHttp: false });
  if (!vaultUrl && !certPath && !checkApp) {
    reader.problems.push({ setting: "KEY_VAULT_URL", problem: "is not set, and neither is CERT_PATH nor EXPIRY_CHECK_APP_REGISTRATION=true: there is nothing to watch. Set KEY_VAULT_URL (and CERT_NAME), or CERT_PATH." });
  }
  const warnText = reader.raw("EXPIRY_WARN_DAYS") ?? "";
  const warnDays = warnText.split(",").map((d) => d.trim()).filter(Boolean).map(Number);
  if (warnDays.length === 0 || warnDays.some((d) => !Number.isInteger(d) || d < 0)) {
    reader.problems.push({ setting: "EXPIRY_WARN_DAYS", problem: `must be a comma list of whole numbers of days, e.g. 30,14,7,3,1; got "${warnText}"` });
  }
  const alertTo = (reader.raw("EXPIRY_ALERT_TO") ?? "").split(",").map((a) => a.trim()).filter(Boolean);
  const webhookUrl = reader.raw("EXPIRY_WEBHOOK_URL");
  if (webhookUrl) reader.url("EXPIRY_WEBHOOK_URL", webhookUrl, { allowLoopbackHttp: true });
  const schedule = reader.raw("EXPIRY_CHECK_SCHEDULE") ?? "";
  if (schedule.trim().split(/\s+/).length !== 6) {
    reader.problems.push({ setting: "EXPIRY_CHECK_SCHEDULE", problem: `must be a six-field NCRONTAB expression (second minute hour day month weekday), e.g. "0 0 7 * * *"; got "${schedule}"` });
  }
  const config: ExpiryConfig = {
    ...(vaultUrl ? { keyVault: { vaultUrl, ...(certName ? { certName } : {}) } } : {}),
    ...(certPath ? { certificateFile: { path: certPath, ...(certPassword ? { password: certPassword } : {}) } } : {}),
    ...(checkApp ? { appRegistration: { clientId } } : {}),
    watchNames: (reader.raw("EXPIRY_WATCH_NAMES") ?? "").split(",").map((n) => n.trim()).filter(Boolean),
    warnDays: [...new Set(warnDays)].sort((a, b) => b - a),
    criticalDays: reader.integer("EXPIRY_CRITICAL_DAYS"),
    schedule,
    alertTo,
    ...(webhookUrl ? { webhookUrl } : {}),
  };
  reader.throwIfProblems();
  return config;
}

/** The timer's schedule, read at registration time (the Functions host needs it before any run). */
export function expirySchedule(env: Env): string {
  const value = env["EXPIRY_CHECK_SCHEDULE"]?.trim();
  return value ? value : (settingSpecs.find((s) => s.name === "EXPIRY_CHECK_SCHEDULE")?.default ?? "0 0 7 * * *");
}
