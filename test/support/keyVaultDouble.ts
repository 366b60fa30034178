// HTTPS test double of Azure Key Vault's REST API (certificates + secrets, read side, plus Set
// Secret: PUT /secrets/{name} adds a version with its content type and tags), of the
// Entra ID (login.microsoftonline.com) token endpoint and of the small part of Microsoft Graph the
// credential-expiry watch reads (an app registration's key and password credentials), driven
// through the REAL Azure SDK clients (@azure/identity DefaultAzureCredential,
// @azure/keyvault-certificates, @azure/keyvault-secrets, @azure/core-rest-pipeline) with no
// test-only options in production code.
//
// How it works
// - A CONNECT proxy on 127.0.0.1 tunnels ONLY `login.microsoftonline.com:443`,
//   `<vaultName>.vault.azure.net:443` and `graph.microsoft.com:443`, and it tunnels them to one
//   local HTTPS server (it never resolves those names: the upstream is always 127.0.0.1). Every
//   other CONNECT destination, and every plain (absolute-form) proxy request, gets 403 and is
//   listed in `refused`.
// - The HTTPS server's certificate is issued by the test CA (`ensureCertificateAuthority(caDir)`,
//   default `.test-ca`) for login.microsoftonline.com, *.vault.azure.net, <vault>.vault.azure.net,
//   graph.microsoft.com, localhost and 127.0.0.1. The process must trust that CA through NODE_EXTRA_CA_CERTS, which Node
//   reads only at process start (npm test: `NODE_EXTRA_CA_CERTS=.test-ca/ca.pem`).
// - `env` / `applyEnv()` give HTTPS_PROXY, NO_PROXY=127.0.0.1,localhost, AZURE_TENANT_ID,
//   AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, AZURE_TOKEN_CREDENTIALS=EnvironmentCredential,
//   AZURE_AUTHORITY_HOST=https://login.microsoftonline.com (overrides a stray value from the outer
//   environment), KEY_VAULT_URL and NODE_EXTRA_CA_CERTS (for child processes). applyEnv() also deletes AZURE_REGIONAL_AUTHORITY_NAME (it makes
//   identity probe IMDS) and the lower-case https_proxy/no_proxy (other tools prefer those).
//
// When the SDK reads the proxy variables (measured with @azure/core-rest-pipeline 1.24 /
// @typespec/ts-http-runtime 0.3.6, identity 4.13, msal-node 5.6; see the test "proxy pickup"):
// - HTTPS_PROXY is read when a client's pipeline is built, i.e. at CONSTRUCTION time of each
//   SecretClient / CertificateClient and of each credential (identity builds its own pipeline for
//   MSAL in the credential's constructor). Changing HTTPS_PROXY afterwards does not affect an
//   existing client; a client built before HTTPS_PROXY was set goes direct (to the real internet).
// - NO_PROXY is read only ONCE PER PROCESS, when the first Azure SDK pipeline of the process is
//   built (a module-level list in ts-http-runtime's proxyPolicy), and per-host answers are cached.
//   So apply the env before constructing ANY Azure SDK client in the process (including
//   @azure/storage-queue clients for Azurite): otherwise http://127.0.0.1 requests would be sent to
//   this proxy, which refuses them.
// - The proxy policy picks HTTPS_PROXY for http: URLs too (HTTPS_PROXY || ALL_PROXY || HTTP_PROXY),
//   which is another reason NO_PROXY must list the loopback names.
//
// What MSAL asks for (observed): only `POST /<tenant>/oauth2/v2.0/token` (grant_type=
// client_credentials, client_id, client_secret, scope=https://vault.azure.net/.default, plus a
// `claims` parameter with the CAE client capability because Key Vault asks for enableCae). MSAL
// uses its built-in metadata for login.microsoftonline.com, so no instance discovery and no
// openid-configuration request arrives; both are served anyway (counted as `other`).
//
// Key Vault behaviour reproduced
// - Every vault request without a bearer token issued here (for https://vault.azure.net) gets 401
//   with `WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>",
//   resource="https://vault.azure.net"`. Each SDK client sends one such unauthenticated probe
//   first (its own challenge state), so two clients sharing a credential make 2 challenges but
//   1 token request. Challenges are counted separately and not in the per-kind counts.
// - failNext(count, status, body?, headers?, only?) applies to the next `count` AUTHENTICATED vault
//   requests (a real vault answers 401 before it checks permissions or throttles), so the SDK's
//   challenge probe never eats an injected failure. With `only` (a `counts` kind such as "signs")
//   a failure waits for a request of that kind and other requests pass it by. Defaults: 403 → access-policy style
//   "does not have secrets get permission" (innererror AccessDenied; "keys sign" for a sign); 429 → Throttled with
//   Retry-After: 1. A string/Buffer body is sent as is, `null` sends no body, other values as JSON.
// - A non-exportable certificate has no readable secret here: 404 SecretNotFound. (Microsoft's
//   "Export certificates" page says the secret of a non-exportable certificate is returned without
//   the private key; production code should treat both "404" and "no key in the value" as
//   "not exportable".)
// - A disabled secret (or the secret of a disabled certificate) → 403 Forbidden, innererror
//   SecretDisabled; a disabled certificate's metadata is still readable. Expired or not-yet-valid
//   secrets are returned (Key Vault does not enforce nbf/exp on secret get).
// - Names are case-insensitive; the newest put version is the current one; list responses have
//   version-less ids and `nextLink: null`.
//
// Keys API (what @azure/keyvault-keys 4.10 CryptographyClient sends for `sign` with a key id, read
// from its source: first `GET /keys/{name}/{version}` once per client to learn the key (a 403 there
// makes it fall back to remote-only, silently), then `POST /keys/{name}/{version}/sign` with body
// `{ alg, value: base64url(digest) }` for every sign; api-version 2025-07-01):
// - Every certificate version has a managed key of the same name and version (`kid` in the
//   certificate bundle). GET answers `{ key: { kid, kty: "RSA", key_ops, n, e }, attributes
//   (enabled, nbf, exp, exportable, ...), managed: true }`; never the private part.
// - sign: PS256 (RSA-PSS, SHA-256, MGF1-SHA-256, 32-byte salt) and RS256 (PKCS#1 v1.5) over the
//   32-byte digest, with the certificate's private key held here, answering `{ kid, value }`; the
//   key is usable whether or not the certificate is exportable (a non-exportable one has no secret
//   value at all here). Another alg or digest length → 400 BadParameter; a disabled certificate's
//   key → 403 Forbidden "Operation sign is not allowed on a disabled key." (innererror KeyDisabled;
//   GET still works, as in Key Vault). `counts.keyGets` / `counts.signs`, and `signRequests` lists
//   each sign that succeeded (name, version, alg).
// - A `pending` certificate (issuance not finished) has no cer, x5t or sid in its bundle yet.
//
// Tokens: the token endpoint remembers which resource each token was issued for (the scope minus
// `/.default`; `00000003-0000-0000-c000-000000000000/.default` is Graph's app id and means Graph).
// A token is accepted only by its own resource: a Graph token on the vault gets the vault's 401
// challenge (AKV10022 invalid audience), a vault token on Graph gets Graph's 401 (below).
//
// Microsoft Graph behaviour reproduced (v1.0 only; register apps with putApplication)
// - `GET /v1.0/applications(appId='{appId}')` (the quotes may arrive as %27; the path is decoded
//   before matching; appIds match case-insensitively) → 200 application with `@odata.context`,
//   `id` (object id, stable across re-puts of the same appId), appId, displayName, keyCredentials,
//   passwordCredentials. `GET /v1.0/applications/{object id}` works too.
// - `GET /v1.0/applications?$filter=appId eq '{appId}'` → `{ "@odata.context", value: [app] }`
//   (`value: []` if none); without $filter every registered app is listed. Any other $filter → 400.
// - `$select=a,b` (names case-insensitive) returns only those properties plus `id`; a property the
//   double does not model → 400 BadRequest "Could not find a property named ..." (as Graph does for
//   unknown names), so extend APPLICATION_PROPERTIES here if production code selects more.
// - Dates are ISO 8601 UTC (`2026-01-02T03:04:05Z`; milliseconds only when non-zero). keyCredentials
//   are `AsymmetricX509Cert`/`Verify` with `key: null`; passwordCredentials have `secretText: null`
//   (Graph never returns key material or secrets on GET).
// - Unknown app → 404 Request_ResourceNotFound. Authorization is checked before anything else:
//   no bearer, or one not issued here → 401 InvalidAuthenticationToken "Access token is empty.";
//   an expired one → 401 "Lifetime validation failed, the token is expired."; a token for another
//   resource (e.g. the vault) → 401 "Access token validation failure. Invalid audience.". Graph
//   401s carry no Key Vault-style `WWW-Authenticate` challenge. Then `denyGraph(true)` → 403
//   Authorization_RequestDenied for every call (the app lacks Application.Read.All). Error bodies
//   carry Graph's `innerError` (date, request-id, client-request-id) next to code and message.
// - `counts.graphRequests` counts EVERY request that reaches the Graph host (401/403/404 included:
//   Graph clients send the token on their first request, there is no unauthenticated probe to
//   separate out). failNext() applies to vault requests only.
import { constants, createHash, createPrivateKey, createPublicKey, privateEncrypt, randomBytes, randomUUID, X509Certificate } from "node:crypto";
import type { KeyObject } from "node:crypto";
import { createServer as createHttpServer } from "node:http";
import type { IncomingMessage, OutgoingHttpHeaders, Server as HttpServer, ServerResponse } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { Server as HttpsServer } from "node:https";
import { connect as netConnect } from "node:net";
import { resolve as resolvePath } from "node:path";
import type { AddressInfo, Socket } from "node:net";
import type { Duplex } from "node:stream";
import {
  certificateDer,
  ensureCertificateAuthority,
  issueCertificate,
  toPkcs12,
} from "../../cli/local/devCertificates.js";

export interface PutCertificateOptions {
  certificatePem: string;
  privateKeyPem: string;
  /** Content type of the certificate's secret. Default `application/x-pkcs12` (Key Vault's default). */
  contentType?: "application/x-pkcs12" | "application/x-pem-file";
  enabled?: boolean;
  /** Default true. A non-exportable certificate has no secret value at all (404 SecretNotFound); its key still signs. */
  exportable?: boolean;
  /** Issuance not finished (a CSR waiting for its CA): the bundle has no cer, x5t or sid. Default false. */
  pending?: boolean;
  /** Default: the certificate's notAfter. */
  expiresOn?: Date;
  /** Default: the certificate's notBefore. */
  notBefore?: Date;
}

export interface PutApplicationOptions {
  appId: string;
  /** Default `app-<first 8 characters of appId>`. */
  displayName?: string;
  keyCredentials?: Array<{
    /** Default: a random UUID. */
    keyId?: string;
    /** Default `CN=<application displayName>`. */
    displayName?: string;
    endDateTime: Date;
    /** Default: the earlier of now and endDateTime. */
    startDateTime?: Date;
    /** Default: a random SHA-1-thumbprint-like upper-case hex string (what the portal stores). */
    customKeyIdentifier?: string;
  }>;
  passwordCredentials?: Array<{
    /** Default: a random UUID. */
    keyId?: string;
    /** Default null (Graph's value for a secret added without a description). */
    displayName?: string;
    /** Default: three random characters (Graph returns the secret's first three). */
    hint?: string;
    endDateTime: Date;
    /** Default: the earlier of now and endDateTime. */
    startDateTime?: Date;
  }>;
}

export interface KeyVaultDouble {
  vaultName: string;
  /** https://<vaultName>.vault.azure.net */
  vaultUrl: string;
  tenantId: string;
  clientId: string;
  clientSecret: string;
  /** http://127.0.0.1:<port> */
  proxyUrl: string;
  /**
   * Everything a process needs: HTTPS_PROXY, NO_PROXY, AZURE_*, KEY_VAULT_URL, and
   * NODE_EXTRA_CA_CERTS (absolute path of the test CA; only a process started later can use it).
   */
  env: Record<string, string>;
  /** Sets process.env from `env`, deletes AZURE_REGIONAL_AUTHORITY_NAME; returns a restore function. */
  applyEnv(): () => void;
  /** Returns the new version id; the newest version is the current one. */
  putCertificate(name: string, options: PutCertificateOptions): string;
  /** Returns the new version id; the newest version is the current one. */
  putSecret(name: string, value: string, options?: { contentType?: string; enabled?: boolean; expiresOn?: Date }): string;
  /** The next `count` authenticated vault requests answer `status` (with a Key Vault-like default body). */
  failNext(count: number, status: number, body?: unknown, headers?: Record<string, string>, only?: Kind): void;
  /** Enables or disables the current version of a certificate (and with it its key and secret). */
  setCertificateEnabled(name: string, enabled: boolean): void;
  /**
   * Registers (or replaces, keeping its object id) the Graph application with this appId. keyIds
   * default to random UUIDs. Read with GET graph.microsoft.com/v1.0/applications(appId='...').
   */
  putApplication(app: PutApplicationOptions): void;
  /** While true, every authenticated Graph call answers 403 Authorization_RequestDenied. */
  denyGraph(deny: boolean): void;
  /** graphRequests counts every request to graph.microsoft.com (401/403/404 included). */
  counts: {
    tokenRequests: number;
    challenges: number;
    certificateGets: number;
    secretGets: number;
    /** PUT /secrets/{name} (setSecret): each one a new version. */
    secretSets: number;
    lists: number;
    keyGets: number;
    signs: number;
    other: number;
    graphRequests: number;
  };
  /** Every sign the vault performed (status 200), in order. */
  signRequests: Array<{ name: string; version: string; alg: string }>;
  /** Every HTTP request the HTTPS server answered, in order of completion. `path` has no query. */
  requests: Array<{ method: string; host: string; path: string; status: number }>;
  /** CONNECT targets (host:port) and plain proxy requests the proxy refused with 403. */
  refused: string[];
  /** Zeroes `counts` and empties `requests`, `signRequests` and `refused`. Issued tokens stay valid. */
  resetCounts(): void;
  /** Closes proxy and server and destroys every open socket and tunnel. */
  close(): Promise<void>;
}

const LOGIN_HOST = "login.microsoftonline.com";
const VAULT_RESOURCE = "https://vault.azure.net";
const GRAPH_HOST = "graph.microsoft.com";
const GRAPH_RESOURCE = "https://graph.microsoft.com";
/** Microsoft Graph's well-known application id: `<it>/.default` is another spelling of the Graph scope. */
const GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000";
/** Application properties the double models; `$select` of anything else is a 400. */
const APPLICATION_PROPERTIES = ["id", "appId", "displayName", "keyCredentials", "passwordCredentials"] as const;
const RECOVERY_LEVEL = "Recoverable+Purgeable";
const NOT_FOUND_HELP =
  "If you recently deleted this {kind} you may be able to recover it using the correct recovery command. " +
  "For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182";

interface CertificateVersion {
  name: string;
  version: string;
  der: Buffer;
  x5t: string;
  x509: X509Certificate;
  contentType: "application/x-pkcs12" | "application/x-pem-file";
  /** Undefined for a non-exportable certificate: there is nothing to export. */
  secretValue: string | undefined;
  /** Held inside the "vault": it signs, it is never served. */
  privateKey: KeyObject;
  enabled: boolean;
  exportable: boolean;
  pending: boolean;
  notBefore: Date;
  expiresOn: Date;
  created: number;
}

interface SecretVersion {
  name: string;
  version: string;
  value: string;
  contentType?: string;
  enabled: boolean;
  expiresOn?: Date;
  created: number;
  tags?: Record<string, string>;
}

interface Item<V> {
  name: string;
  versions: V[];
}

interface Failure {
  status: number;
  body: unknown;
  headers: Record<string, string>;
  only: Kind | undefined;
}

interface KeyCredential {
  customKeyIdentifier: string;
  displayName: string;
  endDateTime: Date;
  keyId: string;
  startDateTime: Date;
}

interface PasswordCredential {
  displayName: string | null;
  endDateTime: Date;
  hint: string;
  keyId: string;
  startDateTime: Date;
}

interface Application {
  id: string;
  appId: string;
  displayName: string;
  keyCredentials: KeyCredential[];
  passwordCredentials: PasswordCredential[];
}

interface IssuedToken {
  audience: string;
  expiresAt: number;
}

/** What a vault request was, for `counts` and for `failNext(..., only)`. */
export type Kind = "certificateGets" | "secretGets" | "secretSets" | "lists" | "keyGets" | "signs" | "other";

/** DER prefix of a SHA-256 DigestInfo (RFC 8017 9.2 note 1): what PKCS#1 v1.5 signs around the digest. */
const SHA256_DIGEST_INFO = Buffer.from("3031300d060960864801650304020105000420", "hex");

function mgf1Sha256(seed: Buffer, length: number): Buffer {
  const blocks: Buffer[] = [];
  for (let counter = 0; blocks.length * 32 < length; counter++) {
    const c = Buffer.alloc(4);
    c.writeUInt32BE(counter);
    blocks.push(createHash("sha256").update(seed).update(c).digest());
  }
  return Buffer.concat(blocks).subarray(0, length);
}

/**
 * Signs a precomputed SHA-256 digest as Key Vault does. Node's sign() always hashes its input, so
 * the padding is done here (RFC 8017 9.1.1 EMSA-PSS, 9.2 EMSA-PKCS1-v1_5) and the RSA operation
 * is a raw private-key operation.
 */
function signDigest(key: KeyObject, alg: "PS256" | "RS256", digest: Buffer): Buffer {
  if (alg === "RS256") return privateEncrypt({ key, padding: constants.RSA_PKCS1_PADDING }, Buffer.concat([SHA256_DIGEST_INFO, digest]));
  const modBits = key.asymmetricKeyDetails?.modulusLength ?? 2048;
  const k = Math.ceil(modBits / 8);
  const emBits = modBits - 1;
  const emLen = Math.ceil(emBits / 8);
  const salt = randomBytes(32);
  const h = createHash("sha256").update(Buffer.alloc(8)).update(digest).update(salt).digest();
  const db = Buffer.concat([Buffer.alloc(emLen - salt.length - h.length - 2), Buffer.from([0x01]), salt]);
  const mask = mgf1Sha256(h, db.length);
  for (let i = 0; i < db.length; i++) db[i]! ^= mask[i]!;
  db[0]! &= 0xff >> (8 * emLen - emBits);
  const em = Buffer.concat([Buffer.alloc(k - emLen), db, h, Buffer.from([0xbc])]);
  return privateEncrypt({ key, padding: constants.RSA_NO_PADDING }, em);
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly body: unknown,
    readonly headers: Record<string, string> = {},
  ) {
    super(`HTTP ${status}`);
  }
}

function seconds(date: Date | number): number {
  return Math.floor((typeof date === "number" ? date : date.getTime()) / 1000);
}

function newVersion(): string {
  return randomBytes(16).toString("hex");
}

/** Graph's ISO 8601 form: UTC, no fractional part unless there is one. */
function graphDate(date: Date): string {
  return date.toISOString().replace(/\.000Z$/, "Z");
}

function vaultError(status: number, code: string, message: string, innerCode?: string): HttpError {
  const error: Record<string, unknown> = { code, message };
  if (innerCode) error.innererror = { code: innerCode };
  return new HttpError(status, { error });
}

function listen(server: HttpServer | HttpsServer): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      server.off("error", reject);
      resolve((server.address() as AddressInfo).port);
    });
  });
}

function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on("data", (chunk: Buffer) => chunks.push(chunk));
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

/** "host:port" → [host, port]; IPv6 literals keep their brackets off. */
function splitHostPort(target: string): [string, number] {
  const match = /^\[?([^\]]*?)\]?:(\d+)$/.exec(target);
  if (!match) return [target.toLowerCase(), NaN];
  return [match[1]!.toLowerCase(), Number(match[2])];
}

function subjectOf(x509: X509Certificate): string {
  return x509.subject.split("\n").join(", ");
}

function sansOf(x509: X509Certificate): Record<string, string[]> | undefined {
  if (!x509.subjectAltName) return undefined;
  const dns: string[] = [];
  const ips: string[] = [];
  for (const part of x509.subjectAltName.split(/,\s*/)) {
    if (part.startsWith("DNS:")) dns.push(part.slice(4));
    else if (part.startsWith("IP Address:")) ips.push(part.slice(11));
  }
  const sans: Record<string, string[]> = {};
  if (dns.length > 0) sans.dns_names = dns;
  if (ips.length > 0) sans.ip_addresses = ips;
  return sans;
}

export async function startKeyVaultDouble(options: { vaultName?: string; caDir?: string } = {}): Promise<KeyVaultDouble> {
  const vaultName = (options.vaultName ?? `kvdouble-${randomBytes(4).toString("hex")}`).toLowerCase();
  if (!/^[a-z][a-z0-9-]{1,22}[a-z0-9]$/.test(vaultName)) {
    throw new Error(`invalid vault name "${vaultName}" (3-24 letters, digits and hyphens, starting with a letter)`);
  }
  const vaultHost = `${vaultName}.vault.azure.net`;
  const vaultUrl = `https://${vaultHost}`;
  const tenantId = randomUUID();
  const clientId = randomUUID();
  const clientSecret = `kvd~${randomBytes(24).toString("base64url")}`;

  const ca = ensureCertificateAuthority(options.caDir ?? ".test-ca");
  const serverCertificate = issueCertificate(
    { commonName: LOGIN_HOST, hosts: [LOGIN_HOST, "*.vault.azure.net", vaultHost, GRAPH_HOST, "localhost", "127.0.0.1"], days: 30 },
    ca,
  );

  const certificates = new Map<string, Item<CertificateVersion>>();
  const secrets = new Map<string, Item<SecretVersion>>();
  const tokens = new Map<string, IssuedToken>();
  /** By lower-case appId. */
  const applications = new Map<string, Application>();
  let graphDenied = false;
  const failures: Failure[] = [];
  const counts = { tokenRequests: 0, challenges: 0, certificateGets: 0, secretGets: 0, secretSets: 0, lists: 0, keyGets: 0, signs: 0, other: 0, graphRequests: 0 };
  const signRequests: KeyVaultDouble["signRequests"] = [];
  const requests: KeyVaultDouble["requests"] = [];
  const refused: string[] = [];
  const sockets = new Set<Socket | Duplex>();
  let lastCreated = 0;

  /** Strictly increasing creation times so "newest" is well defined even within one second. */
  function createdNow(): number {
    lastCreated = Math.max(lastCreated + 1, seconds(Date.now()));
    return lastCreated;
  }

  function track<T extends Socket | Duplex>(socket: T): T {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    return socket;
  }

  // ---------------------------------------------------------------- data → Key Vault JSON

  function certificateAttributes(c: CertificateVersion): Record<string, unknown> {
    return {
      enabled: c.enabled,
      nbf: seconds(c.notBefore),
      exp: seconds(c.expiresOn),
      created: c.created,
      updated: c.created,
      recoveryLevel: RECOVERY_LEVEL,
      recoverableDays: 90,
    };
  }

  function certificatePolicy(c: CertificateVersion): Record<string, unknown> {
    const details = c.x509.publicKey.asymmetricKeyDetails ?? {};
    const keyType = c.x509.publicKey.asymmetricKeyType === "ec" ? "EC" : "RSA";
    const validityMonths = Math.max(
      1,
      Math.round((new Date(c.x509.validTo).getTime() - new Date(c.x509.validFrom).getTime()) / (30.44 * 86_400_000)),
    );
    const x509Props: Record<string, unknown> = { subject: subjectOf(c.x509), validity_months: validityMonths, ekus: [], key_usage: [] };
    const sans = sansOf(c.x509);
    if (sans) x509Props.sans = sans;
    return {
      id: `${vaultUrl}/certificates/${c.name}/policy`,
      key_props: {
        exportable: c.exportable,
        kty: keyType,
        ...(keyType === "RSA" ? { key_size: details.modulusLength ?? 2048 } : { crv: details.namedCurve }),
        reuse_key: false,
      },
      secret_props: { contentType: c.contentType },
      x509_props: x509Props,
      lifetime_actions: [{ trigger: { lifetime_percentage: 80 }, action: { action_type: "EmailContacts" } }],
      issuer: { name: "Unknown" },
      attributes: { enabled: true, created: c.created, updated: c.created },
    };
  }

  function certificateBundle(c: CertificateVersion): Record<string, unknown> {
    return {
      id: `${vaultUrl}/certificates/${c.name}/${c.version}`,
      kid: `${vaultUrl}/keys/${c.name}/${c.version}`,
      ...(c.pending ? {} : { sid: `${vaultUrl}/secrets/${c.name}/${c.version}`, x5t: c.x5t, cer: c.der.toString("base64") }),
      attributes: certificateAttributes(c),
      policy: certificatePolicy(c),
      tags: {},
    };
  }

  /** The managed key of a certificate version: public part only, as Key Vault returns it. */
  function keyBundle(c: CertificateVersion): Record<string, unknown> {
    const jwk = createPublicKey(c.privateKey).export({ format: "jwk" });
    return {
      key: { kid: `${vaultUrl}/keys/${c.name}/${c.version}`, kty: "RSA", key_ops: ["sign", "verify", "wrapKey", "unwrapKey", "encrypt", "decrypt"], n: jwk.n, e: jwk.e },
      attributes: { ...certificateAttributes(c), exportable: c.exportable },
      managed: true,
    };
  }

  function certificateItem(c: CertificateVersion, withVersion: boolean): Record<string, unknown> {
    return {
      id: `${vaultUrl}/certificates/${c.name}${withVersion ? `/${c.version}` : ""}`,
      x5t: c.x5t,
      attributes: certificateAttributes(c),
      tags: {},
    };
  }

  function secretAttributes(s: SecretVersion): Record<string, unknown> {
    const attributes: Record<string, unknown> = { enabled: s.enabled };
    if (s.expiresOn) attributes.exp = seconds(s.expiresOn);
    return { ...attributes, created: s.created, updated: s.created, recoveryLevel: RECOVERY_LEVEL, recoverableDays: 90 };
  }

  function managedSecretAttributes(c: CertificateVersion): Record<string, unknown> {
    return certificateAttributes(c);
  }

  function secretBundleOfCertificate(c: CertificateVersion): Record<string, unknown> {
    return {
      value: c.secretValue,
      contentType: c.contentType,
      id: `${vaultUrl}/secrets/${c.name}/${c.version}`,
      kid: `${vaultUrl}/keys/${c.name}/${c.version}`,
      managed: true,
      attributes: managedSecretAttributes(c),
      tags: {},
    };
  }

  function secretBundle(s: SecretVersion): Record<string, unknown> {
    const bundle: Record<string, unknown> = { value: s.value, id: `${vaultUrl}/secrets/${s.name}/${s.version}`, attributes: secretAttributes(s), tags: s.tags ?? {} };
    if (s.contentType !== undefined) bundle.contentType = s.contentType;
    return bundle;
  }

  function secretItemOfCertificate(c: CertificateVersion, withVersion: boolean): Record<string, unknown> {
    return {
      id: `${vaultUrl}/secrets/${c.name}${withVersion ? `/${c.version}` : ""}`,
      contentType: c.contentType,
      managed: true,
      attributes: managedSecretAttributes(c),
      tags: {},
    };
  }

  function secretItem(s: SecretVersion, withVersion: boolean): Record<string, unknown> {
    const item: Record<string, unknown> = { id: `${vaultUrl}/secrets/${s.name}${withVersion ? `/${s.version}` : ""}`, attributes: secretAttributes(s), tags: s.tags ?? {} };
    if (s.contentType !== undefined) item.contentType = s.contentType;
    return item;
  }

  // ---------------------------------------------------------------- lookups

  function certificateNotFound(name: string, version?: string): HttpError {
    return vaultError(
      404,
      "CertificateNotFound",
      `A certificate with (name/id) ${name}${version ? `/${version}` : ""} was not found in this key vault. ${NOT_FOUND_HELP.replace("{kind}", "certificate")}`,
    );
  }

  function secretNotFound(name: string, version?: string): HttpError {
    return vaultError(
      404,
      "SecretNotFound",
      `A secret with (name/id) ${name}${version ? `/${version}` : ""} was not found in this key vault. ${NOT_FOUND_HELP.replace("{kind}", "secret")}`,
    );
  }

  function findVersion<V extends { version: string }>(item: Item<V> | undefined, version: string | undefined): V | undefined {
    if (!item || item.versions.length === 0) return undefined;
    if (!version) return item.versions[item.versions.length - 1];
    return item.versions.find((v) => v.version === version.toLowerCase());
  }

  function getCertificate(name: string, version?: string): CertificateVersion {
    const found = findVersion(certificates.get(name.toLowerCase()), version);
    if (!found) throw certificateNotFound(name, version);
    return found;
  }

  function getSecret(name: string, version?: string): Record<string, unknown> {
    const certificate = certificates.get(name.toLowerCase());
    if (certificate) {
      const found = findVersion(certificate, version);
      if (!found || found.secretValue === undefined || found.pending) throw secretNotFound(name, version);
      if (!found.enabled) throw vaultError(403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled");
      return secretBundleOfCertificate(found);
    }
    const found = findVersion(secrets.get(name.toLowerCase()), version);
    if (!found) throw secretNotFound(name, version);
    if (!found.enabled) throw vaultError(403, "Forbidden", "Operation get is not allowed on a disabled secret.", "SecretDisabled");
    return secretBundle(found);
  }

  function listOf(value: Array<Record<string, unknown>>): Record<string, unknown> {
    return { value, nextLink: null };
  }

  function newest<V>(item: Item<V>): V {
    return item.versions[item.versions.length - 1]!;
  }

  // ---------------------------------------------------------------- HTTP plumbing

  function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}, graph = false): void {
    const out: OutgoingHttpHeaders = graph ? {} : { "x-ms-keyvault-service-version": "1.9.0.0", "x-ms-request-id": randomUUID() };
    let payload: Buffer | undefined;
    if (body === null || body === undefined) {
      payload = undefined;
    } else if (typeof body === "string" || Buffer.isBuffer(body)) {
      payload = Buffer.isBuffer(body) ? body : Buffer.from(body);
      out["content-type"] = "text/plain; charset=utf-8";
    } else {
      payload = Buffer.from(JSON.stringify(body));
      out["content-type"] = "application/json; charset=utf-8";
    }
    for (const [key, value] of Object.entries(headers)) out[key.toLowerCase()] = value;
    out["content-length"] = String(payload?.length ?? 0);
    res.writeHead(status, out);
    res.end(payload);
  }

  function defaultFailureBody(status: number, permission: string): unknown {
    switch (status) {
      case 401:
        return { error: { code: "Unauthorized", message: "AKV10032: Invalid issuer." } };
      case 403:
        return {
          error: {
            code: "Forbidden",
            message:
              `The user, group or application 'appid=${clientId};oid=${randomUUID()};iss=https://sts.windows.net/${tenantId}/' ` +
              `does not have ${permission} permission on key vault '${vaultName};location=westeurope'. ` +
              "For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287",
            innererror: { code: "AccessDenied" },
          },
        };
      case 429:
        return {
          error: {
            code: "Throttled",
            message: "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached",
          },
        };
      default:
        return { error: { code: "InjectedFailure", message: `Failure injected by the Key Vault test double (HTTP ${status}).` } };
    }
  }

  // ---------------------------------------------------------------- Entra ID

  function aadError(status: number, error: string, code: number, description: string): HttpError {
    return new HttpError(status, {
      error,
      error_description: `AADSTS${code}: ${description} Trace ID: ${randomUUID()} Correlation ID: ${randomUUID()} Timestamp: ${new Date().toISOString()}`,
      error_codes: [code],
      timestamp: new Date().toISOString(),
      trace_id: randomUUID(),
      correlation_id: randomUUID(),
    });
  }

  /** `https://graph.microsoft.com//.default` → `https://graph.microsoft.com`; Graph's app id → Graph. */
  function resourceOfScope(scope: string): string {
    const resource = scope.slice(0, -"/.default".length).replace(/\/+$/, "");
    if (resource.toLowerCase() === GRAPH_APP_ID || resource.toLowerCase() === GRAPH_RESOURCE) return GRAPH_RESOURCE;
    return resource;
  }

  function handleLogin(method: string, segments: string[], body: Buffer, req: IncomingMessage): { status: number; body: unknown } {
    const tenant = segments[0] ?? "";
    const rest = segments.slice(1).join("/");
    if (method === "POST" && rest === "oauth2/v2.0/token") {
      counts.tokenRequests++;
      if (tenant.toLowerCase() !== tenantId) {
        throw aadError(400, "invalid_request", 90002, `Tenant '${tenant}' not found.`);
      }
      const form = new URLSearchParams(body.toString("utf8"));
      let formClientId = form.get("client_id");
      let formSecret = form.get("client_secret");
      const basic = /^Basic\s+(.+)$/i.exec(req.headers.authorization ?? "");
      if (basic) {
        const [id, secret] = Buffer.from(basic[1]!, "base64").toString("utf8").split(":");
        formClientId ??= decodeURIComponent(id ?? "");
        formSecret ??= decodeURIComponent(secret ?? "");
      }
      if (form.get("grant_type") !== "client_credentials") {
        throw aadError(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.");
      }
      if (formClientId !== clientId) {
        throw aadError(400, "unauthorized_client", 700016, `Application with identifier '${formClientId ?? ""}' was not found in the directory.`);
      }
      if (formSecret !== clientSecret) {
        throw aadError(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.");
      }
      const scopes = (form.get("scope") ?? "").split(/\s+/).filter((s) => s.endsWith("/.default"));
      if (scopes.length !== 1) {
        throw aadError(400, "invalid_scope", 1002012, "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.");
      }
      const accessToken = randomBytes(32).toString("base64url");
      tokens.set(accessToken, { audience: resourceOfScope(scopes[0]!), expiresAt: Date.now() + 3600_000 });
      return { status: 200, body: { token_type: "Bearer", expires_in: 3600, ext_expires_in: 3600, access_token: accessToken } };
    }
    counts.other++;
    const authority = `https://${LOGIN_HOST}/${tenant}`;
    if (method === "GET" && rest === "v2.0/.well-known/openid-configuration") {
      return {
        status: 200,
        body: {
          token_endpoint: `${authority}/oauth2/v2.0/token`,
          token_endpoint_auth_methods_supported: ["client_secret_post", "private_key_jwt", "client_secret_basic"],
          jwks_uri: `https://${LOGIN_HOST}/${tenant}/discovery/v2.0/keys`,
          response_types_supported: ["code", "id_token", "code id_token", "id_token token"],
          subject_types_supported: ["pairwise"],
          id_token_signing_alg_values_supported: ["RS256"],
          issuer: `https://${LOGIN_HOST}/${tenantId}/v2.0`,
          authorization_endpoint: `${authority}/oauth2/v2.0/authorize`,
          device_authorization_endpoint: `${authority}/oauth2/v2.0/devicecode`,
          end_session_endpoint: `${authority}/oauth2/v2.0/logout`,
          tenant_region_scope: "EU",
          cloud_instance_name: "microsoftonline.com",
          cloud_graph_host_name: "graph.windows.net",
          msgraph_host: "graph.microsoft.com",
        },
      };
    }
    if (method === "GET" && tenant === "common" && rest === "discovery/instance") {
      return {
        status: 200,
        body: {
          tenant_discovery_endpoint: `https://${LOGIN_HOST}/${tenantId}/v2.0/.well-known/openid-configuration`,
          "api-version": "1.1",
          metadata: [
            {
              preferred_network: LOGIN_HOST,
              preferred_cache: "login.windows.net",
              aliases: [LOGIN_HOST, "login.windows.net", "login.microsoft.com", "sts.windows.net"],
            },
          ],
        },
      };
    }
    throw aadError(404, "invalid_request", 90011, `The test double does not implement ${method} /${segments.join("/")}.`);
  }

  // ---------------------------------------------------------------- Key Vault

  function classify(method: string, segments: string[]): { kind: Kind; permission: string } {
    const [collection, , third, fourth] = segments;
    if (collection === "keys") {
      if (method === "GET" && (segments.length === 2 || segments.length === 3)) return { kind: "keyGets", permission: "keys get" };
      if (method === "POST" && segments.length === 4 && fourth === "sign") return { kind: "signs", permission: "keys sign" };
      return { kind: "other", permission: `keys ${fourth ?? method.toLowerCase()}` };
    }
    if (method === "PUT" && collection === "secrets" && segments.length === 2) return { kind: "secretSets", permission: "secrets set" };
    if (method !== "GET" || (collection !== "certificates" && collection !== "secrets")) {
      return { kind: "other", permission: `${collection ?? "vault"} ${method.toLowerCase()}` };
    }
    if (segments.length === 1 || (segments.length === 3 && third === "versions")) {
      return { kind: "lists", permission: `${collection} list` };
    }
    if (segments.length === 2 || segments.length === 3) {
      if (collection === "certificates" && third === "policy") return { kind: "other", permission: "certificates get" };
      return { kind: collection === "certificates" ? "certificateGets" : "secretGets", permission: `${collection} get` };
    }
    return { kind: "other", permission: `${collection} ${method.toLowerCase()}` };
  }

  /** The token of a `Bearer` Authorization header, if it was issued here (expired or not). */
  function bearerToken(req: IncomingMessage): IssuedToken | undefined {
    const match = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? "");
    return match ? tokens.get(match[1]!) : undefined;
  }

  function handleVault(method: string, segments: string[], url: URL, req: IncomingMessage, requestBody: Buffer): { status: number; body: unknown; headers?: Record<string, string> } {
    const token = bearerToken(req);
    if (token === undefined || token.expiresAt <= Date.now() || token.audience !== VAULT_RESOURCE) {
      counts.challenges++;
      const hadToken = /^Bearer\s/i.test(req.headers.authorization ?? "");
      let message = "AKV10000: Request is missing a Bearer or PoP token.";
      if (token !== undefined && token.audience !== VAULT_RESOURCE) {
        message = `AKV10022: Invalid audience. Expected ${VAULT_RESOURCE}, found: ${token.audience}.`;
      } else if (token !== undefined) {
        message = "AKV10032: Token expired.";
      } else if (hadToken) {
        message = "AKV10032: Invalid issuer, or the token was not issued by this test double.";
      }
      return {
        status: 401,
        body: { error: { code: "Unauthorized", message } },
        headers: { "www-authenticate": `Bearer authorization="https://${LOGIN_HOST}/${tenantId}", resource="${VAULT_RESOURCE}"` },
      };
    }
    const { kind, permission } = classify(method, segments);
    counts[kind]++;
    const failureIndex = failures.findIndex((f) => f.only === undefined || f.only === kind);
    const failure = failureIndex < 0 ? undefined : failures.splice(failureIndex, 1)[0];
    if (failure) {
      const body = failure.body === undefined ? defaultFailureBody(failure.status, permission) : failure.body;
      const headers = { ...(failure.status === 429 ? { "retry-after": "1" } : {}), ...failure.headers };
      return { status: failure.status, body, headers };
    }
    if (!url.searchParams.get("api-version")) {
      throw vaultError(400, "BadParameter", "The request URI contains an invalid or missing api-version parameter.");
    }
    const [collection, name, third] = segments;
    if (collection === "keys") return handleKeys(method, segments, requestBody);
    if (collection !== "certificates" && collection !== "secrets") {
      throw vaultError(404, "NotFound", `The test double does not implement ${method} /${segments.join("/")}.`);
    }
    if (method === "PUT" && collection === "secrets" && name !== undefined && segments.length === 2) return { status: 200, body: setSecret(name, requestBody) };
    if (method !== "GET" || segments.length > 3) {
      throw vaultError(405, "MethodNotAllowed", `The test double does not implement ${method} /${segments.join("/")}.`);
    }
    if (name !== undefined && !/^[0-9a-zA-Z-]{1,127}$/.test(name)) {
      throw vaultError(400, "BadParameter", `The ${collection === "certificates" ? "certificate" : "secret"} name '${name}' is not valid.`);
    }
    if (collection === "certificates") {
      if (name === undefined) {
        return { status: 200, body: listOf([...certificates.values()].map((item) => certificateItem(newest(item), false))) };
      }
      if (third === "versions") {
        const item = certificates.get(name.toLowerCase());
        if (!item) throw certificateNotFound(name);
        return { status: 200, body: listOf(item.versions.map((c) => certificateItem(c, true))) };
      }
      if (third === "policy") return { status: 200, body: certificatePolicy(getCertificate(name)) };
      return { status: 200, body: certificateBundle(getCertificate(name, third)) };
    }
    if (name === undefined) {
      const value = [
        ...[...certificates.values()].map((item) => secretItemOfCertificate(newest(item), false)),
        ...[...secrets.values()].map((item) => secretItem(newest(item), false)),
      ];
      return { status: 200, body: listOf(value) };
    }
    if (third === "versions") {
      const certificate = certificates.get(name.toLowerCase());
      if (certificate) return { status: 200, body: listOf(certificate.versions.map((c) => secretItemOfCertificate(c, true))) };
      const item = secrets.get(name.toLowerCase());
      if (!item) throw secretNotFound(name);
      return { status: 200, body: listOf(item.versions.map((s) => secretItem(s, true))) };
    }
    return { status: 200, body: getSecret(name, third) };
  }

  /** Set Secret (PUT /secrets/{name}): a new version with the value, content type and tags sent. */
  function setSecret(name: string, requestBody: Buffer): Record<string, unknown> {
    if (!/^[0-9a-zA-Z-]{1,127}$/.test(name)) throw vaultError(400, "BadParameter", `The secret name '${name}' is not valid.`);
    if (certificates.has(name.toLowerCase())) throw vaultError(403, "Forbidden", `Secret ${name} is managed by a certificate and cannot be set.`);
    let parameters: { value?: unknown; contentType?: unknown; tags?: unknown; attributes?: { enabled?: unknown } };
    try {
      parameters = JSON.parse(requestBody.toString("utf8")) as typeof parameters;
    } catch {
      throw vaultError(400, "BadParameter", "The request body is not valid JSON.");
    }
    if (typeof parameters.value !== "string") throw vaultError(400, "BadParameter", "Property 'value' is required.");
    const item = secrets.get(name.toLowerCase()) ?? { name, versions: [] };
    const version: SecretVersion = {
      name: item.name,
      version: newVersion(),
      value: parameters.value,
      ...(typeof parameters.contentType === "string" ? { contentType: parameters.contentType } : {}),
      enabled: parameters.attributes?.enabled !== false,
      created: createdNow(),
      ...(parameters.tags && typeof parameters.tags === "object" ? { tags: parameters.tags as Record<string, string> } : {}),
    };
    item.versions.push(version);
    secrets.set(name.toLowerCase(), item);
    return secretBundle(version);
  }

  function keyNotFound(name: string, version?: string): HttpError {
    return vaultError(
      404,
      "KeyNotFound",
      `A key with (name/id) ${name}${version ? `/${version}` : ""} was not found in this key vault. ${NOT_FOUND_HELP.replace("{kind}", "key")}`,
    );
  }

  /** A certificate's managed key: `keys/{name}[/{version}]` and `keys/{name}/{version}/sign`. */
  function handleKeys(method: string, segments: string[], requestBody: Buffer): { status: number; body: unknown } {
    const [, name, version, operation] = segments;
    if (name === undefined || !/^[0-9a-zA-Z-]{1,127}$/.test(name)) throw vaultError(400, "BadParameter", `The key name '${name ?? ""}' is not valid.`);
    const isGet = method === "GET" && operation === undefined;
    const isSign = method === "POST" && operation === "sign" && segments.length === 4;
    if (!isGet && !isSign) throw vaultError(405, "MethodNotAllowed", `The test double does not implement ${method} /${segments.join("/")}.`);
    const found = findVersion(certificates.get(name.toLowerCase()), version || undefined);
    if (!found) throw keyNotFound(name, version || undefined);
    if (isGet) return { status: 200, body: keyBundle(found) };

    if (!found.enabled) throw vaultError(403, "Forbidden", "Operation sign is not allowed on a disabled key.", "KeyDisabled");
    let parameters: { alg?: unknown; value?: unknown };
    try {
      parameters = JSON.parse(requestBody.toString("utf8")) as { alg?: unknown; value?: unknown };
    } catch {
      throw vaultError(400, "BadParameter", "The request body is not valid JSON.");
    }
    const { alg, value } = parameters;
    if (alg !== "PS256" && alg !== "RS256") {
      throw vaultError(400, "BadParameter", `The test double signs with PS256 or RS256 only, got '${String(alg)}'.`);
    }
    const digest = typeof value === "string" ? Buffer.from(value, "base64url") : Buffer.alloc(0);
    if (digest.length !== 32) throw vaultError(400, "BadParameter", `Invalid digest length ${digest.length} for ${alg}: a SHA-256 digest is 32 bytes.`);
    signRequests.push({ name: found.name, version: found.version, alg });
    return { status: 200, body: { kid: `${vaultUrl}/keys/${found.name}/${found.version}`, value: signDigest(found.privateKey, alg, digest).toString("base64url") } };
  }

  // ---------------------------------------------------------------- Microsoft Graph

  function graphError(status: number, code: string, message: string, req: IncomingMessage): HttpError {
    const clientRequestId = req.headers["client-request-id"];
    return new HttpError(status, {
      error: {
        code,
        message,
        innerError: {
          date: graphDate(new Date(Math.floor(Date.now() / 1000) * 1000)),
          "request-id": randomUUID(),
          "client-request-id": typeof clientRequestId === "string" ? clientRequestId : randomUUID(),
        },
      },
    });
  }

  function applicationJson(app: Application): Record<string, unknown> {
    return {
      id: app.id,
      appId: app.appId,
      displayName: app.displayName,
      keyCredentials: app.keyCredentials.map((k) => ({
        customKeyIdentifier: k.customKeyIdentifier,
        displayName: k.displayName,
        endDateTime: graphDate(k.endDateTime),
        key: null,
        keyId: k.keyId,
        startDateTime: graphDate(k.startDateTime),
        type: "AsymmetricX509Cert",
        usage: "Verify",
      })),
      passwordCredentials: app.passwordCredentials.map((p) => ({
        customKeyIdentifier: null,
        displayName: p.displayName,
        endDateTime: graphDate(p.endDateTime),
        hint: p.hint,
        keyId: p.keyId,
        secretText: null,
        startDateTime: graphDate(p.startDateTime),
      })),
    };
  }

  /** `$select` → the canonical property names (always with `id`), or undefined for "everything". */
  function parseSelect(url: URL, req: IncomingMessage): string[] | undefined {
    const raw = url.searchParams.get("$select");
    if (raw === null) return undefined;
    const selected = new Set<string>(["id"]);
    for (const name of raw.split(",").map((s) => s.trim()).filter((s) => s.length > 0)) {
      const canonical = APPLICATION_PROPERTIES.find((p) => p.toLowerCase() === name.toLowerCase());
      if (!canonical) throw graphError(400, "BadRequest", `Could not find a property named '${name}' on type 'microsoft.graph.application'.`, req);
      selected.add(canonical);
    }
    return APPLICATION_PROPERTIES.filter((p) => selected.has(p));
  }

  function project(app: Application, select: string[] | undefined): Record<string, unknown> {
    const full = applicationJson(app);
    if (!select) return full;
    return Object.fromEntries(select.map((p) => [p, full[p]]));
  }

  function graphContext(select: string[] | undefined, entity: boolean): string {
    return `${GRAPH_RESOURCE}/v1.0/$metadata#applications${select ? `(${select.join(",")})` : ""}${entity ? "/$entity" : ""}`;
  }

  function handleGraph(method: string, segments: string[], url: URL, req: IncomingMessage): { status: number; body: unknown; headers?: Record<string, string> } {
    counts.graphRequests++;
    const token = bearerToken(req);
    if (token === undefined) throw graphError(401, "InvalidAuthenticationToken", "Access token is empty.", req);
    if (token.expiresAt <= Date.now()) throw graphError(401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.", req);
    if (token.audience !== GRAPH_RESOURCE) {
      throw graphError(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience.", req);
    }
    if (graphDenied) throw graphError(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.", req);

    const [version, resource, objectId, ...more] = segments;
    if (version !== "v1.0") throw graphError(400, "BadRequest", `Invalid version: ${version ?? ""}`, req);
    const byAppId = /^applications\(appId='([^']*)'\)$/i.exec(resource ?? "");
    const isCollection = resource?.toLowerCase() === "applications";
    if ((!byAppId && !isCollection) || more.length > 0 || (byAppId && objectId !== undefined)) {
      const segment = !byAppId && !isCollection ? resource : (more[0] ?? objectId);
      throw graphError(400, "BadRequest", `Resource not found for the segment '${segment ?? ""}'.`, req);
    }
    if (method !== "GET") {
      throw graphError(405, "Request_BadRequest", `The test double does not implement ${method} /${segments.join("/")}.`, req);
    }
    const select = parseSelect(url, req);
    const odataHeaders = { "content-type": "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8" };
    const notFound = (id: string): HttpError =>
      graphError(404, "Request_ResourceNotFound", `Resource '${id}' does not exist or one of its queried reference-property objects are not present.`, req);

    if (byAppId) {
      const app = applications.get(byAppId[1]!.toLowerCase());
      if (!app) throw notFound(byAppId[1]!);
      return { status: 200, body: { "@odata.context": graphContext(select, true), ...project(app, select) }, headers: odataHeaders };
    }
    if (objectId !== undefined) {
      const app = [...applications.values()].find((a) => a.id === objectId.toLowerCase());
      if (!app) throw notFound(objectId);
      return { status: 200, body: { "@odata.context": graphContext(select, true), ...project(app, select) }, headers: odataHeaders };
    }
    const filter = url.searchParams.get("$filter");
    let apps = [...applications.values()];
    if (filter !== null) {
      const match = /^\s*appId\s+eq\s+'([^']*)'\s*$/i.exec(filter);
      if (!match) throw graphError(400, "BadRequest", `Invalid filter clause: the test double supports only appId eq '...', got '${filter}'.`, req);
      apps = apps.filter((a) => a.appId.toLowerCase() === match[1]!.toLowerCase());
    }
    return { status: 200, body: { "@odata.context": graphContext(select, false), value: apps.map((a) => project(a, select)) }, headers: odataHeaders };
  }

  // ---------------------------------------------------------------- servers

  const httpsServer = createHttpsServer(
    { key: serverCertificate.privateKeyPem, cert: serverCertificate.certificatePem },
    (req, res) => {
      void (async () => {
        const method = req.method ?? "GET";
        const host = (req.headers.host ?? "").toLowerCase().replace(/:\d+$/, "");
        const url = new URL(req.url ?? "/", `https://${host || "localhost"}`);
        let status = 500;
        try {
          const body = await readBody(req);
          const segments = url.pathname.replace(/\/+$/, "").split("/").slice(1).map((s) => decodeURIComponent(s));
          let result: { status: number; body: unknown; headers?: Record<string, string> };
          try {
            if (host === LOGIN_HOST) {
              result = handleLogin(method, segments, body, req);
            } else if (host === vaultHost) {
              result = handleVault(method, segments, url, req, body);
            } else if (host === GRAPH_HOST) {
              result = handleGraph(method, segments, url, req);
            } else {
              counts.other++;
              result = { status: 421, body: { error: { code: "MisdirectedRequest", message: `The test double does not serve host '${host}'.` } } };
            }
          } catch (error) {
            if (!(error instanceof HttpError)) throw error;
            result = { status: error.status, body: error.body, headers: error.headers };
          }
          status = result.status;
          send(res, result.status, result.body, result.headers, host === GRAPH_HOST);
        } catch (error) {
          status = 500;
          if (!res.headersSent) send(res, 500, { error: { code: "InternalError", message: String(error) } });
          else res.destroy();
        } finally {
          requests.push({ method, host, path: url.pathname, status });
        }
      })();
    },
  );
  httpsServer.on("connection", (socket: Socket) => track(socket));
  httpsServer.on("tlsClientError", (_error, socket) => socket.destroy());

  const proxy = createHttpServer((req, res) => {
    // Absolute-form requests (plain HTTP through the proxy) are never forwarded.
    refused.push(`${req.method ?? "?"} ${req.url ?? ""}`);
    res.writeHead(403, { "content-type": "text/plain", connection: "close" });
    res.end("The Key Vault test double's proxy forwards only CONNECT to its own hosts.\n");
  });
  proxy.on("connection", (socket: Socket) => track(socket));
  proxy.on("connect", (req: IncomingMessage, clientSocket: Duplex, head: Buffer) => {
    track(clientSocket);
    const target = req.url ?? "";
    const [targetHost, targetPort] = splitHostPort(target);
    clientSocket.on("error", () => clientSocket.destroy());
    if (targetPort !== 443 || (targetHost !== LOGIN_HOST && targetHost !== vaultHost && targetHost !== GRAPH_HOST)) {
      refused.push(target);
      const message = `The Key Vault test double's proxy refuses ${target}.\n`;
      clientSocket.end(
        `HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: ${Buffer.byteLength(message)}\r\nConnection: close\r\n\r\n${message}`,
      );
      return;
    }
    const upstream = track(netConnect({ host: "127.0.0.1", port: httpsPort }));
    upstream.setNoDelay(true);
    upstream.once("connect", () => {
      clientSocket.write("HTTP/1.1 200 Connection Established\r\n\r\n");
      if (head.length > 0) upstream.write(head);
      upstream.pipe(clientSocket);
      clientSocket.pipe(upstream);
    });
    upstream.on("error", () => clientSocket.destroy());
    upstream.on("close", () => clientSocket.destroy());
    clientSocket.on("close", () => upstream.destroy());
  });

  const httpsPort = await listen(httpsServer);
  let proxyPort: number;
  try {
    proxyPort = await listen(proxy);
  } catch (error) {
    httpsServer.close();
    throw error;
  }
  const proxyUrl = `http://127.0.0.1:${proxyPort}`;

  const env: Record<string, string> = {
    HTTPS_PROXY: proxyUrl,
    NO_PROXY: "127.0.0.1,localhost",
    AZURE_TENANT_ID: tenantId,
    AZURE_CLIENT_ID: clientId,
    AZURE_CLIENT_SECRET: clientSecret,
    AZURE_TOKEN_CREDENTIALS: "EnvironmentCredential",
    AZURE_AUTHORITY_HOST: `https://${LOGIN_HOST}`,
    KEY_VAULT_URL: vaultUrl,
    // Only effective for processes started later (Node reads it at start); harmless here.
    NODE_EXTRA_CA_CERTS: resolvePath(ca.caPath),
  };
  const removedByApplyEnv = ["AZURE_REGIONAL_AUTHORITY_NAME", "https_proxy", "no_proxy"];

  let closed: Promise<void> | undefined;

  const double: KeyVaultDouble = {
    vaultName,
    vaultUrl,
    tenantId,
    clientId,
    clientSecret,
    proxyUrl,
    env,
    counts,
    signRequests,
    requests,
    refused,

    applyEnv() {
      const keys = [...removedByApplyEnv, ...Object.keys(env)];
      const saved = new Map<string, string | undefined>(keys.map((key) => [key, process.env[key]]));
      // Delete first: on Windows process.env is case-insensitive, so no_proxy is NO_PROXY.
      for (const key of removedByApplyEnv) delete process.env[key];
      for (const [key, value] of Object.entries(env)) process.env[key] = value;
      return () => {
        for (const key of keys) delete process.env[key];
        for (const [key, value] of saved) if (value !== undefined) process.env[key] = value;
      };
    },

    putCertificate(name, put) {
      if (!/^[0-9a-zA-Z-]{1,127}$/.test(name)) throw new Error(`invalid certificate name "${name}"`);
      if (secrets.has(name.toLowerCase())) throw new Error(`"${name}" is already a plain secret; Key Vault would answer 409 Conflict`);
      const der = certificateDer(put.certificatePem);
      const x509 = new X509Certificate(der);
      if (!x509.checkPrivateKey(createPrivateKey(put.privateKeyPem))) {
        throw new Error(`the private key does not match the certificate for "${name}"`);
      }
      const contentType = put.contentType ?? "application/x-pkcs12";
      const pair = { certificatePem: put.certificatePem, privateKeyPem: put.privateKeyPem };
      const exportable = put.exportable ?? true;
      // A non-exportable key never leaves the vault: there is no exportable form of it at all.
      const secretValue = !exportable
        ? undefined
        : contentType === "application/x-pkcs12"
          ? toPkcs12(pair, "").toString("base64")
          : `${put.privateKeyPem.trimEnd()}\n${put.certificatePem.trimEnd()}\n`;
      const item = certificates.get(name.toLowerCase()) ?? { name, versions: [] };
      const version: CertificateVersion = {
        name: item.name,
        version: newVersion(),
        der,
        x5t: createHash("sha1").update(der).digest("base64url"),
        x509,
        contentType,
        secretValue,
        privateKey: createPrivateKey(put.privateKeyPem),
        enabled: put.enabled ?? true,
        exportable,
        pending: put.pending ?? false,
        notBefore: put.notBefore ?? new Date(x509.validFrom),
        expiresOn: put.expiresOn ?? new Date(x509.validTo),
        created: createdNow(),
      };
      item.versions.push(version);
      certificates.set(name.toLowerCase(), item);
      return version.version;
    },

    putSecret(name, value, put = {}) {
      if (!/^[0-9a-zA-Z-]{1,127}$/.test(name)) throw new Error(`invalid secret name "${name}"`);
      if (certificates.has(name.toLowerCase())) {
        throw new Error(`"${name}" is a certificate's managed secret; Key Vault would answer 403 (managed secrets are read-only)`);
      }
      const item = secrets.get(name.toLowerCase()) ?? { name, versions: [] };
      const version: SecretVersion = {
        name: item.name,
        version: newVersion(),
        value,
        ...(put.contentType !== undefined ? { contentType: put.contentType } : {}),
        enabled: put.enabled ?? true,
        ...(put.expiresOn !== undefined ? { expiresOn: put.expiresOn } : {}),
        created: createdNow(),
      };
      item.versions.push(version);
      secrets.set(name.toLowerCase(), item);
      return version.version;
    },

    failNext(count, status, body, headers = {}, only) {
      if (!Number.isInteger(count) || count < 0) throw new Error(`failNext: count must be a non-negative integer, got ${count}`);
      if (!Number.isInteger(status) || status < 100 || status > 599) throw new Error(`failNext: invalid HTTP status ${status}`);
      if (only !== undefined && !(only in counts)) throw new Error(`failNext: unknown request kind "${only}"`);
      for (let i = 0; i < count; i++) failures.push({ status, body, headers, only });
    },

    setCertificateEnabled(name, enabled) {
      const item = certificates.get(name.toLowerCase());
      if (!item) throw new Error(`setCertificateEnabled: no certificate "${name}"`);
      newest(item).enabled = enabled;
    },

    putApplication(app) {
      if (typeof app.appId !== "string" || app.appId.trim() === "" || /['\/]/.test(app.appId)) {
        throw new Error(`putApplication: invalid appId "${String(app.appId)}"`);
      }
      const checkDate = (date: unknown, what: string): Date => {
        if (!(date instanceof Date) || Number.isNaN(date.getTime())) throw new Error(`putApplication: ${what} must be a valid Date`);
        return date;
      };
      const startOf = (start: Date | undefined, end: Date, what: string): Date =>
        start !== undefined ? checkDate(start, `${what}.startDateTime`) : new Date(Math.min(Date.now(), end.getTime()));
      const existing = applications.get(app.appId.toLowerCase());
      const displayName = app.displayName ?? `app-${app.appId.slice(0, 8)}`;
      applications.set(app.appId.toLowerCase(), {
        id: existing?.id ?? randomUUID(),
        appId: app.appId,
        displayName,
        keyCredentials: (app.keyCredentials ?? []).map((k, i) => {
          const endDateTime = checkDate(k.endDateTime, `keyCredentials[${i}].endDateTime`);
          return {
            customKeyIdentifier: k.customKeyIdentifier ?? randomBytes(20).toString("hex").toUpperCase(),
            displayName: k.displayName ?? `CN=${displayName}`,
            endDateTime,
            keyId: k.keyId ?? randomUUID(),
            startDateTime: startOf(k.startDateTime, endDateTime, `keyCredentials[${i}]`),
          };
        }),
        passwordCredentials: (app.passwordCredentials ?? []).map((p, i) => {
          const endDateTime = checkDate(p.endDateTime, `passwordCredentials[${i}].endDateTime`);
          return {
            displayName: p.displayName ?? null,
            endDateTime,
            hint: p.hint ?? randomBytes(3).toString("base64url").slice(0, 3),
            keyId: p.keyId ?? randomUUID(),
            startDateTime: startOf(p.startDateTime, endDateTime, `passwordCredentials[${i}]`),
          };
        }),
      });
    },

    denyGraph(deny) {
      graphDenied = deny;
    },

    resetCounts() {
      for (const key of Object.keys(counts) as Array<keyof typeof counts>) counts[key] = 0;
      requests.length = 0;
      signRequests.length = 0;
      refused.length = 0;
    },

    close() {
      closed ??= (async () => {
        const closing = [proxy, httpsServer].map(
          (server) => new Promise<void>((resolve) => server.close(() => resolve())),
        );
        proxy.closeAllConnections();
        httpsServer.closeAllConnections();
        for (const socket of sockets) socket.destroy();
        sockets.clear();
        await Promise.all(closing);
      })();
      return closed;
    },
  };
  return double;
}
