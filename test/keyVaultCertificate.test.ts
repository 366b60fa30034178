// The Key Vault certificate source through the real Azure SDK clients and DefaultAzureCredential,
// against the HTTPS Key Vault double: what is read when, renewals, and setup errors by code.
import assert from "node:assert/strict";
import { after, before, beforeEach, describe, it } from "node:test";
import { issueCertificate } from "../cli/local/devCertificates.js";
import { keyVaultCertificateSource } from "../shared/auth/certificateSource.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";
import { capturingLogger, rejectionOf } from "./support/harness.js";

let kv: KeyVaultDouble;
let restoreEnv: () => void;
const first = issueCertificate({ commonName: "smtp sender v1" });
const renewed = issueCertificate({ commonName: "smtp sender v2" });

before(async () => {
  kv = await startKeyVaultDouble();
  restoreEnv = kv.applyEnv();
});
after(async () => {
  restoreEnv();
  await kv.close();
});
beforeEach(() => kv.resetCounts());

describe("Key Vault certificate source", () => {
  it("reads certificate and key once, checks for a renewal with one metadata read, and picks the new version up", async () => {
    kv.putCertificate("renewing", { ...first });
    const logger = capturingLogger();
    const source = keyVaultCertificateSource(kv.vaultUrl, "renewing", logger, { renewalCheckSeconds: 0 });

    const v1 = await source.load();
    assert.equal(v1.certificate.subject, "CN=smtp sender v1");
    assert.deepEqual({ certificates: kv.counts.certificateGets, secrets: kv.counts.secretGets }, { certificates: 1, secrets: 1 });

    assert.equal(await source.load(), v1, "same version: cached key reused");
    assert.deepEqual({ certificates: kv.counts.certificateGets, secrets: kv.counts.secretGets }, { certificates: 2, secrets: 1 });

    kv.putCertificate("renewing", { ...renewed });
    const v2 = await source.load();
    assert.equal(v2.certificate.subject, "CN=smtp sender v2");
    assert.deepEqual({ certificates: kv.counts.certificateGets, secrets: kv.counts.secretGets }, { certificates: 3, secrets: 2 });
    assert.ok(logger.lines.some((line) => line.includes('"certificate.renewed"')));
  });

  it("within the check interval, loads cost no request at all", async () => {
    kv.putCertificate("steady", { ...first });
    const source = keyVaultCertificateSource(kv.vaultUrl, "steady", capturingLogger());
    const loaded = await Promise.all(Array.from({ length: 20 }, () => source.load()));
    assert.ok(loaded.every((s) => s === loaded[0]));
    await source.load();
    assert.deepEqual({ certificates: kv.counts.certificateGets, secrets: kv.counts.secretGets }, { certificates: 1, secrets: 1 });
    source.invalidate();
    await source.load();
    assert.deepEqual({ certificates: kv.counts.certificateGets, secrets: kv.counts.secretGets }, { certificates: 2, secrets: 2 }, "invalidate() rereads");
  });

  it("names the setup problem: missing certificate, non-exportable key, disabled, access denied", async () => {
    const logger = capturingLogger();
    const missing = await rejectionOf(keyVaultCertificateSource(kv.vaultUrl, "nope", logger).load());
    assert.deepEqual({ code: missing.code, kind: missing.kind }, { code: "KEYVAULT_NOT_FOUND", kind: "config" });

    kv.putCertificate("locked", { ...first, exportable: false });
    const locked = await rejectionOf(keyVaultCertificateSource(kv.vaultUrl, "locked", logger).load());
    assert.equal(locked.code, "KEYVAULT_NOT_FOUND");
    assert.match(locked.message, /exportable/);

    kv.putCertificate("off", { ...first, enabled: false });
    assert.equal((await rejectionOf(keyVaultCertificateSource(kv.vaultUrl, "off", logger).load())).code, "KEYVAULT_CERT_DISABLED");

    kv.putCertificate("guarded", { ...first });
    kv.failNext(1, 403);
    const denied = await rejectionOf(keyVaultCertificateSource(kv.vaultUrl, "guarded", logger).load());
    assert.deepEqual({ code: denied.code, kind: denied.kind }, { code: "KEYVAULT_ACCESS_DENIED", kind: "config" });
    assert.match(denied.hint ?? "", /Key Vault Certificate User/);
  });
});
