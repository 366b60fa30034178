// Everything the sender talks to, on loopback, with real protocols: Azurite for the queue, an
// OAuth server (oidc-provider) that verifies our certificate assertions, and an SMTP server that
// requires STARTTLS and XOAUTH2 and checks the token it gets. Used by `npm run local`, the tests
// and the benchmark. `env` holds the settings that point the sender at it.
import { mkdirSync, writeFileSync } from "node:fs";
import type { AuthMethod } from "../../shared/config.js";
import { join, resolve } from "node:path";
import { startAzurite, type Azurite } from "./azurite.js";
import { ensureCertificateAuthority, issueCertificate, type CertificateAndKey } from "./devCertificates.js";
import { startOAuthServer, type OAuthServer } from "./oauthServer.js";
import { startSmtpSink, type SmtpSink, type SmtpSinkOptions } from "./smtpSink.js";

export const LOCAL_CLIENT_ID = "00000000-0000-4000-8000-00000000c0de";
export const LOCAL_TENANT_ID = "local-tenant";
export const LOCAL_MAILBOX = "mailer@contoso.test";

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
}

export interface LocalStack {
  azurite: Azurite;
  oauth: OAuthServer;
  smtp: SmtpSink;
  clientCertificate: CertificateAndKey;
  caPath: string;
  certPath: string;
  /** Settings for the sender (worker or function). */
  env: Record<string, string>;
  stop(): Promise<void>;
}

/** The settings of one auth method, pointed at the local servers. */
function authSettings(method: AuthMethod, local: { oauth: OAuthServer; certPath: string }): Record<string, string> {
  switch (method) {
    case "certificate":
      return { AUTH_METHOD: "certificate", TENANT_ID: LOCAL_TENANT_ID, CLIENT_ID: LOCAL_CLIENT_ID, TOKEN_URL: local.oauth.tokenUrl, TOKEN_SCOPE: local.oauth.scope, CERT_PATH: local.certPath };
    default:
      throw new Error(`the local stack cannot serve AUTH_METHOD=${method} yet`);
  }
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
  try {
    oauth = await startOAuthServer({
      clientId: LOCAL_CLIENT_ID,
      tenantId: LOCAL_TENANT_ID,
      certificatePem: clientCertificate.certificatePem,
      ...(options.accessTokenTtlSeconds === undefined ? {} : { accessTokenTtlSeconds: options.accessTokenTtlSeconds }),
    });
    const verifier = oauth;
    const smtp = await startSmtpSink({
      tls: { key: smtpTls.privateKeyPem, cert: smtpTls.certificatePem },
      verifyToken: (_user, token) => verifier.verifyAccessToken(token),
      ...(options.outboxDir === undefined ? {} : { outboxDir: options.outboxDir }),
      ...(options.fault === undefined ? {} : { fault: options.fault }),
    });
    const env: Record<string, string> = {
      AzureWebJobsStorage: azurite.connectionString,
      MAIL_QUEUE: "outbound-email",
      ...authSettings(options.authMethod ?? "certificate", { oauth, certPath }),
      SMTP_HOST: "127.0.0.1",
      SMTP_PORT: String(smtp.port),
      SMTP_USER: LOCAL_MAILBOX,
      MAIL_FROM: LOCAL_MAILBOX,
      SEND_RATE_PER_MINUTE: "0",
      RETRY_BASE_SECONDS: "1",
    };
    const openedOauth = oauth;
    return {
      azurite,
      oauth,
      smtp,
      clientCertificate,
      caPath: ca.caPath,
      certPath,
      env,
      async stop() {
        await Promise.allSettled([smtp.close(), openedOauth.close(), azurite.stop()]);
      },
    };
  } catch (error) {
    await Promise.allSettled([oauth?.close(), azurite.stop()]);
    throw error;
  }
}
