// Steps 3 and 4 read the credential once, through the same sources the sender uses (certificate
// file or Key Vault certificate, vault signing, secret setting or Key Vault secret, Google key), and
// keep what they learn for the later steps: the certificate's thumbprint for AADSTS700027, the
// Google client id for domain-wide delegation. A Key Vault failure belongs to step 3, a problem
// with the material itself to step 4.
import { createHash, X509Certificate } from "node:crypto";
import { fileCertificateSource, keyVaultCertificateSource, keyVaultError } from "../auth/certificateSource.js";
import { serviceAccountKeySource, keySetting, type ServiceAccountKey } from "../auth/googleServiceAccountCredential.js";
import { secretSourceFor, type LoadedSecret } from "../auth/secretSource.js";
import { localSigner } from "../auth/clientAssertion.js";
import { keyVaultSignerSource } from "../auth/vaultSigningCredential.js";
import { azureCredential } from "../auth/azureCredential.js";
import { refreshTokenStoreFor } from "../auth/refreshTokenStore.js";
import type { AuthConfig, SecretLocation } from "../config.js";
import { MailerError, toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
import type { FixContext } from "./fixes.js";

/** The certificate as the checks need it; the private key only to check it (never shown). */
export interface CertificateMaterial {
  x509: X509Certificate;
  /** undefined when the key stays in Key Vault (CERT_SIGNING=vault). */
  privateKey: import("node:crypto").KeyObject | undefined;
  location: string;
  thumbprintSha1Hex: string;
}

export type Material =
  | { method: "certificate"; certificate: CertificateMaterial }
  | { method: "secret" | "password"; secrets: Array<LoadedSecret & { what: string; setting: string }> }
  | { method: "google-service-account"; key: ServiceAccountKey & { source: string } }
  | { method: "refresh-token"; stored: { user?: string; rotatedAt?: Date; authorizedAt?: Date; where: string; setting: string } };

/** What was read from Key Vault, and what for (it decides the role a denial names). */
export type VaultUse = NonNullable<FixContext["keyVault"]>;

export interface MaterialOutcome {
  /** Key Vault items read (or attempted), in order; empty when nothing is in Key Vault. */
  vaultItems: VaultUse[];
  /** A Key Vault failure (step 3), with the item it happened on. */
  vaultError?: { error: MailerError; item: VaultUse };
  /** A problem with the material (step 4). */
  materialError?: MailerError;
  material?: Material;
  /** What step 3 proved, for its message. */
  vaultProof: string[];
}

export const sha1Hex = (der: Buffer) => createHash("sha1").update(der).digest("hex").toUpperCase();

const isVaultError = (error: MailerError) => error.code.startsWith("KEYVAULT_");

export async function loadCredentialMaterial(auth: AuthConfig, logger: Logger): Promise<MaterialOutcome> {
  const outcome: MaterialOutcome = { vaultItems: [], vaultProof: [] };
  /** Runs one read; sorts its failure into step 3 or 4. Returns undefined when it failed. */
  async function read<T>(item: VaultUse | undefined, load: () => Promise<T>): Promise<T | undefined> {
    if (item) outcome.vaultItems.push(item);
    try {
      return await load();
    } catch (error) {
      const failure = toMailerError(error);
      if (item && isVaultError(failure)) outcome.vaultError = { error: failure, item };
      else outcome.materialError = failure;
      return undefined;
    }
  }

  switch (auth.method) {
    case "certificate": {
      const location = auth.certificate;
      if (location.kind === "file") {
        const loaded = await read(undefined, () => fileCertificateSource(location.path, location.password).load());
        if (loaded) outcome.material = { method: "certificate", certificate: { x509: loaded.certificate, privateKey: loaded.privateKey, location: `CERT_PATH ${location.path}`, thumbprintSha1Hex: sha1Hex(loaded.certificate.raw) } };
        return outcome;
      }
      const item: VaultUse = { vaultUrl: location.vaultUrl, name: location.name, setting: "CERT_NAME", use: "certificate" };
      if (auth.signing === "local") {
        const loaded = await read(item, () => keyVaultCertificateSource(location.vaultUrl, location.name, logger).load());
        if (loaded) {
          outcome.vaultProof.push(`certificate "${location.name}" and its private key read`);
          outcome.material = { method: "certificate", certificate: { x509: loaded.certificate, privateKey: loaded.privateKey, location: `Key Vault ${location.vaultUrl} certificate ${location.name}`, thumbprintSha1Hex: sha1Hex(loaded.certificate.raw) } };
        } else if (outcome.materialError) {
          // The vault answered; what it holds is the problem.
          outcome.vaultProof.push(`certificate "${location.name}" read`);
        }
        return outcome;
      }
      // CERT_SIGNING=vault: the public certificate through the certificates API, then one signature
      // inside the vault, which is what proves the Crypto User role.
      const x509 = await read(item, async () => {
        const { CertificateClient } = await import("@azure/keyvault-certificates");
        const client = new CertificateClient(location.vaultUrl, await azureCredential());
        let certificate: import("@azure/keyvault-certificates").KeyVaultCertificateWithPolicy;
        try {
          certificate = await client.getCertificate(location.name);
        } catch (error) {
          throw keyVaultError(error, "certificate", location.vaultUrl, location.name, "certificate");
        }
        if (certificate.properties.enabled === false) {
          throw new MailerError("KEYVAULT_CERT_DISABLED", `Key Vault certificate "${location.name}" is disabled`, { kind: "config", hint: "Enable it or set CERT_NAME to the current certificate." });
        }
        if (!certificate.cer || certificate.cer.length === 0) {
          throw new MailerError("KEYVAULT_CERT_PENDING", `Key Vault certificate "${location.name}" is not issued yet: it has a key but no certificate`, { kind: "config", hint: "Finish the issuance (merge the CA-signed certificate into the pending request) or set CERT_NAME to an issued certificate." });
        }
        return new X509Certificate(Buffer.from(certificate.cer));
      });
      if (outcome.vaultError || outcome.materialError) return outcome;
      outcome.vaultProof.push(`certificate "${location.name}" read`);
      const signItem: VaultUse = { ...item, use: "sign" };
      const signed = await read(signItem, async () => {
        const loaded = await keyVaultSignerSource(location.vaultUrl, location.name, logger).load();
        const signer = "sign" in loaded ? loaded : localSigner(loaded);
        await signer.sign(auth.assertionAlg, Buffer.from("queue-mailer doctor: may this identity sign?"));
        return true;
      });
      if (signed) outcome.vaultProof.push(`a test signature (${auth.assertionAlg}) made inside the vault`);
      if (x509) outcome.material = { method: "certificate", certificate: { x509, privateKey: undefined, location: `Key Vault ${location.vaultUrl} certificate ${location.name} (key in the vault)`, thumbprintSha1Hex: sha1Hex(x509.raw) } };
      return outcome;
    }
    case "secret":
    case "password": {
      const wanted: Array<{ location: SecretLocation; what: string; setting: string }> = auth.method === "secret"
        ? [{ location: auth.clientSecret, what: "client secret", setting: secretSetting(auth.clientSecret, "CLIENT_SECRET") }]
        : [
            { location: auth.password, what: "mailbox password", setting: secretSetting(auth.password, "MAILBOX_PASSWORD") },
            ...(auth.clientSecret ? [{ location: auth.clientSecret, what: "client secret", setting: secretSetting(auth.clientSecret, "CLIENT_SECRET") }] : []),
          ];
      const secrets: Array<LoadedSecret & { what: string; setting: string }> = [];
      for (const { location, what, setting } of wanted) {
        const item: VaultUse | undefined = location.kind === "keyVault" ? { vaultUrl: location.vaultUrl, name: location.name, setting, use: "secret" } : undefined;
        const loaded = await read(item, () => secretSourceFor(location, what, logger).load());
        if (!loaded) return outcome;
        if (item) outcome.vaultProof.push(`secret "${location.kind === "keyVault" ? location.name : ""}" (${what}) read`);
        secrets.push({ ...loaded, what, setting });
      }
      outcome.material = { method: auth.method, secrets };
      return outcome;
    }
    case "google-service-account": {
      const location = auth.key;
      const item: VaultUse | undefined = location.kind === "keyVault" ? { vaultUrl: location.vaultUrl, name: location.name, setting: "GOOGLE_KEY_NAME", use: "secret" } : undefined;
      const key = await read(item, () => serviceAccountKeySource(location, logger).load());
      if (key) {
        if (item) outcome.vaultProof.push(`secret "${item.name}" (Google key) read`);
        outcome.material = { method: "google-service-account", key };
      } else if (item && outcome.materialError) {
        outcome.vaultProof.push(`secret "${item.name}" read, but it is not a usable key (${keySetting(location)})`);
      }
      return outcome;
    }
    case "refresh-token": {
      // The stored refresh token is read (never redeemed here: redeeming rotates it, which is the
      // sender's job); the token step below proves it works.
      const location = auth.refreshToken;
      const item: VaultUse | undefined = location.kind === "keyVault" ? { vaultUrl: location.vaultUrl, name: location.name, setting: "REFRESH_TOKEN_NAME", use: "secret" } : undefined;
      const store = refreshTokenStoreFor(location);
      const stored = await read(item, () => store.read());
      if (stored) {
        if (item) outcome.vaultProof.push(`secret "${item.name}" (refresh token) read`);
        outcome.material = {
          method: "refresh-token",
          stored: { ...(stored.user ? { user: stored.user } : {}), ...(stored.rotatedAt ? { rotatedAt: stored.rotatedAt } : {}), ...(stored.authorizedAt ? { authorizedAt: stored.authorizedAt } : {}), where: store.where, setting: store.setting },
        };
      }
      return outcome;
    }
  }
}

function secretSetting(location: SecretLocation, valueSetting: string): string {
  return location.kind === "value" ? location.setting : `${valueSetting}_NAME`;
}
