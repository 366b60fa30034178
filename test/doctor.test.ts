// `queue-mailer doctor` against real servers on loopback: Azurite, the local OAuth server
// (oidc-provider answering with Entra's AADSTS bodies), the Key Vault double reached by the real
// Azure SDK, the SMTP sink answering like Exchange, and a DNS server. Each failure is produced by
// really breaking the setup (a wrong client id, an unregistered certificate, a clock an hour ahead,
// a refused role, a 535 at AUTH…) and the test asserts the failing step, its code, and that the fix
// names the right command or setting with the user's ids. The healthy stack and one failure run
// through the real CLI; the rest in-process to keep the file fast. No output may carry a token,
// secret, password or key, for each auth method served here (Google: test/doctorGoogle.test.ts).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomBytes, randomUUID, X509Certificate, createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import { doctorCommand } from "../cli/doctorCommand.js";
import { startDnsServer, type DnsServer } from "../cli/local/dnsServer.js";
import { ensureCertificateAuthority, issueCertificate } from "../cli/local/devCertificates.js";
import { LOCAL_CLIENT_ID, LOCAL_MAILBOX, LOCAL_PUBLIC_CLIENT_ID, LOCAL_SECRET_CLIENT_ID, LOCAL_TENANT_ID } from "../cli/local/localStack.js";
import { startOAuthServer } from "../cli/local/oauthServer.js";
import { startSmtpSink, type SmtpFault, type SmtpFaultAction, type SmtpSink } from "../cli/local/smtpSink.js";
import { loadStorageConfig } from "../shared/config.js";
import type { DoctorReport } from "../shared/doctor/check.js";
import { adviceFor } from "../shared/doctor/fixes.js";
import { SENDER_TABLES } from "../shared/doctor/storageStep.js";
import { measureClockOffset } from "../shared/doctor/tokenStep.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { openMailQueues, type MailQueues } from "../shared/queue/mailQueue.js";
import { circuitBreaker } from "../shared/send/circuitBreaker.js";
import { openContainer, openTable } from "../shared/storage/storageClients.js";
import { cliEntry, spawnCli } from "./support/cli.js";
import { assertFails, doctorRunner, JWT } from "./support/doctorRun.js";
import { capturingLogger, drain, useLocalStack, within } from "./support/harness.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";

const EXCHANGE_535_573 = "5.7.3 Authentication unsuccessful [SN4PR0501CA0054.namprd05.prod.outlook.com 2026-11-30T06:00:00.000Z 08DCF0E1C2B3A4F5]";
const EXCHANGE_535_57139 = "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information. [SN4PR0501CA0054.namprd05.prod.outlook.com]";
const DOMAIN = LOCAL_MAILBOX.split("@")[1]!;

let fault: ((ctx: SmtpFault) => SmtpFaultAction | undefined) | undefined;
/** Every text the doctor produced in this file, and every secret it must not contain. */
const outputs: string[] = [];
const secrets: string[] = [];

const doctor = doctorRunner(outputs);

function assertNoSecrets(texts: string[], values: string[]): void {
  for (const text of texts) {
    assert.doesNotMatch(text, JWT, "no token or assertion in the output");
    for (const value of values) assert.ok(!text.includes(value), `a secret value appears in the output:\n${text.slice(0, 400)}`);
  }
}

/** A line of a PEM's base64 body: enough to recognise the key anywhere. */
const pemBodyLine = (pem: string) => pem.split("\n").find((line) => /^[A-Za-z0-9+/]{60,}$/.test(line)) ?? pem;

describe("queue-mailer doctor", () => {
  const local = useLocalStack("qm-doctor-", { fault: (ctx) => fault?.(ctx) });
  let kv: KeyVaultDouble;
  let restoreEnv: (() => void) | undefined;
  let dns: DnsServer;
  let queues: MailQueues;
  const clientSecret = randomBytes(24).toString("base64url");
  const mailboxPassword = `pw-${randomBytes(12).toString("base64url")}`;
  const extraSinks: SmtpSink[] = [];

  /** Settings of the stack with the certificate in the Key Vault double. */
  const keyVaultEnv = (name = "smtp-cert") => ({ ...local.stack.env, ...kv.env, CERT_PATH: "", KEY_VAULT_URL: kv.vaultUrl, CERT_NAME: name });
  const secretEnv = () => ({ ...local.stack.env, AUTH_METHOD: "secret", CLIENT_ID: LOCAL_SECRET_CLIENT_ID, CLIENT_SECRET: clientSecret, CLIENT_AUTH: "post", CERT_PATH: "" });
  const passwordEnv = () => ({ ...local.stack.env, AUTH_METHOD: "password", CLIENT_ID: LOCAL_PUBLIC_CLIENT_ID, TOKEN_SCOPE: local.stack.oauth.delegatedScope, MAILBOX_PASSWORD: mailboxPassword, CERT_PATH: "" });

  function healthyDns(): void {
    dns.clear();
    dns.set(DOMAIN, { TXT: ["v=spf1 include:spf.protection.outlook.com -all", "google-site-verification=abc"] });
    for (const selector of ["selector1", "selector2"]) {
      const target = `${selector}-contoso-test._domainkey.contoso.onmicrosoft.test`;
      dns.set(`${selector}._domainkey.${DOMAIN}`, { CNAME: target });
      // A DKIM key is longer than 255 bytes: published as several character-strings.
      dns.set(target, { TXT: [`v=DKIM1; k=rsa; p=${randomBytes(270).toString("base64")}`] });
    }
    dns.set(`_dmarc.${DOMAIN}`, { TXT: ["v=DMARC1; p=quarantine; rua=mailto:dmarc@contoso.test"] });
  }

  before(async () => {
    kv = await startKeyVaultDouble();
    // Before any Azure SDK client of this process is built: NO_PROXY is read once per process.
    restoreEnv = kv.applyEnv();
    kv.putCertificate("smtp-cert", { ...local.stack.clientCertificate });
    kv.putSecret("client-secret", clientSecret);
    dns = await startDnsServer();
    // The storage a deployment has (infra/main.bicep creates it all).
    const storage = loadStorageConfig(local.stack.env);
    queues = await openMailQueues(storage);
    await Promise.all(SENDER_TABLES.map((table) => openTable(storage, table)));
    await (await openContainer(storage, storage.attachmentContainer)).createIfNotExists();
    // The app registrations and the user of the other methods, with values this file knows.
    local.stack.oauth.registerClient({ clientId: LOCAL_SECRET_CLIENT_ID, auth: "client_secret_post", secret: clientSecret });
    local.stack.oauth.registerUser({ username: LOCAL_MAILBOX, password: mailboxPassword });
    secrets.push(clientSecret, mailboxPassword, pemBodyLine(local.stack.clientCertificate.privateKeyPem));
  });

  after(async () => {
    restoreEnv?.();
    await Promise.allSettled([kv?.close(), dns?.close(), ...extraSinks.map((s) => s.close())]);
  });

  beforeEach(async () => {
    fault = undefined;
    healthyDns();
    await Promise.all([queues.queue.clearMessages(), queues.poison.clearMessages()]);
    local.stack.smtp.messages.length = 0;
    local.stack.smtp.resetStats();
    local.stack.oauth.resetStats();
    kv.resetCounts();
  });

  describe("a healthy stack", () => {
    it("the real CLI: every step ✓ (certificate in Key Vault, --send-test, --dns), exit 0, and the queue untouched", async () => {
      const { id: queuedId } = await enqueueEmail(queues.queue, { to: "waiting@example.test", subject: "stays in the queue", text: "x" });
      const started = Date.now();
      const result = await spawnCli(["doctor", "--send-test", "someone@example.test", "--dns"], { env: { ...keyVaultEnv(), DNS_SERVERS: dns.address }, timeoutMs: 60_000 });
      const elapsed = Date.now() - started;
      outputs.push(result.stdout, result.stderr);
      assert.equal(result.status, 0, `${result.stdout}\n${result.stderr}`);
      const lines = result.stdout.split("\n").filter((line) => /^[✓✗!–] /.test(line));
      assert.deepEqual(lines.map((line) => line.split(/\s+/)[1]), ["settings", "storage", "keyvault", "credential", "token", "token-contents", "transport", "send-test", "dns-spf", "dns-dkim", "dns-dmarc"]);
      for (const line of lines) assert.ok(line.startsWith("✓ "), `every step ✓: ${line}`);
      assert.match(result.stdout, /Every step passed\./);

      // The test message arrived once, from the mailbox, through the sink's token check.
      const sent = local.stack.smtp.messages.filter((m) => m.rcptTo.includes("someone@example.test"));
      assert.equal(sent.length, 1, "one test message");
      assert.equal(sent[0]?.authUser, LOCAL_MAILBOX);
      // Read through the real SDK: the certificate and its key, once each.
      assert.ok(kv.counts.certificateGets >= 1 && kv.counts.secretGets >= 1, JSON.stringify(kv.counts));
      // One token for the doctor's own steps, one for the sender of the test message.
      assert.equal(local.stack.oauth.stats.tokenRequests, 2, "token requests");
      // It took nothing from the queue: the waiting message is still there, never dequeued.
      const peeked = (await queues.queue.peekMessages({ numberOfMessages: 32 })).peekedMessageItems;
      assert.equal(peeked.length, 1);
      assert.equal(peeked[0]?.dequeueCount, 0);
      assert.ok(Buffer.from(peeked[0]?.messageText ?? "", "base64").toString("utf8").includes(queuedId) || (peeked[0]?.messageText ?? "").includes(queuedId));
      assertNoSecrets([result.stdout, result.stderr], secrets);
      console.log(`# doctor CLI (healthy, Key Vault, --send-test, --dns): ${elapsed} ms`);
    });

    it("--json: ok true and every check a pass, in the issue's field names", async () => {
      const run = await doctor({ ...keyVaultEnv(), DNS_SERVERS: dns.address }, { sendTest: "json@example.test", dns: true });
      const parsed = JSON.parse(run.json) as { ok: boolean; checks: Array<Record<string, unknown>> };
      assert.equal(parsed.ok, true, run.text);
      for (const check of parsed.checks) {
        assert.deepEqual(Object.keys(check), ["step", "status", "code", "message", "fix"]);
        assert.equal(check["status"], "pass", run.text);
      }
    });
  });

  describe("no token, secret, password or key in any output", () => {
    it("certificate (file and Key Vault): checklist, JSON and logs, passing and failing", async () => {
      const runs = [
        await doctor(local.stack.env, { sendTest: "a@example.test" }),
        await doctor(keyVaultEnv()),
        await doctor({ ...local.stack.env, CLIENT_ID: randomUUID() }),
      ];
      assert.equal(runs[0]!.report.ok, true, runs[0]!.text);
      assert.ok(runs[0]!.logger.lines.some((line) => line.includes('"token.acquired"')), "the logs were captured");
      assertNoSecrets(runs.flatMap((r) => [r.text, r.json, ...r.logger.lines]), secrets);
    });

    it("secret (setting and Key Vault secret): passes, and a wrong secret is named without being shown", async () => {
      const fromSetting = await doctor(secretEnv(), { sendTest: "b@example.test" });
      assert.equal(fromSetting.report.ok, true, fromSetting.text);
      assert.match(fromSetting.check("credential").message, /client secret present \(CLIENT_SECRET\)/);
      const fromVault = await doctor({ ...secretEnv(), ...kv.env, CLIENT_SECRET: "", CLIENT_SECRET_NAME: "client-secret", KEY_VAULT_URL: kv.vaultUrl });
      assert.equal(fromVault.report.ok, true, fromVault.text);
      assert.equal(fromVault.check("keyvault").status, "pass");
      const wrongSecret = `wrong-${randomBytes(16).toString("base64url")}`;
      secrets.push(wrongSecret);
      const wrong = await doctor({ ...secretEnv(), CLIENT_SECRET: wrongSecret });
      const check = assertFails(wrong, "token", "TOKEN_AADSTS7000215");
      assert.match(check.fix ?? "", /Value \(shown once.*not its "Secret ID"\)/);
      assert.match(check.fix ?? "", new RegExp(`az ad app credential reset --id ${LOCAL_SECRET_CLIENT_ID}`));
      assertNoSecrets([fromSetting, fromVault, wrong].flatMap((r) => [r.text, r.json, ...r.logger.lines]), secrets);
    });

    it("password: passes with the deprecation warning; a wrong password is AADSTS50126 and never shown", async () => {
      const healthy = await doctor(passwordEnv(), { sendTest: "c@example.test" });
      assert.equal(healthy.report.ok, true, healthy.text);
      assert.deepEqual({ status: healthy.check("settings").status, code: healthy.check("settings").code }, { status: "warn", code: "AUTH_PASSWORD_DEPRECATED" });
      assert.match(healthy.check("token-contents").message, /scp SMTP\.Send for mailer@contoso\.test/);
      const wrongPassword = `bad-${randomBytes(12).toString("base64url")}`;
      secrets.push(wrongPassword);
      const wrong = await doctor({ ...passwordEnv(), MAILBOX_PASSWORD: wrongPassword });
      const check = assertFails(wrong, "token", "TOKEN_AADSTS50126");
      assert.match(check.fix ?? "", /MAILBOX_PASSWORD/);
      assertNoSecrets([healthy, wrong].flatMap((r) => [r.text, r.json, ...r.logger.lines]), secrets);
    });
  });

  describe("step settings", () => {
    it("names every missing setting; storage still runs, the rest says why it did not", async () => {
      const run = await doctor({ ...local.stack.env, CLIENT_ID: "", SMTP_USER: "", MAIL_FROM: "", DNS_SERVERS: "dns.example" }, { dns: true });
      const check = assertFails(run, "settings", "CONFIG_INVALID");
      for (const setting of ["CLIENT_ID", "SMTP_USER", "DNS_SERVERS"]) assert.match(check.fix ?? "", new RegExp(`^${setting}: `, "m"));
      assert.equal(run.check("storage").status, "pass", "storage is independent of the credential settings");
      for (const step of ["keyvault", "credential", "token", "transport", "dns-spf"] as const) assert.equal(run.check(step).status, "skip");
    });

    it("unusable arguments exit 2 before anything runs", async () => {
      const settings = () => {
        throw new Error("settings must not be read for unusable arguments");
      };
      assert.equal(await doctorCommand(["--bogus"], settings), 2);
      assert.equal(await doctorCommand(["--send-test"], settings), 2);
      assert.equal(await doctorCommand(["--send-test", "not an address"], settings), 2);
    });
  });

  describe("step storage", () => {
    it("a wrong account key is refused, a storage account that does not answer is unavailable; neither stops the credential steps", async () => {
      const connection = local.stack.env["AzureWebJobsStorage"]!;
      const wrongKey = connection.replace(/AccountKey=[^;]+/, `AccountKey=${randomBytes(64).toString("base64")}`);
      assert.notEqual(wrongKey, connection, "the stack uses an explicit connection string");
      const denied = await doctor({ ...local.stack.env, AzureWebJobsStorage: wrongKey });
      const check = assertFails(denied, "storage", "STORAGE_ACCESS_DENIED");
      assert.match(check.fix ?? "", /account key is wrong or was rotated/);
      assert.equal(denied.check("token").status, "pass", "the next independent steps still ran");
      const closed = connection.replace(/127\.0\.0\.1:\d+/g, "127.0.0.1:9");
      const unavailable = assertFails(await doctor({ ...local.stack.env, AzureWebJobsStorage: closed }), "storage", "STORAGE_UNAVAILABLE");
      assert.match(unavailable.fix ?? "", /is Azurite running\?/);
    });

    it("missing tables and container are a warning that names what creates them, and nothing is created", async () => {
      const run = await doctor({ ...local.stack.env, ATTACHMENT_CONTAINER: "not-created-yet" });
      const check = run.check("storage");
      assert.deepEqual({ status: check.status, code: check.code }, { status: "warn", code: "STORAGE_NOT_FOUND" });
      assert.match(check.message, /not there yet: container not-created-yet/);
      assert.match(check.fix ?? "", /Container: created by infra\/main\.bicep/);
      assert.equal(run.report.ok, true, "a warning is not a failure");
      const storage = loadStorageConfig({ ...local.stack.env, ATTACHMENT_CONTAINER: "not-created-yet" });
      assert.equal(await (await openContainer(storage, storage.attachmentContainer)).exists(), false, "the doctor created nothing");
    });
  });

  describe("step keyvault: 403 names the identity and the role it lacks", () => {
    it("certificate read: Key Vault Certificate User, for the identity Key Vault named", async () => {
      kv.failNext(1, 403);
      const run = await doctor(keyVaultEnv());
      const check = assertFails(run, "keyvault", "KEYVAULT_ACCESS_DENIED");
      assert.match(check.fix ?? "", new RegExp(`app id ${kv.clientId}, object id [0-9a-f-]{36}`));
      assert.match(check.fix ?? "", /az role assignment create --role "Key Vault Certificate User" --assignee-object-id [0-9a-f-]{36} --assignee-principal-type ServicePrincipal --scope \$\(az keyvault show --name [\w-]+ --query id -o tsv\)/);
      assert.equal(run.check("credential").status, "skip");
      assert.equal(run.check("token").status, "skip");
      assert.equal(local.stack.oauth.stats.tokenRequests, 0, "no token request without a credential");
      assert.equal(run.check("storage").status, "pass", "independent steps still ran");
    });

    it("client secret read: Key Vault Secrets User", async () => {
      kv.failNext(1, 403);
      const run = await doctor({ ...secretEnv(), ...kv.env, CLIENT_SECRET: "", CLIENT_SECRET_NAME: "client-secret", KEY_VAULT_URL: kv.vaultUrl });
      const check = assertFails(run, "keyvault", "KEYVAULT_ACCESS_DENIED");
      assert.match(check.fix ?? "", /--role "Key Vault Secrets User"/);
      assert.doesNotMatch(check.fix ?? "", /Certificate User/);
    });

    it("CERT_SIGNING=vault: the test signature is refused: Key Vault Crypto User", async () => {
      kv.failNext(1, 403, undefined, undefined, "signs");
      const run = await doctor({ ...keyVaultEnv(), CERT_SIGNING: "vault" });
      const check = assertFails(run, "keyvault", "KEYVAULT_ACCESS_DENIED");
      assert.match(check.fix ?? "", /--role "Key Vault Crypto User"/);
      assert.equal(kv.signRequests.length, 0, "no signature was made");
    });
  });

  describe("step credential", () => {
    it("a certificate within EXPIRY_CRITICAL_DAYS fails, naming the days left and the renewal", async () => {
      const soon = issueCertificate({ commonName: "expiring sender", days: 3 });
      const path = join(local.workDir, "expiring.pem");
      writeFileSync(path, soon.privateKeyPem + soon.certificatePem);
      secrets.push(pemBodyLine(soon.privateKeyPem));
      const run = await doctor({ ...local.stack.env, CERT_PATH: path, EXPIRY_CRITICAL_DAYS: "7" });
      const check = assertFails(run, "credential", "CERT_EXPIRING");
      assert.match(check.message, /\d day\(s\) left, within EXPIRY_CRITICAL_DAYS \(7\)/);
      assert.match(check.fix ?? "", /upload the new public part to the app registration/);
    });
  });

  describe("step token: the provider's refusal mapped to the setup step", () => {
    it("AADSTS700016: CLIENT_ID not in the tenant, both ids named", async () => {
      const clientId = randomUUID();
      const check = assertFails(await doctor({ ...local.stack.env, CLIENT_ID: clientId }), "token", "TOKEN_AADSTS700016");
      assert.match(check.fix ?? "", new RegExp(`CLIENT_ID ${clientId} in tenant TENANT_ID ${LOCAL_TENANT_ID}`));
      assert.match(check.fix ?? "", /Overview page/);
    });

    it("AADSTS90002: the tenant (Entra's body, injected) names TENANT_ID", async () => {
      local.stack.oauth.failNext(1, 400, {
        error: "invalid_request",
        error_description: `AADSTS90002: Tenant 'not-a-tenant' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Trace ID: ${randomUUID()} Correlation ID: ${randomUUID()} Timestamp: 2026-11-30 06:00:00Z`,
        error_codes: [90002],
      });
      const check = assertFails(await doctor(local.stack.env), "token", "TOKEN_AADSTS90002");
      assert.match(check.fix ?? "", /set TENANT_ID to the "Directory \(tenant\) ID"/);
    });

    it("AADSTS700027: a certificate the app registration does not know; the fix gives its thumbprint", async () => {
      const stranger = issueCertificate({ commonName: "not uploaded" });
      const path = join(local.workDir, "stranger.pem");
      writeFileSync(path, stranger.privateKeyPem + stranger.certificatePem);
      secrets.push(pemBodyLine(stranger.privateKeyPem));
      const thumbprint = createHash("sha1").update(new X509Certificate(stranger.certificatePem).raw).digest("hex").toUpperCase();
      const check = assertFails(await doctor({ ...local.stack.env, CERT_PATH: path }), "token", "TOKEN_AADSTS700027");
      assert.match(check.fix ?? "", new RegExp(`thumbprint ${thumbprint}`));
      assert.match(check.fix ?? "", /Certificates & secrets > Certificates > Upload certificate/);
    });

    it("AADSTS7000222: an expired client secret", async () => {
      const expiredId = randomUUID();
      const expiredSecret = randomBytes(24).toString("base64url");
      secrets.push(expiredSecret);
      local.stack.oauth.registerClient({ clientId: expiredId, auth: "client_secret_post", secret: expiredSecret, secretExpiresAt: new Date(Date.now() - 86_400_000) });
      const check = assertFails(await doctor({ ...secretEnv(), CLIENT_ID: expiredId, CLIENT_SECRET: expiredSecret }), "token", "TOKEN_AADSTS7000222");
      assert.match(check.fix ?? "", new RegExp(`az ad app credential reset --id ${expiredId} --append`));
    });

    it("AADSTS65001: a delegated permission nobody consented; the fix is the admin-consent step", async () => {
      const check = assertFails(await doctor({ ...passwordEnv(), TOKEN_SCOPE: "https://outlook.office365.com/Mail.Read" }), "token", "TOKEN_AADSTS65001");
      assert.match(check.fix ?? "", /Delegated permissions > SMTP\.Send; then "Grant admin consent/);
    });

    it("AADSTS500011 and 1002012: TOKEN_SCOPE names a resource that is not there, or lacks /.default", async () => {
      const missing = assertFails(await doctor({ ...local.stack.env, TOKEN_SCOPE: "https://graph.microsoft.com/.default" }), "token", "TOKEN_AADSTS500011");
      assert.match(missing.fix ?? "", /TOKEN_SCOPE \(https:\/\/graph\.microsoft\.com\/\.default\)/);
      const noDefault = assertFails(await doctor({ ...local.stack.env, TOKEN_SCOPE: "https://outlook.office365.com/SMTP.SendAsApp" }), "token", "TOKEN_AADSTS1002012");
      assert.match(noDefault.fix ?? "", /must be the resource followed by \/\.default/);
    });

    it("unreachable endpoint, and a proxy's page instead of an OAuth answer", async () => {
      const closed = await startOAuthServer({});
      const deadUrl = closed.tokenUrl;
      await closed.close();
      const unreachable = assertFails(await doctor({ ...local.stack.env, TOKEN_URL: deadUrl }), "token", "TOKEN_UNREACHABLE");
      assert.match(unreachable.fix ?? "", /may open HTTPS connections to 127\.0\.0\.1:\d+/);
      local.stack.oauth.failNext(1, 403, "<html><body><h1>Access denied</h1>Blocked by the corporate proxy.</body></html>");
      const proxied = assertFails(await doctor(local.stack.env), "token", "TOKEN_HTTP_403");
      assert.match(proxied.fix ?? "", /a proxy, firewall or gateway page/);
    });

    it("the real CLI, a clock an hour ahead: AADSTS700024 with the measured offset", async () => {
      // The CLI on a shifted clock (test/support/shiftClock.ts): its assertions start an hour from now.
      const [node = process.execPath, tsxFlag, tsx, main] = cliEntry;
      const ahead = new Date(Date.now() + 3_600_000).toISOString();
      const child = spawn(node, [tsxFlag!, tsx!, "--import", import.meta.resolve("./support/shiftClock.ts"), main!, "doctor", "--json"], {
        env: { PATH: process.env["PATH"] ?? "", ...local.stack.env, QM_FAKE_NOW: ahead, NODE_EXTRA_CA_CERTS: local.stack.caPath },
        stdio: ["ignore", "pipe", "pipe"],
      });
      let stdout = "";
      child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
      child.stderr.resume();
      const status = await within(new Promise<number | null>((resolve) => child.once("close", resolve)), 60_000, "the doctor CLI to exit");
      outputs.push(stdout);
      assert.equal(status, 1, stdout);
      const report = JSON.parse(stdout) as DoctorReport;
      const token = report.checks.find((c) => c.step === "token");
      assert.deepEqual({ status: token?.status, code: token?.code }, { status: "fail", code: "TOKEN_AADSTS700024" }, stdout);
      const offset = Number(/clock is (\d+) s ahead of the token endpoint's/.exec(token?.fix ?? "")?.[1]);
      assert.ok(Math.abs(offset - 3600) <= 5, `measured offset ${offset} s, expected about 3600: ${token?.fix}`);
      assert.match(token?.fix ?? "", /NTP/);
    });

    it("the clock offset measurement reads the server's Date header", async () => {
      const offset = await measureClockOffset(local.stack.oauth.tokenUrl);
      assert.ok(offset !== undefined && Math.abs(offset) <= 1, `same machine, same clock: ${offset}`);
      assert.equal(await measureClockOffset(local.stack.oauth.tokenUrl, () => Date.now() - 120_000), -120);
    });
  });

  describe("step token-contents", () => {
    it("a token without SMTP.SendAsApp fails here, before any SMTP, with the portal path and admin consent", async () => {
      // An app registration whose admin consented IMAP only.
      const imapOnly = await startOAuthServer({ clientId: LOCAL_CLIENT_ID, tenantId: LOCAL_TENANT_ID, certificatePem: local.stack.clientCertificate.certificatePem, roles: ["IMAP.AccessAsApp"] });
      try {
        const run = await doctor({ ...local.stack.env, TOKEN_URL: imapOnly.tokenUrl });
        const check = assertFails(run, "token-contents", "TOKEN_ROLE_MISSING");
        assert.match(check.message, /no SMTP\.SendAsApp application permission \(roles\).*roles IMAP\.AccessAsApp/);
        assert.match(check.fix ?? "", /Office 365 Exchange Online > Application permissions > SMTP\.SendAsApp; then "Grant admin consent/);
        assert.match(check.fix ?? "", new RegExp(`az ad app permission admin-consent --id ${LOCAL_CLIENT_ID}`));
        assert.equal(run.check("transport").status, "skip");
        assert.equal(local.stack.smtp.stats.connections, 0, "no SMTP connection was made");
      } finally {
        await imapOnly.close();
      }
    });
  });

  describe("step transport: Exchange's replies at AUTH", () => {
    it("535 5.7.3: New-ServicePrincipal and Add-MailboxPermission with the app id, object id and mailbox", async () => {
      fault = (ctx) => (ctx.phase === "auth" ? { reply: 535, message: EXCHANGE_535_573 } : undefined);
      const run = await doctor(local.stack.env);
      const check = assertFails(run, "transport", "SMTP_AUTH_REJECTED");
      assert.match(check.message, /535 5\.7\.3 Authentication unsuccessful/);
      // Entra's app tokens carry the service principal's object id as oid; the fix uses it when there.
      const oid = /\boid ([0-9a-f-]{36})/.exec(run.check("token-contents").message)?.[1];
      const objectId = oid ?? "<object id of the enterprise application";
      assert.ok((check.fix ?? "").includes(`New-ServicePrincipal -AppId ${LOCAL_CLIENT_ID} -ObjectId ${objectId}`), check.fix ?? "");
      assert.ok((check.fix ?? "").includes(`Add-MailboxPermission -Identity "${LOCAL_MAILBOX}" -User ${objectId}`), check.fix ?? "");
      assert.match(check.fix ?? "", /-AccessRights FullAccess/);
      assert.equal(local.stack.smtp.stats.authFailures, 1);
    });

    it("535 5.7.139: SMTP AUTH disabled, Set-CASMailbox for the mailbox", async () => {
      fault = (ctx) => (ctx.phase === "auth" ? { reply: 535, message: EXCHANGE_535_57139 } : undefined);
      const check = assertFails(await doctor(local.stack.env), "transport", "SMTP_AUTH_DISABLED");
      assert.ok((check.fix ?? "").includes(`Set-CASMailbox -Identity "${LOCAL_MAILBOX}" -SmtpClientAuthenticationDisabled $false`), check.fix ?? "");
      assert.match(check.fix ?? "", /Security Defaults/);
    });

    it("STARTTLS: an untrusted certificate and a certificate for another name are told apart", async () => {
      const verifyToken = (user: string, token: string) => local.stack.oauth.verifyAccessToken(token, user);
      const selfSigned = issueCertificate({ commonName: "127.0.0.1", hosts: ["127.0.0.1"] });
      const otherName = issueCertificate({ commonName: "mail.other.test", hosts: ["mail.other.test"] }, ensureCertificateAuthority(".test-ca"));
      const untrustedSink = await startSmtpSink({ tls: { key: selfSigned.privateKeyPem, cert: selfSigned.certificatePem }, verifyToken });
      const misnamedSink = await startSmtpSink({ tls: { key: otherName.privateKeyPem, cert: otherName.certificatePem }, verifyToken });
      extraSinks.push(untrustedSink, misnamedSink);
      const untrusted = assertFails(await doctor({ ...local.stack.env, SMTP_PORT: String(untrustedSink.port) }), "transport", "SMTP_TLS_FAILED");
      assert.match(untrusted.fix ?? "", /not signed by a CA this machine trusts/);
      const misnamed = assertFails(await doctor({ ...local.stack.env, SMTP_PORT: String(misnamedSink.port) }), "transport", "SMTP_TLS_FAILED");
      assert.match(misnamed.fix ?? "", /not issued for SMTP_HOST \(127\.0\.0\.1\)/);
      assert.equal(untrustedSink.stats.auths + misnamedSink.stats.auths, 0, "no token sent over an unverified connection");
    });
  });

  describe("step send-test", () => {
    it("SendAsDenied after DATA: Add-RecipientPermission for the From address and the mailbox", async () => {
      const run = await doctor({ ...local.stack.env, MAIL_FROM: "billing@contoso.test" }, { sendTest: "customer@example.test" });
      assert.equal(run.check("transport").status, "pass");
      const check = assertFails(run, "send-test", "SMTP_SEND_AS_DENIED");
      assert.match(check.message, /SendAsDenied/);
      assert.ok((check.fix ?? "").includes(`Add-RecipientPermission -Identity "billing@contoso.test" -Trustee "${LOCAL_MAILBOX}" -AccessRights SendAs`), check.fix ?? "");
      assert.equal(local.stack.smtp.messages.length, 0);
    });
  });

  describe("--dns against a DNS server on loopback", () => {
    it("SPF without the provider, no DKIM selectors, no DMARC: each named with the record to publish", async () => {
      dns.clear();
      dns.set(DOMAIN, { TXT: ["v=spf1 include:_spf.google.com ~all"] });
      const run = await doctor({ ...local.stack.env, DNS_SERVERS: dns.address }, { dns: true });
      const spf = assertFails(run, "dns-spf", "DNS_SPF_PROVIDER_MISSING");
      assert.ok((spf.fix ?? "").includes('"v=spf1 include:_spf.google.com include:spf.protection.outlook.com ~all"'), spf.fix ?? "");
      const dkim = run.check("dns-dkim");
      assert.deepEqual({ status: dkim.status, code: dkim.code }, { status: "fail", code: "DNS_DKIM_MISSING" });
      assert.match(dkim.fix ?? "", new RegExp(`Get-DkimSigningConfig -Identity ${DOMAIN}`));
      assert.match(dkim.fix ?? "", new RegExp(`selector2\\._domainkey\\.${DOMAIN} CNAME`));
      const dmarc = run.check("dns-dmarc");
      assert.deepEqual({ status: dmarc.status, code: dmarc.code }, { status: "warn", code: "DNS_DMARC_MISSING" });
      assert.ok((dmarc.fix ?? "").includes(`_dmarc.${DOMAIN}: "v=DMARC1; p=none;`), dmarc.fix ?? "");
      assert.ok(dns.queries.some((q) => q.name === `selector1._domainkey.${DOMAIN}` && q.type === "TXT"), "the DNS server was asked");
    });

    it("SPF through a nested include passes; a CNAME whose target has no key is only half done", async () => {
      dns.set(DOMAIN, { TXT: ["v=spf1 include:_spf.contoso.test -all"] });
      dns.set(`_spf.${DOMAIN}`, { TXT: ["v=spf1 ip4:192.0.2.0/24 include:spf.protection.outlook.com -all"] });
      dns.set(`selector2._domainkey.${DOMAIN}`, { CNAME: "selector2-contoso-test._domainkey.nowhere.test" });
      const run = await doctor({ ...local.stack.env, DNS_SERVERS: dns.address }, { dns: true });
      assert.equal(run.check("dns-spf").status, "pass", run.text);
      assert.match(run.check("dns-spf").message, /via include:_spf\.contoso\.test/);
      const dkim = run.check("dns-dkim");
      assert.deepEqual({ status: dkim.status, code: dkim.code }, { status: "warn", code: "DNS_DKIM_INCOMPLETE" });
      assert.match(dkim.message, /CNAME selector2-contoso-test\._domainkey\.nowhere\.test, which has no key/);
    });
  });

  describe("the circuit breaker's log line", () => {
    it("circuit.open carries the step, code and fix the doctor prints for the same failure", async () => {
      const env = { ...local.stack.env, CLIENT_ID: randomUUID() };
      await enqueueEmail(queues.queue, { to: "waits@example.test", subject: "waits", text: "x" });
      const logger = capturingLogger();
      const result = await within(drain(env, logger), 30_000, "the worker to stop with its circuit open");
      outputs.push(...logger.lines);
      const record = logger.lines.map((line) => JSON.parse(line) as Record<string, unknown>).find((r) => r["event"] === "circuit.open");
      assert.ok(record, logger.lines.slice(-5).join("\n"));
      const run = await doctor(env);
      const check = run.check("token");
      assert.deepEqual({ step: record["step"], code: record["code"] }, { step: check.step, code: check.code });
      // The worker's breaker is given the settings' ids (shared/mailer.ts): its fix is exactly the
      // doctor's, with this deployment's CLIENT_ID and TENANT_ID filled in.
      assert.equal(record["fix"], check.fix);
      assert.match(String(record["fix"]), new RegExp(`Entra found no app with CLIENT_ID ${env.CLIENT_ID} in tenant TENANT_ID local-tenant`));
      // Without ids the same advice has placeholders.
      const withoutIds = capturingLogger();
      circuitBreaker({ retryBaseSeconds: 1, retryMaxSeconds: 1 }, withoutIds).open(result.circuitOpen!);
      assert.equal((JSON.parse(withoutIds.lines[0]!) as Record<string, unknown>)["fix"], adviceFor(result.circuitOpen!, {}).fix);
      assert.equal(result.sent, 0);
      assert.equal((await queues.queue.getProperties()).approximateMessagesCount, 1, "the message waits");
    });
  });

  it("nothing this file printed or logged holds a token, secret, password or key", () => {
    assert.ok(outputs.length > 50, `outputs collected: ${outputs.length}`);
    assertNoSecrets(outputs, secrets);
  });
});
