// Everything the sender talks to, on loopback, with real protocols: Azurite for the queue, an
// OAuth server (oidc-provider) that verifies our client credentials (certificate assertions, client
// secrets, the password grant) and signs the mailbox user in for AUTH_METHOD=refresh-token
// (authorization code with PKCE, device code, rotating refresh tokens), and an SMTP server that
// requires STARTTLS and XOAUTH2 and checks the token it gets. With `transport: "graph"` also a
// Microsoft Graph mail double (HTTPS, same CA) that checks Graph tokens from the same OAuth server.
// Used by `npm run local`, the tests and the benchmark. `env` holds the settings that point the
// sender at it.
import { randomBytes } from "node:crypto";
import { mkdirSync, writeFileSync } from "node:fs";
import type { AuthMethod } from "../../shared/config.js";
import { join, resolve } from "node:path";
import { startAzurite, type Azurite } from "./azurite.js";
import { ensureCertificateAuthority, issueCertificate, type CertificateAndKey } from "./devCertificates.js";
import { startOAuthServer, GRAPH_RESOURCE, type OAuthServer } from "./oauthServer.js";
import { startGraphMailServer, type GraphMailServer } from "./graphMailServer.js";
import { GOOGLE_MAIL_SCOPE, startGoogleTokenServer, type GoogleServiceAccountKeyJson, type GoogleTokenServer } from "./googleTokenServer.js";
import { startSmtpSink, type SmtpSink, type SmtpSinkOptions } from "./smtpSink.js";
import { fileRefreshTokenStore } from "../../shared/auth/refreshTokenStore.js";

export const LOCAL_CLIENT_ID = "00000000-0000-4000-8000-00000000c0de";
export const LOCAL_TENANT_ID = "local-tenant";
export const LOCAL_MAILBOX = "mailer@contoso.test";
/** App registration with a client secret (client_secret_post), for AUTH_METHOD=secret. */
export const LOCAL_SECRET_CLIENT_ID = "00000000-0000-4000-8000-0000005ec7e7";
/** Public client ("Allow public client flows"), for AUTH_METHOD=password. */
export const LOCAL_PUBLIC_CLIENT_ID = "00000000-0000-4000-8000-00000000b1c0";
/**
 * "Mobile and desktop applications" app registration with the redirect http://localhost, for
 * AUTH_METHOD=refresh-token (`queue-mailer authorize`, browser or device code; refresh tokens rotate).
 */
export const LOCAL_DELEGATED_CLIENT_ID = "00000000-0000-4000-8000-0000000de1e9";

export interface LocalStackOptions {
  /** Where the CA lives; processes that talk to the SMTP server trust `${caDir}/ca.pem`. */
  caDir: string;
  /** Where the dev client certificate is written (PEM, certificate + key). */
  workDir: string;
  outboxDir?: string;
  preferDefaultPorts?: boolean;
  fault?: SmtpSinkOptions["fault"];
  /** Lifetime of issued access tokens (default 3600). */
  accessTokenTtlSeconds?: number;
  /** The client certificate the OAuth server trusts; generated when absent. */
  clientCertificate?: CertificateAndKey;
  /** Which AUTH_METHOD `env` is set up for (default certificate); the local servers accept it. */
  authMethod?: AuthMethod;
  /**
   * How `env` sends (default smtp). "graph": TRANSPORT=graph, GRAPH_URL pointing at the Graph
   * double and TOKEN_SCOPE for Graph; the SMTP sink runs as well.
   */
  transport?: "smtp" | "graph";
  /**
   * AUTH_METHOD=refresh-token: sign LOCAL_MAILBOX in without a browser and store the refresh token
   * in `refreshTokenPath` (default true). false: nothing is stored until `queue-mailer authorize` runs.
   */
  authorizeRefreshToken?: boolean;
  /**
   * Exchange Online IMAP on the OAuth server (the bounce watch; an IMAP server such as
   * test/support/dovecot.ts checks tokens at `oauth.introspectionUrl`): app-only tokens carry
   * IMAP.AccessAsApp, the certificate and secret apps hold a mailbox permission for LOCAL_MAILBOX
   * (Add-MailboxPermission), and IMAP.AccessAsUser.All is consented for the delegated clients.
   * Default false: tokens look exactly as without IMAP.
   */
  imap?: boolean;
}

export interface LocalStack {
  azurite: Azurite;
  oauth: OAuthServer;
  smtp: SmtpSink;
  clientCertificate: CertificateAndKey;
  caPath: string;
  certPath: string;
  /**
   * AUTH_METHOD=google-service-account only: Google's token endpoint double, the service account's
   * JSON key (written to `keyPath`, GOOGLE_KEY_PATH in `env`) with domain-wide delegation of
   * https://mail.google.com/ for LOCAL_MAILBOX. The SMTP sink checks tokens with this server.
   */
  google?: { server: GoogleTokenServer; key: GoogleServiceAccountKeyJson; keyPath: string };
  /**
   * transport "graph" only: the Microsoft Graph mail double (GRAPH_URL in `env`), which knows
   * LOCAL_MAILBOX and accepts tokens the OAuth server issued for Graph (app-only: Mail.Send and
   * Mail.ReadWrite consented; delegated: the scopes the password grant asked for).
   */
  graph?: GraphMailServer;
  /**
   * AUTH_METHOD=refresh-token only: REFRESH_TOKEN_PATH in `env` (written only with
   * `authorizeRefreshToken`, else by `queue-mailer authorize`).
   */
  refreshTokenPath?: string;
  /** LOCAL_MAILBOX's password (fresh per stack): what a user types on the sign-in page. */
  mailboxPassword: string;
  /** Settings for the sender (worker or function). */
  env: Record<string, string>;
  stop(): Promise<void>;
}

/** The settings of one auth method, pointed at the local servers. */
function authSettings(method: AuthMethod, local: { oauth: OAuthServer; certPath: string; clientSecret: string; mailboxPassword: string; googleKeyPath?: string; refreshTokenPath: string }): Record<string, string> {
  switch (method) {
    case "certificate":
      return { AUTH_METHOD: "certificate", TENANT_ID: LOCAL_TENANT_ID, CLIENT_ID: LOCAL_CLIENT_ID, TOKEN_URL: local.oauth.tokenUrl, TOKEN_SCOPE: local.oauth.scope, CERT_PATH: local.certPath };
    case "secret":
      return { AUTH_METHOD: "secret", TENANT_ID: LOCAL_TENANT_ID, CLIENT_ID: LOCAL_SECRET_CLIENT_ID, TOKEN_URL: local.oauth.tokenUrl, TOKEN_SCOPE: local.oauth.scope, CLIENT_SECRET: local.clientSecret, CLIENT_AUTH: "post" };
    case "password":
      return { AUTH_METHOD: "password", TENANT_ID: LOCAL_TENANT_ID, CLIENT_ID: LOCAL_PUBLIC_CLIENT_ID, TOKEN_URL: local.oauth.tokenUrl, TOKEN_SCOPE: local.oauth.delegatedScope, MAILBOX_PASSWORD: local.mailboxPassword };
    case "google-service-account":
      // No TOKEN_URL or TOKEN_SCOPE: the key's token_uri and the method's default scope are used,
      // as with a key downloaded from Google.
      return { AUTH_METHOD: "google-service-account", GOOGLE_KEY_PATH: local.googleKeyPath ?? "" };
    case "refresh-token":
      return {
        AUTH_METHOD: "refresh-token",
        TENANT_ID: LOCAL_TENANT_ID,
        CLIENT_ID: LOCAL_DELEGATED_CLIENT_ID,
        TOKEN_URL: local.oauth.tokenUrl,
        AUTHORIZE_URL: local.oauth.authorizeUrl,
        DEVICE_CODE_URL: local.oauth.deviceCodeUrl,
        TOKEN_SCOPE: local.oauth.delegatedRefreshScope,
        REFRESH_TOKEN_PATH: local.refreshTokenPath,
      };
    default:
      throw new Error(`the local stack cannot serve AUTH_METHOD=${method} yet`);
  }
}

/**
 * TOKEN_SCOPE for Graph: app-only methods ask for everything consented (`.default`), the password
 * grant for the delegated permission it uses. Set explicitly because the setting's default is derived
 * from GRAPH_URL, which here is the double's loopback address, not Graph's resource URI.
 */
function graphScope(method: AuthMethod, oauth: OAuthServer): string {
  if (method === "google-service-account") {
    throw new Error("transport \"graph\" needs a Microsoft AUTH_METHOD: a Google service account token is not accepted by Microsoft Graph");
  }
  if (method === "refresh-token") return `${oauth.graphDelegatedScope} offline_access`;
  return method === "password" ? oauth.graphDelegatedScope : oauth.graphScope;
}

export async function startLocalStack(options: LocalStackOptions): Promise<LocalStack> {
  const ca = ensureCertificateAuthority(options.caDir);
  mkdirSync(options.workDir, { recursive: true });
  const clientCertificate = options.clientCertificate ?? issueCertificate({ commonName: "queue-mailer dev client", days: 365 });
  const certPath = resolve(join(options.workDir, "dev-client.pem"));
  // Key first, then certificate: the loader accepts either order, and this is the order
  // `openssl pkcs12 -nodes` writes.
  writeFileSync(certPath, clientCertificate.privateKeyPem + clientCertificate.certificatePem, { mode: 0o600 });
  const smtpTls = issueCertificate({ commonName: "localhost", hosts: ["localhost", "127.0.0.1"] }, ca);

  const azurite = await startAzurite({ preferDefaultPorts: options.preferDefaultPorts ?? false });
  let oauth: OAuthServer | undefined;
  let googleServer: GoogleTokenServer | undefined;
  let graph: GraphMailServer | undefined;
  let smtpSink: SmtpSink | undefined;
  // Fresh per stack, like a new app secret and a user's password: nothing to leak from the repo,
  // and tests can search logs for the exact values.
  const clientSecret = randomBytes(30).toString("base64url");
  const mailboxPassword = randomBytes(18).toString("base64url");
  try {
    oauth = await startOAuthServer({
      clientId: LOCAL_CLIENT_ID,
      tenantId: LOCAL_TENANT_ID,
      certificatePem: clientCertificate.certificatePem,
      // Every stack accepts every Microsoft method: the certificate client above, a secret client
      // and a public client for the mailbox user's password grant.
      clients: [
        { clientId: LOCAL_SECRET_CLIENT_ID, auth: "client_secret_post", secret: clientSecret },
        { clientId: LOCAL_PUBLIC_CLIENT_ID, auth: "none" },
        { clientId: LOCAL_DELEGATED_CLIENT_ID, auth: "none", redirectUris: ["http://localhost"] },
      ],
      users: [{ username: LOCAL_MAILBOX, password: mailboxPassword }],
      // With Graph, admin consent as a Graph sender needs it: Mail.Send for sendMail, Mail.ReadWrite for
      // the draft and upload session that messages over Graph's 4 MB request limit take.
      ...(options.transport === "graph" ? { graph: { roles: ["Mail.Send", "Mail.ReadWrite"], delegatedPermissions: ["Mail.Send", "Mail.ReadWrite"] } } : {}),
      ...(options.imap === true ? { imap: { mailboxPermissions: { [LOCAL_CLIENT_ID]: [LOCAL_MAILBOX], [LOCAL_SECRET_CLIENT_ID]: [LOCAL_MAILBOX] } } } : {}),
      ...(options.accessTokenTtlSeconds === undefined ? {} : { accessTokenTtlSeconds: options.accessTokenTtlSeconds }),
    });
    const verifier = oauth;
    let google: LocalStack["google"];
    if (options.authMethod === "google-service-account") {
      // A Workspace domain with one user, a service account with a JSON key like Google's (RSA 2048,
      // PKCS#8) and domain-wide delegation of Gmail's scope, as an admin would set it up.
      googleServer = await startGoogleTokenServer({ users: [LOCAL_MAILBOX], ...(options.accessTokenTtlSeconds === undefined ? {} : { accessTokenTtlSeconds: options.accessTokenTtlSeconds }) });
      const account = googleServer.createServiceAccount("queue-mailer");
      googleServer.delegate(account.clientId, [GOOGLE_MAIL_SCOPE]);
      const key = googleServer.createKey(account.clientEmail);
      const keyPath = resolve(join(options.workDir, "google-service-account.json"));
      writeFileSync(keyPath, JSON.stringify(key, null, 2), { mode: 0o600 });
      google = { server: googleServer, key, keyPath };
    }
    const googleVerifier = googleServer;
    const smtp = (smtpSink = await startSmtpSink({
      tls: { key: smtpTls.privateKeyPem, cert: smtpTls.certificatePem },
      // App tokens need SMTP.SendAsApp; delegated ones (password grant) SMTP.Send for this very user;
      // Gmail's are checked by the Google double (subject = the XOAUTH2 user, Gmail scope).
      verifyToken: (user, token) => (googleVerifier ? googleVerifier.verifyAccessToken(token, user) : verifier.verifyAccessToken(token, user)),
      ...(options.outboxDir === undefined ? {} : { outboxDir: options.outboxDir }),
      ...(options.fault === undefined ? {} : { fault: options.fault }),
    }));
    const authMethod = options.authMethod ?? "certificate";
    const refreshTokenPath = resolve(join(options.workDir, "refresh-token.json"));
    if (authMethod === "refresh-token" && options.authorizeRefreshToken !== false) {
      // What `queue-mailer authorize` leaves behind, without the browser: the user's consent and
      // a refresh token (rotating from its first use) in REFRESH_TOKEN_PATH.
      const scope = options.transport === "graph" ? graphScope(authMethod, oauth) : oauth.delegatedRefreshScope;
      const token = await oauth.issueRefreshToken(LOCAL_DELEGATED_CLIENT_ID, LOCAL_MAILBOX, scope);
      await fileRefreshTokenStore(refreshTokenPath).write({ token, user: LOCAL_MAILBOX, authorizedAt: new Date() });
    }
    let graphSettings: Record<string, string> = {};
    if (options.transport === "graph") {
      const scope = graphScope(authMethod, oauth);
      graph = await startGraphMailServer({
        tls: { key: smtpTls.privateKeyPem, cert: smtpTls.certificatePem },
        mailboxes: [LOCAL_MAILBOX],
        // A Graph token (audience Graph) with the permission the operation needs; a delegated one
        // only for its own user's mailbox.
        verifyToken: (token, mailbox, permission) => verifier.verifyAccessToken(token, mailbox, GRAPH_RESOURCE, permission),
      });
      graphSettings = { TRANSPORT: "graph", GRAPH_URL: graph.url, TOKEN_SCOPE: scope };
    }
    const env: Record<string, string> = {
      AzureWebJobsStorage: azurite.connectionString,
      MAIL_QUEUE: "outbound-email",
      ...authSettings(authMethod, { oauth, certPath, clientSecret, mailboxPassword, refreshTokenPath, ...(google ? { googleKeyPath: google.keyPath } : {}) }),
      SMTP_HOST: "127.0.0.1",
      SMTP_PORT: String(smtp.port),
      SMTP_USER: LOCAL_MAILBOX,
      MAIL_FROM: LOCAL_MAILBOX,
      SEND_RATE_PER_MINUTE: "0",
      RETRY_BASE_SECONDS: "1",
      ...graphSettings,
    };
    const openedOauth = oauth;
    const openedGraph = graph;
    return {
      azurite,
      oauth,
      smtp,
      clientCertificate,
      caPath: ca.caPath,
      certPath,
      ...(google ? { google } : {}),
      ...(openedGraph ? { graph: openedGraph } : {}),
      ...(authMethod === "refresh-token" ? { refreshTokenPath } : {}),
      mailboxPassword,
      env,
      async stop() {
        await Promise.allSettled([smtp.close(), openedGraph?.close(), openedOauth.close(), googleVerifier?.close(), azurite.stop()]);
      },
    };
  } catch (error) {
    await Promise.allSettled([smtpSink?.close(), graph?.close(), oauth?.close(), googleServer?.close(), azurite.stop()]);
    throw error;
  }
}
