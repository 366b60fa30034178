// The only place that reads settings. Every setting is declared once below with its type, default,
// description and the auth methods it applies to; the README table, local.settings.sample.json and
// infra/ are checked against this list by test/config.test.ts.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { ConfigError } from "./errors.js";
import { registerSecret } from "./redact.js";

export type Env = Readonly<Record<string, string | undefined>>;
export const AUTH_METHODS = ["certificate", "secret", "google-service-account", "password", "refresh-token"] as const;
export type AuthMethod = (typeof AUTH_METHODS)[number];
export type AssertionAlg = "PS256" | "RS256";
/** How a client secret travels: in the form body, or as HTTP Basic (RFC 6749 2.3.1). */
export type ClientAuth = "post" | "basic";
/** Microsoft's identity platform answers these methods; Google's token endpoint the other. */
const MICROSOFT_METHODS: AuthMethod[] = ["certificate", "secret", "password", "refresh-token"];

export interface SettingSpec {
  name: string;
  type: "string" | "integer" | "url" | "enum";
  /** Default as the user would write it; `${NAME}` refers to another setting. */
  default?: string;
  /** A different default for some auth methods. */
  defaultFor?: Partial<Record<AuthMethod, string>>;
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
  { name: "AUTH_METHOD", type: "enum", default: "certificate", values: [...AUTH_METHODS], description: "How the app proves its identity to the token endpoint: a certificate (client assertion), a client `secret`, a Google `google-service-account` key (JWT bearer grant), the legacy `password` grant, or `refresh-token`: a user signs in once with `queue-mailer authorize` and the sender lives on the rotating refresh token (delegated access, docs/auth-refresh-token.md)." },
  { name: "TENANT_ID", type: "string", requiredFor: ["send"], authMethods: MICROSOFT_METHODS, description: "Directory (tenant) ID of the app registration; used to build `TOKEN_URL` (and, for `refresh-token`, `AUTHORIZE_URL` and `DEVICE_CODE_URL`)." },
  { name: "CLIENT_ID", type: "string", requiredFor: ["send"], authMethods: MICROSOFT_METHODS, description: "Application (client) ID of the app registration: `iss` and `sub` of the client assertion, or the `client_id` sent with a secret, password or refresh token." },
  { name: "AUTHORITY_HOST", type: "url", default: "https://login.microsoftonline.com", authMethods: MICROSOFT_METHODS, description: "Microsoft identity platform host; national clouds use their own (`https://login.microsoftonline.us`, `https://login.chinacloudapi.cn`)." },
  { name: "TOKEN_URL", type: "url", default: "${AUTHORITY_HOST}/${TENANT_ID}/oauth2/v2.0/token", description: "OAuth2 token endpoint: the override for any other OAuth server (with `google-service-account` the default is the key's `token_uri`, else https://oauth2.googleapis.com/token). Plain http is refused except on loopback." },
  { name: "TOKEN_SCOPE", type: "string", default: "https://outlook.office365.com/.default", defaultFor: { "google-service-account": "https://mail.google.com/", password: "https://outlook.office365.com/SMTP.Send", "refresh-token": "https://outlook.office365.com/SMTP.Send offline_access" }, description: "Scope requested for the token. With `TRANSPORT=graph` the default is `${GRAPH_URL}/.default` (`${GRAPH_URL}/Mail.Send` for the delegated password grant, `${GRAPH_URL}/Mail.Send offline_access` for `refresh-token`). Google with `refresh-token`: `https://mail.google.com/`." },
  { name: "KEY_VAULT_URL", type: "url", description: "Key Vault holding the credential (e.g. `https://my-vault.vault.azure.net`): the certificate (`CERT_NAME`), or the secrets named by `CLIENT_SECRET_NAME`, `GOOGLE_KEY_NAME`, `MAILBOX_PASSWORD_NAME`, `REFRESH_TOKEN_NAME`." },
  { name: "CERT_NAME", type: "string", authMethods: ["certificate"], description: "Name of the certificate in Key Vault." },
  { name: "CERT_PATH", type: "string", authMethods: ["certificate"], description: "Local certificate instead of Key Vault: a PEM file with certificate and private key (either order), or a `.pfx`/`.p12` file." },
  { name: "CERT_PASSWORD", type: "string", authMethods: ["certificate"], secret: true, description: "Password of a `.pfx` file or of an encrypted PEM private key in `CERT_PATH`." },
  { name: "CERT_SIGNING", type: "enum", default: "local", values: ["local", "vault"], authMethods: ["certificate"], description: "`local`: the private key is read from Key Vault (or `CERT_PATH`) and the assertion signed here. `vault`: the assertion is signed inside Key Vault (Key Vault Crypto User), so the key may be non-exportable; needs `KEY_VAULT_URL` and `CERT_NAME`." },
  { name: "ASSERTION_ALG", type: "enum", default: "PS256", values: ["PS256", "RS256"], authMethods: ["certificate"], description: "Client assertion signature: `PS256` with `x5t#S256` (current), or `RS256` with SHA-1 `x5t` added (legacy servers, ADFS)." },
  { name: "CLIENT_SECRET", type: "string", authMethods: ["secret", "password", "refresh-token"], secret: true, description: "Client secret of the app registration (may be a Functions Key Vault reference `@Microsoft.KeyVault(...)`). Or `CLIENT_SECRET_NAME`." },
  { name: "CLIENT_SECRET_NAME", type: "string", authMethods: ["secret", "password", "refresh-token"], description: "Name of a Key Vault secret in `KEY_VAULT_URL` holding the client secret, read by the app (a new version is picked up after the token endpoint rejects the old one)." },
  { name: "CLIENT_AUTH", type: "enum", default: "post", values: ["post", "basic"], authMethods: ["secret", "password", "refresh-token"], description: "How the client secret is sent: `post` (client_secret_post, in the form) or `basic` (client_secret_basic, HTTP Basic)." },
  { name: "GOOGLE_KEY_PATH", type: "string", authMethods: ["google-service-account"], description: "The Google service account's JSON key file. Or `GOOGLE_KEY_NAME`." },
  { name: "GOOGLE_KEY_NAME", type: "string", authMethods: ["google-service-account"], description: "Name of a Key Vault secret in `KEY_VAULT_URL` holding the service account's JSON key." },
  { name: "MAILBOX_PASSWORD", type: "string", authMethods: ["password"], secret: true, description: "Password of `SMTP_USER` for the legacy password grant. Or `MAILBOX_PASSWORD_NAME`." },
  { name: "MAILBOX_PASSWORD_NAME", type: "string", authMethods: ["password"], description: "Name of a Key Vault secret in `KEY_VAULT_URL` holding the mailbox password." },
  { name: "AUTHORIZE_URL", type: "url", default: "${AUTHORITY_HOST}/${TENANT_ID}/oauth2/v2.0/authorize", authMethods: ["refresh-token"], description: "`queue-mailer authorize`: the authorization endpoint the user signs in at (Google: https://accounts.google.com/o/oauth2/v2/auth). Plain http is refused except on loopback." },
  { name: "DEVICE_CODE_URL", type: "url", default: "${AUTHORITY_HOST}/${TENANT_ID}/oauth2/v2.0/devicecode", authMethods: ["refresh-token"], description: "`queue-mailer authorize --device-code`: the device authorization endpoint (Google: https://oauth2.googleapis.com/device/code)." },
  { name: "REFRESH_TOKEN_NAME", type: "string", authMethods: ["refresh-token"], description: "Name of the Key Vault secret in `KEY_VAULT_URL` holding the refresh token: `queue-mailer authorize` writes it and every rotation adds a new version (the identity needs Key Vault Secrets Officer). Or `REFRESH_TOKEN_PATH`." },
  { name: "REFRESH_TOKEN_PATH", type: "string", authMethods: ["refresh-token"], description: "Local file holding the refresh token, for development: written atomically with mode 0600 at each rotation. Or `REFRESH_TOKEN_NAME`." },
  { name: "AUTHORIZE_REDIRECT_PORT", type: "integer", min: 1, authMethods: ["refresh-token"], description: "`queue-mailer authorize`: loopback port of the redirect `http://localhost:<port>/`. Empty: a free port (Microsoft accepts any port for a registered `http://localhost`)." },
  { name: "SMTP_HOST", type: "string", default: "smtp.office365.com", defaultFor: { "google-service-account": "smtp.gmail.com" }, description: "SMTP submission server." },
  { name: "SMTP_PORT", type: "integer", default: "587", min: 1, description: "SMTP port; STARTTLS is required." },
  { name: "SMTP_USER", type: "string", requiredFor: ["send"], description: "Mailbox the app signs in as (XOAUTH2 `user=`, or the Graph user it sends as); messages are sent from it. `MAILBOX` is an alias." },
  { name: "MAILBOX", type: "string", description: "Alias of `SMTP_USER` (clearer with `TRANSPORT=graph`); if both are set they must be equal." },
  { name: "TRANSPORT", type: "enum", default: "smtp", values: ["smtp", "graph"], description: "How messages leave: SMTP submission with XOAUTH2, or Microsoft Graph `sendMail` (application permission Mail.Send; no 30-per-minute cap)." },
  { name: "GRAPH_URL", type: "url", default: "https://graph.microsoft.com", description: "Microsoft Graph endpoint for `TRANSPORT=graph` (national clouds have their own). Plain http is refused except on loopback." },
  { name: "GRAPH_MAX_CONCURRENCY", type: "integer", default: "4", min: 1, description: "Graph requests in flight per mailbox, held across instances (Graph allows 4)." },
  { name: "DAILY_RECIPIENT_LIMIT", type: "integer", default: "10000", min: 0, description: "Recipients per mailbox per 24 hours, counted across instances (Exchange Online: 10,000); past it messages wait, nothing is poisoned. 0 turns the count off." },
  { name: "SMTP_MAX_CONNECTIONS", type: "integer", default: "3", min: 1, description: "Pooled SMTP connections per process (Exchange allows 3 per mailbox)." },
  { name: "SEND_RATE_PER_MINUTE", type: "integer", default: "30", min: 0, description: "Messages per minute per mailbox, held across instances (Exchange SMTP: 30); 0 turns the limit off. With `TRANSPORT=graph` the default is 0 (Graph has no per-minute cap)." },
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
  { name: "EVENTS_QUEUE", type: "string", description: "Queue that receives every delivery event (sent, duplicate, retry, poisoned, scheduled, deferred) as JSON for producers to consume, and each bounce the bounce watch records (bounced). Events are always kept in the `deliveryevents` table (`queue-mailer status ID`). Empty: table only." },
  { name: "TEMPLATE_DIR", type: "string", description: "Folder of message templates deployed with the app: `<name>/subject.*`, `<name>/html.*`, optional `<name>/text.*` (Handlebars). Messages name one with `template` and give `data`." },
  { name: "TEMPLATE_CONTAINER", type: "string", description: "Blob container of message templates, laid out like `TEMPLATE_DIR` (read with the storage settings, cached by ETag so an update is picked up). Used when `TEMPLATE_DIR` is not set." },
  { name: "EXPIRY_CHECK_SCHEDULE", type: "string", default: "0 0 7 * * *", description: "When the expiry watch runs: six-field NCRONTAB, UTC (daily at 07:00 by default)." },
  { name: "EXPIRY_WARN_DAYS", type: "string", default: "30,14,7,3,1", description: "Days before expiry at which to warn; each item warns once per threshold it crosses." },
  { name: "EXPIRY_CRITICAL_DAYS", type: "integer", default: "7", min: 0, description: "Within this many days (and once expired) an item alerts daily, and `queue-mailer expiry` exits non-zero." },
  { name: "EXPIRY_WATCH_NAMES", type: "string", description: "Key Vault items to watch: comma list of names or prefixes ending in `*` (e.g. `smtp-*,api-key`). Empty: every certificate and secret. The sender's own certificate is always watched." },
  { name: "EXPIRY_CHECK_APP_REGISTRATION", type: "enum", default: "false", values: ["true", "false"], description: "Also read the app registration's certificates and client secrets (end dates) through Microsoft Graph; needs the Application.Read.All application permission." },
  { name: "EXPIRY_ALERT_TO", type: "string", description: "Alert email recipients (comma list), enqueued on MAIL_QUEUE like any message. Empty: no email alerts." },
  { name: "EXPIRY_WEBHOOK_URL", type: "url", description: "Incoming webhook (Teams or Slack) that receives alerts as JSON `{ \"text\": … }`. Empty: no webhook.", secret: true },
  { name: "BOUNCES_ENABLED", type: "enum", default: "true", values: ["true", "false"], description: "The bounce watch (`bounceWatch` timer, `queue-mailer bounces`): read the sending mailbox over IMAP and put addresses that bounce on the suppression list. `false` turns it off (the app has no IMAP permission, or another tool reads the mailbox)." },
  { name: "BOUNCE_CHECK_SCHEDULE", type: "string", default: "0 */5 * * * *", description: "When the bounce watch reads the mailbox: six-field NCRONTAB, UTC (every 5 minutes by default)." },
  { name: "IMAP_HOST", type: "string", default: "outlook.office365.com", defaultFor: { "google-service-account": "imap.gmail.com" }, description: "IMAP server of the sending mailbox (`SMTP_USER`), where non-delivery reports arrive; signed in with XOAUTH2 and the same credential as sending." },
  { name: "IMAP_PORT", type: "integer", default: "993", min: 1, description: "IMAP port; implicit TLS." },
  { name: "IMAP_SCOPE", type: "string", default: "https://outlook.office365.com/.default", defaultFor: { "google-service-account": "https://mail.google.com/", password: "https://outlook.office365.com/IMAP.AccessAsUser.All", "refresh-token": "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access" }, description: "Scope of the token for IMAP. The app's `.default` covers `IMAP.AccessAsApp` (with `New-ServicePrincipal` and `Add-MailboxPermission`); delegated methods ask for `IMAP.AccessAsUser.All`, which the user must have consented to. Google with `refresh-token`: `https://mail.google.com/`." },
  { name: "BOUNCE_FOLDER", type: "string", default: "INBOX", description: "Mailbox folder the bounce watch reads; messages that are not bounces are left in it." },
  { name: "BOUNCE_DONE_FOLDER", type: "string", default: "queue-mailer-processed", description: "Folder processed bounce reports are moved to (created if missing), so each is read once." },
  { name: "SOFT_BOUNCE_LIMIT", type: "integer", default: "3", min: 1, description: "Soft bounces (4.x.x, or delays) of distinct messages within 7 days that put an address on the suppression list; a hard bounce (5.x.x) does at once." },
  { name: "SUPPRESSION_CHECK", type: "enum", default: "true", values: ["true", "false"], description: "Check every message's recipients against the `suppressions` table before sending: suppressed recipients are dropped, and a message left with none is poisoned with RECIPIENT_SUPPRESSED. Each instance keeps the list in memory (see SUPPRESSION_REFRESH_SECONDS)." },
  { name: "SUPPRESSION_REFRESH_SECONDS", type: "integer", default: "60", min: 0, description: "How often a sending instance reads the suppression list again: a new entry (a bounce, `suppression add`) is honoured within this time. The check itself then costs no storage request. 0: one point read per recipient per message instead." },
  { name: "WORKER_BATCH_SIZE", type: "integer", default: "16", min: 1, description: "Worker: messages taken per poll (at most 32), like `batchSize` in host.json." },
  { name: "DNS_SERVERS", type: "string", description: "`queue-mailer doctor --dns`: DNS servers to ask instead of the system's resolver: comma list of IP addresses with an optional port (`host[:port]`, e.g. `1.1.1.1,127.0.0.1:5353`). Empty: the system's." },
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
  /** EVENTS_QUEUE: delivery events for producers; unset means the table only. */
  eventsQueueName?: string;
}

export type CertificateLocation =
  | { kind: "keyVault"; vaultUrl: string; name: string }
  | { kind: "file"; path: string; password?: string };

/** A secret given as a setting, or read from Key Vault by name (cached, re-read after a rejection). */
export type SecretLocation =
  | { kind: "value"; setting: string; value: string }
  | { kind: "keyVault"; vaultUrl: string; name: string };

/** Where the delegated refresh token lives: a Key Vault secret (REFRESH_TOKEN_NAME) or a local file (REFRESH_TOKEN_PATH). */
export type RefreshTokenLocation =
  | { kind: "keyVault"; vaultUrl: string; name: string }
  | { kind: "file"; path: string };

export type AuthConfig =
  | {
      method: "certificate";
      tenantId: string;
      clientId: string;
      tokenUrl: string;
      scope: string;
      assertionAlg: AssertionAlg;
      certificate: CertificateLocation;
      /** `vault`: signed inside Key Vault (the certificate is then always a Key Vault one). */
      signing: "local" | "vault";
    }
  | { method: "secret"; tenantId: string; clientId: string; tokenUrl: string; scope: string; clientSecret: SecretLocation; clientAuth: ClientAuth }
  | {
      method: "google-service-account";
      /** Undefined: the key's `token_uri`, else Google's endpoint. */
      tokenUrl: string | undefined;
      scope: string;
      key: { kind: "file"; path: string } | { kind: "keyVault"; vaultUrl: string; name: string };
      /** The Workspace user we send as (`sub`): SMTP_USER. */
      subject: string;
    }
  | {
      method: "password";
      tenantId: string;
      clientId: string;
      tokenUrl: string;
      scope: string;
      username: string;
      password: SecretLocation;
      /** A confidential client sends its secret too. */
      clientSecret: SecretLocation | undefined;
      clientAuth: ClientAuth;
    }
  | {
      method: "refresh-token";
      tenantId: string;
      clientId: string;
      tokenUrl: string;
      /** TOKEN_SCOPE: asked for at sign-in and with every redemption. */
      scope: string;
      /** Where `queue-mailer authorize` sends the user's browser. */
      authorizeUrl: string;
      /** `queue-mailer authorize --device-code`. */
      deviceCodeUrl: string;
      /** A confidential client ("web" platform, as in the webMethods guide) sends its secret too. */
      clientSecret: SecretLocation | undefined;
      clientAuth: ClientAuth;
      refreshToken: RefreshTokenLocation;
      /** SMTP_USER (may be empty for `queue-mailer authorize`): the mailbox the signed-in user must be. */
      username: string;
      /**
       * The storage account that holds the one-redeemer-at-a-time lease (the app's own). Undefined
       * where nothing is redeemed (`queue-mailer authorize`): then the lease is this process only.
       */
      lease: StorageConfig | undefined;
    };

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
  /** SUPPRESSION_CHECK: leave out recipients on the suppression list (absent: on). */
  suppressionCheck?: boolean;
  /** SUPPRESSION_REFRESH_SECONDS: how long the in-memory list is used; 0: point reads per message. */
  suppressionRefreshSeconds?: number;
  /** Where templates are read: TEMPLATE_DIR wins over TEMPLATE_CONTAINER; neither (or absent): no templates. */
  templates?: { dir?: string; container?: string };
}

export type TransportKind = "smtp" | "graph";

export interface GraphConfig {
  /** Without a trailing slash. */
  url: string;
  maxConcurrency: number;
}

export interface SendConfig {
  storage: StorageConfig;
  mailFrom: string;
  messages: MessagePolicy;
  auth: AuthConfig;
  transport: TransportKind;
  /** The mailbox (`user`), rate limit and SMTP server; the mailbox and rate apply to Graph too. */
  smtp: SmtpConfig;
  graph: GraphConfig;
  /** Recipients per mailbox per 24 hours across instances; 0 means not counted. */
  dailyRecipientLimit: number;
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
  /** Set once AUTH_METHOD is read: per-method defaults apply from then on. */
  method: AuthMethod | undefined;
  /** Defaults decided by other settings (TRANSPORT), ahead of the declared ones. */
  readonly defaults = new Map<string, string>();
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
    const fallback = this.defaults.get(name) ?? (this.method === undefined ? undefined : spec.defaultFor?.[this.method]) ?? spec.default;
    return value === "" || value === undefined ? fallback : value;
  }

  /** Exactly one of a value setting and a Key Vault name setting, for a secret the method needs. */
  secret(valueName: string, vaultName: string, what: string, options: { optional?: boolean } = {}): SecretLocation | undefined {
    const value = this.raw(valueName);
    const name = this.raw(vaultName);
    if (value && name) {
      this.problems.push({ setting: valueName, problem: `and ${vaultName} are both set. Keep one: ${valueName} holds ${what} itself, ${vaultName} names a Key Vault secret holding it.` });
    }
    if (value) return { kind: "value", setting: valueName, value };
    if (name) {
      const vaultUrl = this.raw("KEY_VAULT_URL");
      if (!vaultUrl) this.problems.push({ setting: "KEY_VAULT_URL", problem: `is not set but ${vaultName} is. Set it to the vault's URI, e.g. https://my-vault.vault.azure.net` });
      else this.url("KEY_VAULT_URL", vaultUrl, { allowLoopbackHttp: false });
      return { kind: "keyVault", vaultUrl: vaultUrl ?? "", name };
    }
    if (!options.optional) this.problems.push({ setting: valueName, problem: `is not set, and neither is ${vaultName}. Set ${valueName} to ${what} (an app setting, or a @Microsoft.KeyVault(...) reference), or ${vaultName} to the name of a Key Vault secret holding it.` });
    return undefined;
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
  const eventsQueueName = reader.raw("EVENTS_QUEUE");
  if (eventsQueueName !== undefined && !/^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$/.test(eventsQueueName)) {
    reader.problems.push({ setting: "EVENTS_QUEUE", problem: `"${eventsQueueName}" is not a valid queue name (3-63 lower-case letters, digits and single hyphens)` });
  } else if (eventsQueueName === queueName || eventsQueueName === `${queueName}-poison`) {
    // Events on the mail queue would be taken as mail and poisoned, each poisoning another event.
    reader.problems.push({ setting: "EVENTS_QUEUE", problem: `is "${eventsQueueName}", the mail queue or its poison queue. Give the events a queue of their own, e.g. ${queueName}-events` });
  }
  return {
    ...(eventsQueueName ? { eventsQueueName } : {}),
    ...(connectionString ? { connectionString } : {}),
    ...(queueServiceUri ? { queueServiceUri } : {}),
    ...(tableServiceUri ? { tableServiceUri } : {}),
    ...(blobServiceUri ? { blobServiceUri } : {}),
    queueName,
    poisonQueueName: `${queueName}-poison`,
    attachmentContainer: reader.raw("ATTACHMENT_CONTAINER") ?? "mail-attachments",
  };
}

function templateSource(reader: SettingReader): NonNullable<MessagePolicy["templates"]> {
  const dir = reader.raw("TEMPLATE_DIR");
  const container = reader.raw("TEMPLATE_CONTAINER");
  if (container !== undefined && !/^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$/.test(container)) {
    reader.problems.push({ setting: "TEMPLATE_CONTAINER", problem: `"${container}" is not a valid container name (3-63 lower-case letters, digits and single hyphens)` });
  }
  return { ...(dir ? { dir } : {}), ...(container ? { container } : {}) };
}

/**
 * What `queue-mailer template preview` needs: where templates are, and the storage account only
 * when they are in a container.
 */
export function loadTemplateConfig(env: Env): { templates: NonNullable<MessagePolicy["templates"]>; storage?: StorageConfig; mailFrom?: string } {
  const reader = new SettingReader(env);
  const templates = templateSource(reader);
  if (templates.dir === undefined && templates.container === undefined) {
    reader.problems.push({ setting: "TEMPLATE_DIR", problem: "is not set (nor TEMPLATE_CONTAINER). Set it to the folder holding <name>/subject.*, <name>/html.* and optional <name>/text.*." });
  }
  const storage = templates.dir === undefined ? storageConfig(reader) : undefined;
  reader.throwIfProblems();
  const mailFrom = reader.raw("MAIL_FROM") ?? reader.raw("SMTP_USER");
  return { templates, ...(storage === undefined ? {} : { storage }), ...(mailFrom === undefined ? {} : { mailFrom }) };
}

/** What `enqueue` and other queue-only commands need. */
export function loadStorageConfig(env: Env): StorageConfig {
  const reader = new SettingReader(env);
  const storage = storageConfig(reader);
  reader.throwIfProblems();
  return storage;
}

/** Where the Microsoft identity platform's token endpoint is, unless TOKEN_URL says otherwise. */
function microsoftTokenUrl(reader: SettingReader, env: Env): { tenantId: string; clientId: string; tokenUrl: string } {
  const clientId = reader.required("CLIENT_ID", "Set it to the Application (client) ID from the app registration's Overview page.");
  const explicitTokenUrl = env["TOKEN_URL"]?.trim();
  const tenantId = explicitTokenUrl
    ? (reader.raw("TENANT_ID") ?? "")
    : reader.required("TENANT_ID", "Set it to the Directory (tenant) ID from the app registration's Overview page (or set TOKEN_URL).");
  const authority = reader.url("AUTHORITY_HOST", reader.raw("AUTHORITY_HOST"), { allowLoopbackHttp: true }).replace(/\/+$/, "");
  const tokenUrl = reader.url("TOKEN_URL", explicitTokenUrl || `${authority}/${encodeURIComponent(tenantId)}/oauth2/v2.0/token`, { allowLoopbackHttp: true });
  return { tenantId, clientId, tokenUrl };
}

function certificateLocation(reader: SettingReader, signing: "local" | "vault"): CertificateLocation {
  const vaultUrl = reader.raw("KEY_VAULT_URL");
  const certName = reader.raw("CERT_NAME");
  const certPath = reader.raw("CERT_PATH");
  const certPassword = reader.raw("CERT_PASSWORD");
  if (signing === "vault" && certPath && !(vaultUrl && certName)) {
    reader.problems.push({ setting: "CERT_SIGNING", problem: "is vault, which signs inside Key Vault, but the certificate is a local file (CERT_PATH). Set KEY_VAULT_URL and CERT_NAME, or CERT_SIGNING=local." });
  }
  if (certPath && signing === "local") return { kind: "file", path: certPath, ...(certPassword ? { password: certPassword } : {}) };
  if (vaultUrl || certName) {
    if (!vaultUrl) reader.problems.push({ setting: "KEY_VAULT_URL", problem: "is not set but CERT_NAME is. Set it to the vault's URI, e.g. https://my-vault.vault.azure.net" });
    if (!certName) reader.problems.push({ setting: "CERT_NAME", problem: "is not set but KEY_VAULT_URL is. Set it to the certificate's name in that vault." });
    reader.url("KEY_VAULT_URL", vaultUrl, { allowLoopbackHttp: false });
    return { kind: "keyVault", vaultUrl: vaultUrl ?? "", name: certName ?? "" };
  }
  if (!certPath) reader.problems.push({ setting: "KEY_VAULT_URL", problem: "is not set, and neither is CERT_PATH. Set KEY_VAULT_URL and CERT_NAME (certificate in Key Vault), or CERT_PATH (local PEM or PFX file)." });
  return { kind: "file", path: "" };
}

/** REFRESH_TOKEN_NAME (Key Vault) or REFRESH_TOKEN_PATH (file): exactly one. */
function refreshTokenLocation(reader: SettingReader): RefreshTokenLocation {
  const name = reader.raw("REFRESH_TOKEN_NAME");
  const path = reader.raw("REFRESH_TOKEN_PATH");
  if (name && path) reader.problems.push({ setting: "REFRESH_TOKEN_NAME", problem: "and REFRESH_TOKEN_PATH are both set. Keep one: a Key Vault secret (deployments) or a local file (development)." });
  if (path && !name) return { kind: "file", path };
  if (name) {
    const vaultUrl = reader.raw("KEY_VAULT_URL");
    if (!vaultUrl) reader.problems.push({ setting: "KEY_VAULT_URL", problem: "is not set but REFRESH_TOKEN_NAME is. Set it to the vault's URI, e.g. https://my-vault.vault.azure.net" });
    else reader.url("KEY_VAULT_URL", vaultUrl, { allowLoopbackHttp: false });
    return { kind: "keyVault", vaultUrl: vaultUrl ?? "", name };
  }
  reader.problems.push({ setting: "REFRESH_TOKEN_NAME", problem: "is not set, and neither is REFRESH_TOKEN_PATH. Set REFRESH_TOKEN_NAME to the name of a Key Vault secret (in KEY_VAULT_URL) or REFRESH_TOKEN_PATH to a local file; `queue-mailer authorize` writes the refresh token there." });
  return { kind: "file", path: "" };
}

/** AUTH_METHOD=refresh-token: the token endpoint, the sign-in endpoints and where the token lives. */
function refreshTokenAuth(reader: SettingReader, env: Env, scope: string, smtpUser: string, lease: StorageConfig | undefined): Extract<AuthConfig, { method: "refresh-token" }> {
  const microsoft = microsoftTokenUrl(reader, env);
  const authority = (reader.raw("AUTHORITY_HOST") ?? "").replace(/\/+$/, "");
  // Without TENANT_ID (another provider, TOKEN_URL set) the sign-in endpoints have no default:
  // only `queue-mailer authorize` needs them, and it names the missing one (loadAuthorizeConfig).
  const tenantPath = microsoft.tenantId ? `${authority}/${encodeURIComponent(microsoft.tenantId)}/oauth2/v2.0` : undefined;
  const endpoint = (name: string, path: string) => reader.url(name, env[name]?.trim() || (tenantPath === undefined ? undefined : `${tenantPath}/${path}`), { allowLoopbackHttp: true });
  const clientSecret = reader.secret("CLIENT_SECRET", "CLIENT_SECRET_NAME", "the client secret", { optional: true });
  return {
    method: "refresh-token",
    ...microsoft,
    scope,
    authorizeUrl: endpoint("AUTHORIZE_URL", "authorize"),
    deviceCodeUrl: endpoint("DEVICE_CODE_URL", "devicecode"),
    clientSecret,
    clientAuth: reader.oneOf<ClientAuth>("CLIENT_AUTH"),
    refreshToken: refreshTokenLocation(reader),
    username: smtpUser,
    lease,
  };
}

/** The credential settings of one auth method; settings of other methods are ignored. */
function authConfig(reader: SettingReader, env: Env, method: AuthMethod, smtpUser: string, storage: StorageConfig | undefined): AuthConfig {
  const scope = reader.raw("TOKEN_SCOPE") ?? "";
  switch (method) {
    case "refresh-token":
      return refreshTokenAuth(reader, env, scope, smtpUser, storage);
    case "secret": {
      const clientSecret = reader.secret("CLIENT_SECRET", "CLIENT_SECRET_NAME", "the client secret's value (Certificates & secrets in the app registration)");
      return { method, ...microsoftTokenUrl(reader, env), scope, clientSecret: clientSecret ?? { kind: "value", setting: "CLIENT_SECRET", value: "" }, clientAuth: reader.oneOf<ClientAuth>("CLIENT_AUTH") };
    }
    case "password": {
      const password = reader.secret("MAILBOX_PASSWORD", "MAILBOX_PASSWORD_NAME", "the password of SMTP_USER");
      const clientSecret = reader.secret("CLIENT_SECRET", "CLIENT_SECRET_NAME", "the client secret", { optional: true });
      return { method, ...microsoftTokenUrl(reader, env), scope, username: smtpUser, password: password ?? { kind: "value", setting: "MAILBOX_PASSWORD", value: "" }, clientSecret, clientAuth: reader.oneOf<ClientAuth>("CLIENT_AUTH") };
    }
    case "google-service-account": {
      const explicitTokenUrl = env["TOKEN_URL"]?.trim();
      const tokenUrl = explicitTokenUrl ? reader.url("TOKEN_URL", explicitTokenUrl, { allowLoopbackHttp: true }) : undefined;
      const path = reader.raw("GOOGLE_KEY_PATH");
      const name = reader.raw("GOOGLE_KEY_NAME");
      let key: Extract<AuthConfig, { method: "google-service-account" }>["key"] = { kind: "file", path: path ?? "" };
      if (path && name) reader.problems.push({ setting: "GOOGLE_KEY_PATH", problem: "and GOOGLE_KEY_NAME are both set. Keep one: a key file, or the name of a Key Vault secret holding the JSON key." });
      if (!path && name) {
        const vaultUrl = reader.raw("KEY_VAULT_URL");
        if (!vaultUrl) reader.problems.push({ setting: "KEY_VAULT_URL", problem: "is not set but GOOGLE_KEY_NAME is. Set it to the vault's URI, e.g. https://my-vault.vault.azure.net" });
        else reader.url("KEY_VAULT_URL", vaultUrl, { allowLoopbackHttp: false });
        key = { kind: "keyVault", vaultUrl: vaultUrl ?? "", name };
      }
      if (!path && !name) reader.problems.push({ setting: "GOOGLE_KEY_PATH", problem: "is not set, and neither is GOOGLE_KEY_NAME. Create a JSON key for the service account (IAM & Admin > Service accounts > Keys) and set GOOGLE_KEY_PATH to the file, or store the JSON as a Key Vault secret and set GOOGLE_KEY_NAME." });
      return { method, tokenUrl, scope, key, subject: smtpUser };
    }
    case "certificate":
    default: {
      const signing = reader.oneOf<"local" | "vault">("CERT_SIGNING");
      return { method: "certificate", ...microsoftTokenUrl(reader, env), scope, assertionAlg: reader.oneOf<AssertionAlg>("ASSERTION_ALG"), certificate: certificateLocation(reader, signing), signing };
    }
  }
}

/** What the sender needs (the function and `queue-mailer worker`). Throws one ConfigError naming every problem. */
export function loadSendConfig(env: Env): SendConfig {
  const reader = new SettingReader(env);
  const storage = storageConfig(reader);
  const method = reader.oneOf<AuthMethod>("AUTH_METHOD");
  if (AUTH_METHODS.includes(method)) reader.method = method;
  const transport = reader.oneOf<TransportKind>("TRANSPORT");
  const mailboxAlias = reader.raw("MAILBOX");
  const smtpUser = reader.raw("SMTP_USER") === undefined && mailboxAlias
    ? mailboxAlias
    : reader.required("SMTP_USER", method === "google-service-account"
      ? "Set it to the Workspace user the service account sends as (the assertion's `sub`; domain-wide delegation must allow it)."
      : "Set it to the mailbox address the app sends as (for SMTP it needs SMTP AUTH enabled and a FullAccess grant for the app's service principal).");
  if (mailboxAlias && mailboxAlias.toLowerCase() !== smtpUser.toLowerCase()) {
    reader.problems.push({ setting: "MAILBOX", problem: `is "${mailboxAlias}" but SMTP_USER is "${smtpUser}". MAILBOX is an alias of SMTP_USER: set one of them, or both to the same mailbox.` });
  }
  const graphUrl = reader.url("GRAPH_URL", reader.raw("GRAPH_URL"), { allowLoopbackHttp: true }).replace(/\/+$/, "");
  if (transport === "graph") {
    if (method === "google-service-account") {
      reader.problems.push({ setting: "TRANSPORT", problem: "is graph, which sends through Microsoft Graph, but AUTH_METHOD=google-service-account yields a Google token. Use TRANSPORT=smtp (smtp.gmail.com) with Google, or a Microsoft AUTH_METHOD with Graph." });
    }
    // Graph wants a token for Graph, not for Exchange SMTP.
    if (!env["TOKEN_SCOPE"]?.trim()) reader.defaults.set("TOKEN_SCOPE", method === "password" ? `${graphUrl}/Mail.Send` : method === "refresh-token" ? `${graphUrl}/Mail.Send offline_access` : `${graphUrl}/.default`);
    if (!env["SEND_RATE_PER_MINUTE"]?.trim()) reader.defaults.set("SEND_RATE_PER_MINUTE", "0");
  }
  const auth = authConfig(reader, env, method, smtpUser, storage);
  const smtp: SmtpConfig = {
    host: reader.raw("SMTP_HOST") ?? "",
    port: reader.integer("SMTP_PORT"),
    user: smtpUser,
    maxConnections: reader.integer("SMTP_MAX_CONNECTIONS"),
    ratePerMinute: reader.integer("SEND_RATE_PER_MINUTE"),
    rateWindowSeconds: reader.integer("SEND_RATE_WINDOW_SECONDS"),
  };
  const graph: GraphConfig = { url: graphUrl, maxConcurrency: reader.integer("GRAPH_MAX_CONCURRENCY") };
  const dailyRecipientLimit = reader.integer("DAILY_RECIPIENT_LIMIT");
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
    suppressionCheck: reader.oneOf<"true" | "false">("SUPPRESSION_CHECK") === "true",
    suppressionRefreshSeconds: reader.integer("SUPPRESSION_REFRESH_SECONDS"),
    templates: templateSource(reader),
  };
  reader.throwIfProblems();
  return { storage, mailFrom: reader.raw("MAIL_FROM") ?? smtpUser, messages, auth, transport, smtp, graph, dailyRecipientLimit, queue };
}

export interface AuthorizeConfig {
  auth: Extract<AuthConfig, { method: "refresh-token" }>;
  /** AUTHORIZE_REDIRECT_PORT; 0: any free port. */
  redirectPort: number;
}

/**
 * What `queue-mailer authorize` needs: the refresh-token settings and the endpoint of the chosen
 * flow; no storage and no mailbox (SMTP_USER, when set, is compared with who signs in).
 */
export function loadAuthorizeConfig(env: Env, flow: "browser" | "device"): AuthorizeConfig {
  const reader = new SettingReader(env);
  const method = reader.oneOf<AuthMethod>("AUTH_METHOD");
  if (method !== "refresh-token") {
    reader.problems.push({ setting: "AUTH_METHOD", problem: `is "${method}", but \`queue-mailer authorize\` signs a user in for delegated access. Set AUTH_METHOD=refresh-token, with REFRESH_TOKEN_NAME (Key Vault) or REFRESH_TOKEN_PATH (file) for where the refresh token goes.` });
  }
  reader.method = "refresh-token";
  // The grant must cover what the sender will ask for, so the scope follows TRANSPORT as in loadSendConfig.
  if (reader.raw("TRANSPORT") === "graph" && !env["TOKEN_SCOPE"]?.trim()) {
    reader.defaults.set("TOKEN_SCOPE", `${reader.url("GRAPH_URL", reader.raw("GRAPH_URL"), { allowLoopbackHttp: true }).replace(/\/+$/, "")}/Mail.Send offline_access`);
  }
  const smtpUser = reader.raw("SMTP_USER") ?? reader.raw("MAILBOX") ?? "";
  const auth = refreshTokenAuth(reader, env, reader.raw("TOKEN_SCOPE") ?? "", smtpUser, undefined);
  const [setting, url] = flow === "device" ? ["DEVICE_CODE_URL", auth.deviceCodeUrl] : ["AUTHORIZE_URL", auth.authorizeUrl];
  // An empty endpoint means no TENANT_ID to build it from; without TOKEN_URL that is named already.
  if (!url && !reader.problems.some((p) => p.setting === "TENANT_ID")) {
    reader.problems.push({ setting, problem: `is not set, and TENANT_ID neither to build it from. Set TENANT_ID (Microsoft) or ${setting} (another provider, e.g. Google).` });
  }
  const port = reader.raw("AUTHORIZE_REDIRECT_PORT") === undefined ? 0 : reader.integer("AUTHORIZE_REDIRECT_PORT");
  if (port > 65535) reader.problems.push({ setting: "AUTHORIZE_REDIRECT_PORT", problem: `must be a TCP port (1-65535), got "${port}"` });
  reader.throwIfProblems();
  return { auth, redirectPort: port };
}

export interface ExpiryConfig {
  /** `secretNames`: Key Vault secrets the sender uses (CLIENT_SECRET_NAME), always watched like CERT_NAME. */
  keyVault?: { vaultUrl: string; certName?: string; secretNames?: string[] };
  /**
   * The sender's client secret is an app setting (CLIENT_SECRET, maybe a Key Vault reference resolved
   * by the host), whose end date only the app registration knows, and EXPIRY_CHECK_APP_REGISTRATION is
   * off: the watch says it cannot see it.
   */
  unwatchedClientSecret?: { setting: string };
  certificateFile?: { path: string; password?: string };
  /** Read the app registration's credentials through Microsoft Graph. */
  appRegistration?: { clientId: string };
  /** The Google service account key (GOOGLE_KEY_PATH or GOOGLE_KEY_NAME): its age against the 90-day rotation. */
  googleKey?: { kind: "file"; path: string } | { kind: "keyVault"; vaultUrl: string; name: string };
  /**
   * AUTH_METHOD=refresh-token: the stored refresh token (REFRESH_TOKEN_NAME or REFRESH_TOKEN_PATH),
   * whose last rotation is watched against the provider's inactivity limit; `tokenUrl` (TOKEN_URL,
   * when set) tells the provider.
   */
  refreshToken?: { location: RefreshTokenLocation; tokenUrl?: string };
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
  // The client secret the sender uses (secret, or password with a confidential client) is watched
  // like its certificate: by name in Key Vault, or, as an app setting, only through the app registration.
  const authMethod = reader.raw("AUTH_METHOD");
  const usesClientSecret = authMethod === "secret" || authMethod === "password" || authMethod === "refresh-token";
  const clientSecretName = usesClientSecret ? reader.raw("CLIENT_SECRET_NAME") : undefined;
  const clientSecretInSetting = usesClientSecret && !clientSecretName && reader.raw("CLIENT_SECRET") !== undefined;
  if (clientSecretName && !vaultUrl) {
    reader.problems.push({ setting: "KEY_VAULT_URL", problem: "is not set but CLIENT_SECRET_NAME is. Set it to the vault's URI, e.g. https://my-vault.vault.azure.net" });
  }
  // The Google service account key has no expiry date of its own: its age is watched against
  // Google's 90-day rotation advice (shared/expiry/sources/googleServiceAccountKeySource.ts).
  const googleKeyPath = authMethod === "google-service-account" ? reader.raw("GOOGLE_KEY_PATH") : undefined;
  const googleKeyName = authMethod === "google-service-account" && !googleKeyPath ? reader.raw("GOOGLE_KEY_NAME") : undefined;
  if (googleKeyName && !vaultUrl) {
    reader.problems.push({ setting: "KEY_VAULT_URL", problem: "is not set but GOOGLE_KEY_NAME is. Set it to the vault's URI, e.g. https://my-vault.vault.azure.net" });
  }
  const googleKey: ExpiryConfig["googleKey"] = googleKeyPath ? { kind: "file", path: googleKeyPath } : googleKeyName && vaultUrl ? { kind: "keyVault", vaultUrl, name: googleKeyName } : undefined;
  // The delegated grant ends after the provider's inactivity limit unless a rotation renews it
  // (shared/expiry/sources/refreshTokenSource.ts).
  const refreshTokenPath = authMethod === "refresh-token" ? reader.raw("REFRESH_TOKEN_PATH") : undefined;
  const refreshTokenName = authMethod === "refresh-token" && !refreshTokenPath ? reader.raw("REFRESH_TOKEN_NAME") : undefined;
  if (refreshTokenName && !vaultUrl) {
    reader.problems.push({ setting: "KEY_VAULT_URL", problem: "is not set but REFRESH_TOKEN_NAME is. Set it to the vault's URI, e.g. https://my-vault.vault.azure.net" });
  }
  const refreshTokenAt: RefreshTokenLocation | undefined = refreshTokenPath ? { kind: "file", path: refreshTokenPath } : refreshTokenName && vaultUrl ? { kind: "keyVault", vaultUrl, name: refreshTokenName } : undefined;
  const explicitTokenUrl = env["TOKEN_URL"]?.trim();
  const refreshToken: ExpiryConfig["refreshToken"] = refreshTokenAt ? { location: refreshTokenAt, ...(explicitTokenUrl ? { tokenUrl: explicitTokenUrl } : {}) } : undefined;
  if (!vaultUrl && !certPath && !checkApp && !clientSecretInSetting && !googleKey && !refreshToken) {
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
    ...(vaultUrl ? { keyVault: { vaultUrl, ...(certName ? { certName } : {}), ...(clientSecretName ? { secretNames: [clientSecretName] } : {}) } } : {}),
    ...(certPath ? { certificateFile: { path: certPath, ...(certPassword ? { password: certPassword } : {}) } } : {}),
    ...(checkApp ? { appRegistration: { clientId } } : {}),
    ...(googleKey ? { googleKey } : {}),
    ...(refreshToken ? { refreshToken } : {}),
    ...(clientSecretInSetting && !checkApp ? { unwatchedClientSecret: { setting: "CLIENT_SECRET" } } : {}),
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

/**
 * DNS_SERVERS for `queue-mailer doctor --dns`, as `dns.Resolver#setServers` takes them (`host`,
 * `host:port`, `[v6]:port`); empty means the system's resolver. Throws a ConfigError naming it.
 */
export function loadDnsServers(env: Env): string[] {
  const reader = new SettingReader(env);
  const servers = (reader.raw("DNS_SERVERS") ?? "").split(",").map((s) => s.trim()).filter(Boolean);
  const hostPort = /^(?:\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?|\[[0-9a-fA-F:.]+\](?::\d{1,5})?|[0-9a-fA-F:]+:[0-9a-fA-F:.]*)$/;
  const bad = servers.filter((s) => !hostPort.test(s));
  if (bad.length > 0) reader.problems.push({ setting: "DNS_SERVERS", problem: `must be a comma list of IP addresses with optional ports (e.g. 1.1.1.1,127.0.0.1:5353 or [::1]:53); got "${bad.join(", ")}"` });
  reader.throwIfProblems();
  return servers;
}

/** The timer's schedule, read at registration time (the Functions host needs it before any run). */
export function expirySchedule(env: Env): string {
  const value = env["EXPIRY_CHECK_SCHEDULE"]?.trim();
  return value ? value : (settingSpecs.find((s) => s.name === "EXPIRY_CHECK_SCHEDULE")?.default ?? "0 0 7 * * *");
}

export interface BounceConfig {
  /** BOUNCES_ENABLED. */
  enabled: boolean;
  /** BOUNCE_CHECK_SCHEDULE: six-field NCRONTAB. */
  schedule: string;
  /** The suppression list and the send ledger (Message-ID → id) live here. */
  storage: StorageConfig;
  /** The credential of the sender, asking for IMAP_SCOPE instead of TOKEN_SCOPE. */
  auth: AuthConfig;
  /** `user`: the sending mailbox (SMTP_USER or MAILBOX), where its reports arrive. */
  imap: { host: string; port: number; user: string };
  folder: string;
  doneFolder: string;
  softBounceLimit: number;
}

/** What the bounce watch needs. Throws one ConfigError naming every problem. */
export function loadBounceConfig(env: Env): BounceConfig {
  const reader = new SettingReader(env);
  const storage = storageConfig(reader);
  const method = reader.oneOf<AuthMethod>("AUTH_METHOD");
  if (AUTH_METHODS.includes(method)) reader.method = method;
  const mailboxAlias = reader.raw("MAILBOX");
  const user = reader.raw("SMTP_USER") === undefined && mailboxAlias ? mailboxAlias : reader.required("SMTP_USER", "Set it to the mailbox the app sends as: its non-delivery reports arrive there, and the bounce watch reads it over IMAP.");
  const imapScope = reader.raw("IMAP_SCOPE") ?? "";
  const auth = { ...authConfig(reader, env, method, user, storage), scope: imapScope };
  const schedule = reader.raw("BOUNCE_CHECK_SCHEDULE") ?? "";
  if (schedule.trim().split(/\s+/).length !== 6) {
    reader.problems.push({ setting: "BOUNCE_CHECK_SCHEDULE", problem: `must be a six-field NCRONTAB expression (second minute hour day month weekday), e.g. "0 */5 * * * *"; got "${schedule}"` });
  }
  const port = reader.integer("IMAP_PORT");
  if (port > 65535) reader.problems.push({ setting: "IMAP_PORT", problem: `must be a TCP port (1-65535), got "${port}"` });
  const folder = reader.raw("BOUNCE_FOLDER") ?? "INBOX";
  const doneFolder = reader.raw("BOUNCE_DONE_FOLDER") ?? "queue-mailer-processed";
  if (folder.toLowerCase() === doneFolder.toLowerCase()) {
    reader.problems.push({ setting: "BOUNCE_DONE_FOLDER", problem: `is "${doneFolder}", the folder the bounce watch reads (BOUNCE_FOLDER). Give processed reports a folder of their own, e.g. queue-mailer-processed` });
  }
  const config: BounceConfig = {
    enabled: reader.oneOf<"true" | "false">("BOUNCES_ENABLED") === "true",
    schedule,
    storage,
    auth,
    imap: { host: reader.raw("IMAP_HOST") ?? "", port, user },
    folder,
    doneFolder,
    softBounceLimit: reader.integer("SOFT_BOUNCE_LIMIT"),
  };
  reader.throwIfProblems();
  return config;
}

/** The bounce timer's schedule, read at registration time (the Functions host needs it before any run). */
export function bounceSchedule(env: Env): string {
  const value = env["BOUNCE_CHECK_SCHEDULE"]?.trim();
  return value ? value : (settingSpecs.find((s) => s.name === "BOUNCE_CHECK_SCHEDULE")?.default ?? "0 */5 * * * *");
}
