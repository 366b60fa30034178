// CERT_SIGNING=vault for real: the certificate the local OAuth server trusts sits in the Key Vault
// double as NON-exportable (no secret value exists), the worker reads its public part through the
// certificates API and has the assertion signed by the keys API (@azure/keyvault-keys
// CryptographyClient, DefaultAzureCredential, all through the double's proxy); oidc-provider
// verifies the assertion against the registered certificate; the SMTP sink checks the token.
import assert from "node:assert/strict";
import { createHash, X509Certificate } from "node:crypto";
import { after, before, beforeEach, describe, it } from "node:test";
import type { QueueClient } from "@azure/storage-queue";
import { issueCertificate } from "../cli/local/devCertificates.js";
import { credentialSourceFor } from "../shared/auth/credentialSource.js";
import { loadSendConfig, loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { TokenProvider } from "../shared/token/tokenProvider.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";
import { capturingLogger, drain, readPoison, rejectionOf, useLocalStack, type CapturedLogger } from "./support/harness.js";

describe("CERT_SIGNING=vault: the client assertion is signed inside Key Vault", () => {
  const local = useLocalStack("qm-vault-sign-");
  let kv: KeyVaultDouble;
  let restoreEnv: () => void;
  let queue: QueueClient;
  let poison: QueueClient;
  /** Every log line captured here: checked for secrets at the end. */
  const allLogs: CapturedLogger[] = [];
  const errorsSeen: unknown[] = [];

  function newLogger(): CapturedLogger {
    const logger = capturingLogger();
    allLogs.push(logger);
    return logger;
  }

  /** The worker's settings: the certificate by name in the vault, signed there. */
  function vaultEnv(extra: Record<string, string> = {}): Record<string, string> {
    return { ...local.stack.env, CERT_PATH: "", KEY_VAULT_URL: kv.vaultUrl, CERT_NAME: "smtp-hsm", CERT_SIGNING: "vault", ...extra };
  }

  function assertionHeaders(logger: CapturedLogger): Array<Record<string, string>> {
    return logger.lines.map((line) => JSON.parse(line) as { event: string; header?: Record<string, string> }).filter((r) => r.event === "assertion.created").map((r) => r.header ?? {});
  }

  const thumbprint = (algorithm: "sha256" | "sha1") => createHash(algorithm).update(new X509Certificate(local.stack.clientCertificate.certificatePem).raw).digest("base64url");

  before(async () => {
    kv = await startKeyVaultDouble();
    kv.putCertificate("smtp-hsm", { ...local.stack.clientCertificate, exportable: false });
    // Before any Azure SDK client of this process exists: the SDK reads NO_PROXY once.
    restoreEnv = kv.applyEnv();
    ({ queue, poison } = await openMailQueues(loadStorageConfig(local.stack.env)));
  });

  after(async () => {
    restoreEnv?.();
    await kv?.close();
  });

  beforeEach(async () => {
    await Promise.all([queue.clearMessages(), poison.clearMessages()]);
    local.stack.smtp.messages.length = 0;
    local.stack.smtp.resetStats();
    local.stack.oauth.resetStats();
    kv.resetCounts();
  });

  it("PS256: several messages, one token request, one sign call, and the secret is never read", async () => {
    for (let i = 0; i < 5; i++) await enqueueEmail(queue, { to: `hsm${i}@example.test`, subject: `Vault-signed ${i}`, text: `Body ${i}` });
    const logger = newLogger();
    const result = await drain(vaultEnv(), logger);

    assert.deepEqual({ sent: result.sent, poisoned: result.poisoned, retried: result.retried }, { sent: 5, poisoned: 0, retried: 0 }, logger.lines.join("\n"));
    assert.deepEqual(local.stack.smtp.messages.map((m) => m.headers["subject"]?.[0]).sort(), [0, 1, 2, 3, 4].map((i) => `Vault-signed ${i}`));
    assert.deepEqual({ tokenRequests: local.stack.oauth.stats.tokenRequests, tokensIssued: local.stack.oauth.stats.tokensIssued }, { tokenRequests: 1, tokensIssued: 1 });
    assert.deepEqual(local.stack.oauth.stats.errors, []);
    // One sign per token request, with the current version's key.
    assert.equal(kv.counts.signs, 1);
    assert.deepEqual(kv.signRequests.map((s) => `${s.name} ${s.alg}`), ["smtp-hsm PS256"]);
    assert.deepEqual({ certificateGets: kv.counts.certificateGets, keyGets: kv.counts.keyGets, secretGets: kv.counts.secretGets }, { certificateGets: 1, keyGets: 1, secretGets: 0 });
    assert.deepEqual(kv.requests.filter((r) => r.path.startsWith("/secrets")), [], "no secret request at all");
    assert.deepEqual(assertionHeaders(logger), [{ alg: "PS256", typ: "JWT", "x5t#S256": thumbprint("sha256") }]);
    assert.equal((await queue.getProperties()).approximateMessagesCount, 0);
    assert.equal((await readPoison(result.mailer)).length, 0);
  });

  it("RS256 (ASSERTION_ALG=RS256): signed RS256 in the vault, header with both thumbprints, accepted", async () => {
    for (let i = 0; i < 2; i++) await enqueueEmail(queue, { to: "legacy@example.test", subject: `RS256 ${i}`, text: "x" });
    const logger = newLogger();
    const result = await drain(vaultEnv({ ASSERTION_ALG: "RS256" }), logger);

    assert.equal(result.sent, 2, logger.lines.join("\n"));
    assert.equal(local.stack.smtp.messages.length, 2);
    assert.equal(local.stack.oauth.stats.tokensIssued, 1);
    assert.deepEqual(kv.signRequests.map((s) => s.alg), ["RS256"]);
    assert.equal(kv.counts.signs, local.stack.oauth.stats.tokenRequests);
    assert.equal(kv.counts.secretGets, 0);
    assert.deepEqual(assertionHeaders(logger), [{ alg: "RS256", typ: "JWT", "x5t#S256": thumbprint("sha256"), x5t: thumbprint("sha1") }]);
  });

  it("sign refused (403): KEYVAULT_ACCESS_DENIED naming Key Vault Crypto User opens the circuit, nothing is poisoned, the message goes out after", { timeout: 60_000 }, async () => {
    await enqueueEmail(queue, { to: "denied@example.test", subject: "Waits for the role", text: "x" });
    kv.failNext(1, 403, undefined, undefined, "signs");
    const logger = newLogger();
    const result = await drain(vaultEnv(), logger);

    const opened = logger.lines.map((line) => JSON.parse(line) as { event: string; error?: { code: string; kind: string; message: string; hint?: string } }).filter((r) => r.event === "circuit.open");
    assert.equal(opened.length, 1, logger.lines.join("\n"));
    const error = opened[0]!.error;
    assert.deepEqual({ code: error?.code, kind: error?.kind }, { code: "KEYVAULT_ACCESS_DENIED", kind: "config" });
    assert.match(error?.hint ?? "", /Key Vault Crypto User/);
    assert.match(error?.hint ?? "", /CERT_SIGNING=vault/);
    assert.match(error?.message ?? "", /refused to sign with key "smtp-hsm" \(403\).*does not have keys sign permission/);
    // The circuit's probe (after RETRY_BASE_SECONDS) finds the permission back and sends the message.
    assert.deepEqual({ sent: result.sent, poisoned: result.poisoned, waited: result.waited }, { sent: 1, poisoned: 0, waited: 1 });
    assert.deepEqual(local.stack.smtp.messages.map((m) => m.headers["subject"]?.[0]), ["Waits for the role"]);
    assert.equal(kv.counts.signs, 2, "the refused sign, then the one that worked");
    assert.equal(local.stack.oauth.stats.tokenRequests, 1, "no token request without an assertion");
    assert.equal((await readPoison(result.mailer)).length, 0);
    assert.equal((await queue.getProperties()).approximateMessagesCount, 0);
  });

  it("picks up a renewed certificate after the token endpoint rejects the old assertion", async () => {
    const stranger = issueCertificate({ commonName: "not (yet) registered on the app" });
    const oldVersion = kv.putCertificate("rotating", { ...stranger, exportable: false });
    const logger = newLogger();
    const tokens = new TokenProvider({ logger, credential: credentialSourceFor(loadSendConfig(vaultEnv({ CERT_NAME: "rotating" })).auth, logger) });

    const rejected = await rejectionOf(tokens.getToken());
    errorsSeen.push(rejected);
    assert.deepEqual({ code: rejected.code, kind: rejected.kind }, { code: "TOKEN_AADSTS700027", kind: "config" });

    // The renewal lands in the vault; only the rejection (not the 30-minute check) makes us look.
    const newVersion = kv.putCertificate("rotating", { ...local.stack.clientCertificate, exportable: false });
    const token = await tokens.getToken();
    assert.equal((await local.stack.oauth.verifyAccessToken(token.token)).ok, true);
    assert.deepEqual(kv.signRequests.map((s) => s.version), [oldVersion, newVersion], "each assertion signed with its own version's key");
    assert.deepEqual({ certificateGets: kv.counts.certificateGets, keyGets: kv.counts.keyGets, secretGets: kv.counts.secretGets }, { certificateGets: 2, keyGets: 2, secretGets: 0 });
    assert.equal(kv.counts.signs, local.stack.oauth.stats.tokenRequests, "one sign per token request");
    const loaded = logger.lines.filter((line) => line.includes('"certificate.loaded"'));
    assert.deepEqual(loaded.map((line) => (JSON.parse(line) as { source: string }).source.split("/").pop()), [oldVersion, newVersion]);

    // Cached: the next token comes from memory, no sign, no vault read.
    await tokens.getToken();
    assert.deepEqual({ signs: kv.counts.signs, certificateGets: kv.counts.certificateGets }, { signs: 2, certificateGets: 2 });
  });

  it("a disabled certificate, a key disabled after it was loaded, or a pending certificate are config errors that say so", async () => {
    const logger = newLogger();
    const credentialFor = (name: string) => credentialSourceFor(loadSendConfig(vaultEnv({ CERT_NAME: name })).auth, logger);

    kv.putCertificate("switched-off", { ...local.stack.clientCertificate, exportable: false, enabled: false });
    const disabled = await rejectionOf(credentialFor("switched-off").tokenRequest());
    assert.deepEqual({ code: disabled.code, kind: disabled.kind }, { code: "KEYVAULT_CERT_DISABLED", kind: "config" });

    kv.putCertificate("turned-off-later", { ...local.stack.clientCertificate, exportable: false });
    const credential = credentialFor("turned-off-later");
    await credential.tokenRequest();
    kv.setCertificateEnabled("turned-off-later", false);
    const keyDisabled = await rejectionOf(credential.tokenRequest());
    errorsSeen.push(keyDisabled);
    assert.deepEqual({ code: keyDisabled.code, kind: keyDisabled.kind }, { code: "KEYVAULT_KEY_DISABLED", kind: "config" }, "not mistaken for a missing role");
    assert.match(keyDisabled.hint ?? "", /Enable the certificate/);

    kv.putCertificate("awaiting-ca", { ...issueCertificate({ commonName: "pending" }), exportable: false, pending: true });
    const pending = await rejectionOf(credentialFor("awaiting-ca").tokenRequest());
    assert.deepEqual({ code: pending.code, kind: pending.kind }, { code: "KEYVAULT_CERT_PENDING", kind: "config" });
    assert.equal(kv.counts.secretGets, 0);
  });

  it("leaves no assertion, token, signature or key material in logs or errors", () => {
    const lines = allLogs.flatMap((l) => l.lines);
    const text = lines.join("\n") + JSON.stringify(errorsSeen);
    assert.ok(lines.some((line) => line.includes('"assertion.created"') && line.includes('"jti"')), "the assertion's claims are logged");
    assert.ok(lines.some((line) => line.includes('"signing":"vault"')), "the vault-signing certificate load is logged");
    assert.doesNotMatch(text, /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\./, "no JWT (assertion or access token)");
    assert.doesNotMatch(text, /PRIVATE KEY/);
    assert.doesNotMatch(text, /dXNlcj/, "no XOAUTH2 initial response");
    assert.ok(!text.includes(kv.clientSecret), "no Key Vault client secret");
    assert.ok(!text.includes(local.stack.clientCertificate.privateKeyPem.split("\n")[1] ?? "never"), "no key material");
  });
});
