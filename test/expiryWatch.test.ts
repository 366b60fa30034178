// The expiry watch with frozen clocks against the Key Vault (and Graph) double through the real
// Azure SDK, alert state in Azurite tables, email on the Azurite mail queue, and a real local
// webhook receiver. Items expire in 40, 20, 5, 0 and -3 days; one is disabled, one never expires.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import type { QueueClient } from "@azure/storage-queue";
import { startAzurite, type Azurite } from "../cli/local/azurite.js";
import { issueCertificate } from "../cli/local/devCertificates.js";
import { loadExpiryConfig, loadStorageConfig, type ExpiryConfig, type StorageConfig } from "../shared/config.js";
import { runConfiguredExpiryWatch } from "../shared/expiry/expiryWatch.js";
import type { ExpiryRunResult } from "../shared/expiry/runExpiryWatch.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { capturingLogger, type CapturedLogger } from "./support/harness.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";

const DAY = 86_400_000;
const T0 = new Date();
const at = (days: number) => new Date(T0.getTime() + days * DAY);

let azurite: Azurite;
let kv: KeyVaultDouble;
let restoreEnv: () => void;
let webhook: Server;
let webhookUrl: string;
let webhookFailing = false;
const webhookPosts: Array<{ text: string }> = [];
let storage: StorageConfig;
let mailQueue: QueueClient;
let config: ExpiryConfig;

before(async () => {
  azurite = await startAzurite();
  kv = await startKeyVaultDouble();
  restoreEnv = kv.applyEnv();
  webhook = createServer((req, res) => {
    let body = "";
    req.on("data", (c: Buffer) => (body += c.toString()));
    req.on("end", () => {
      if (webhookFailing) {
        res.writeHead(500).end("internal error");
        return;
      }
      webhookPosts.push(JSON.parse(body) as { text: string });
      res.writeHead(200).end("1");
    });
  });
  await new Promise<void>((resolve) => webhook.listen(0, "127.0.0.1", resolve));
  webhookUrl = `http://127.0.0.1:${(webhook.address() as AddressInfo).port}/hook`;

  const cert = issueCertificate({ commonName: "expiry test" });
  kv.putCertificate("smtp-sender", { ...cert, expiresOn: at(5) });
  kv.putCertificate("api-cert-40", { ...cert, expiresOn: at(40) });
  kv.putCertificate("api-cert-20", { ...cert, expiresOn: at(20) });
  kv.putCertificate("today-cert", { ...cert, expiresOn: new Date(T0.getTime() + 3_600_000) });
  kv.putSecret("old-secret", "v", { expiresOn: at(-3) });
  kv.putSecret("disabled-secret", "v", { expiresOn: at(20), enabled: false });
  kv.putSecret("forever-secret", "v");

  storage = loadStorageConfig({ AzureWebJobsStorage: azurite.connectionString, MAIL_QUEUE: "expiry-mail" });
  ({ queue: mailQueue } = await openMailQueues(storage));
  config = loadExpiryConfig({ KEY_VAULT_URL: kv.vaultUrl, CERT_NAME: "smtp-sender", EXPIRY_ALERT_TO: "ops@contoso.test, oncall@contoso.test", EXPIRY_WEBHOOK_URL: webhookUrl });
});

after(async () => {
  restoreEnv?.();
  await new Promise((resolve) => webhook?.close(resolve));
  await Promise.allSettled([kv?.close(), azurite?.stop()]);
});

async function run(days: number, logger: CapturedLogger = capturingLogger()): Promise<ExpiryRunResult & { logger: CapturedLogger }> {
  const result = await runConfiguredExpiryWatch({ config, storage, logger, now: at(days) });
  return { ...result, logger };
}

const delivered = (result: ExpiryRunResult, channel: string) => (result.channels[channel]?.delivered ?? []).map((a) => `${a.finding.name}:${a.alertKey.replace(/-\d{4}-\d\d-\d\d$/, "")}`).sort();

async function takeEmails(): Promise<Array<{ to: string[]; subject: string; text: string; html: string }>> {
  const { receivedMessageItems } = await mailQueue.receiveMessages({ numberOfMessages: 32 });
  for (const m of receivedMessageItems) await mailQueue.deleteMessage(m.messageId, m.popReceipt);
  return receivedMessageItems.map((m) => JSON.parse(Buffer.from(m.messageText, "base64").toString("utf8")));
}

describe("expiry watch", () => {
  it("day 0: evaluates every item and alerts once per due item on every channel", async () => {
    const result = await run(0);
    const byName = new Map(result.findings.map((f) => [f.name, f]));
    assert.deepEqual(
      Object.fromEntries([...byName].map(([name, f]) => [name, `${f.status}${f.daysLeft === undefined ? "" : ` ${f.daysLeft}`}`])),
      {
        "smtp-sender": "critical 5",
        "api-cert-40": "ok 40",
        "api-cert-20": "warning 20",
        "today-cert": "critical 0",
        "old-secret": "expired -3",
        "disabled-secret": "disabled",
        "forever-secret": "never-expires",
      },
    );
    assert.equal(byName.get("smtp-sender")?.inUse, true);

    const expected = ["api-cert-20:threshold-30", "old-secret:daily", "smtp-sender:daily", "today-cert:daily"];
    for (const channel of ["log", "webhook", "email"]) assert.deepEqual(delivered(result, channel), expected, channel);

    const alertLogs = result.logger.lines.map((l) => JSON.parse(l)).filter((r) => r.event === "expiry.alert");
    assert.equal(alertLogs.length, 4);
    assert.deepEqual(alertLogs.find((r) => r.name === "api-cert-20"), { ...alertLogs.find((r) => r.name === "api-cert-20"), level: "warn", kind: "certificate", daysLeft: 20, status: "warning" });
    assert.equal(alertLogs.find((r) => r.name === "old-secret").level, "error");

    assert.equal(webhookPosts.length, 1);
    for (const name of ["api-cert-20", "old-secret", "smtp-sender", "today-cert"]) assert.match(webhookPosts[0]?.text ?? "", new RegExp(name));
    assert.doesNotMatch(webhookPosts[0]?.text ?? "", /api-cert-40|forever-secret/);

    const emails = await takeEmails();
    assert.equal(emails.length, 1);
    assert.deepEqual(emails[0]?.to, ["ops@contoso.test", "oncall@contoso.test"]);
    assert.match(emails[0]?.subject ?? "", /1 expired, 3 expiring soon/);
    assert.match(emails[0]?.text ?? "", /smtp-sender \(in use\)\s+certificate\s+\S+\s+5\s+critical/);
    assert.match(emails[0]?.html ?? "", /<table/);
  });

  it("a restart the same day repeats nothing", async () => {
    const result = await run(0.2);
    for (const channel of ["log", "webhook", "email"]) assert.deepEqual(delivered(result, channel), [], channel);
    assert.equal(webhookPosts.length, 1);
    assert.equal((await takeEmails()).length, 0);
  });

  it("day 1, two instances at once: the daily alerts go out once, the 30-day warning does not repeat", async () => {
    const [a, b] = await Promise.all([run(1), run(1)]);
    assert.ok(a && b);
    for (const channel of ["log", "webhook", "email"]) {
      assert.deepEqual([...delivered(a, channel), ...delivered(b, channel)].sort(), ["old-secret:daily", "smtp-sender:daily", "today-cert:daily"], channel);
    }
    assert.equal(webhookPosts.length, 2);
    assert.equal((await takeEmails()).length, 1);
  });

  it("day 6: the 20-day item crosses 14 and warns once more", async () => {
    const result = await run(6);
    assert.deepEqual(delivered(result, "log"), ["api-cert-20:threshold-14", "old-secret:daily", "smtp-sender:daily", "today-cert:daily"]);
    await takeEmails();
  });

  it("a failing webhook stops no other channel, and its alerts are sent on the next run", async () => {
    webhookFailing = true;
    const failed = await run(7);
    webhookFailing = false;
    assert.match(failed.channels["webhook"]?.error ?? "", /WEBHOOK_REJECTED/);
    assert.deepEqual(delivered(failed, "log"), ["old-secret:daily", "smtp-sender:daily", "today-cert:daily"]);
    assert.deepEqual(delivered(failed, "email"), ["old-secret:daily", "smtp-sender:daily", "today-cert:daily"]);
    assert.ok(failed.logger.lines.some((l) => l.includes('"expiry.channel_failed"') && l.includes('"webhook"')));

    const postsBefore = webhookPosts.length;
    const retried = await run(7.1);
    assert.deepEqual(delivered(retried, "webhook"), ["old-secret:daily", "smtp-sender:daily", "today-cert:daily"]);
    assert.deepEqual(delivered(retried, "log"), []);
    assert.deepEqual(delivered(retried, "email"), []);
    assert.equal(webhookPosts.length, postsBefore + 1);
    await takeEmails();
  });

  it("a renewed certificate version ends the old version's alerts", async () => {
    kv.putCertificate("smtp-sender", { ...issueCertificate({ commonName: "renewed" }), expiresOn: at(400) });
    const result = await run(8);
    const sender = result.findings.find((f) => f.name === "smtp-sender");
    assert.deepEqual({ status: sender?.status, daysLeft: sender?.daysLeft }, { status: "ok", daysLeft: 392 });
    assert.ok(!delivered(result, "log").some((a) => a.startsWith("smtp-sender")));
    await takeEmails();
  });

  it("reports a vault it cannot read as a finding, without crashing", async () => {
    kv.failNext(2, 403); // the certificate list and the secret list
    const result = await run(9);
    const errors = result.findings.filter((f) => f.status === "error");
    assert.equal(errors.length, 2);
    assert.match(errors[0]?.action ?? "", /Key Vault Reader/);
    assert.ok(result.logger.lines.some((l) => l.includes('"expiry.check_failed"')));
    await takeEmails();
  });
});

describe("expiry watch: app registration through Microsoft Graph", () => {
  const appId = "22222222-3333-4444-5555-666666666666";
  const appConfig = () => loadExpiryConfig({ KEY_VAULT_URL: kv.vaultUrl, EXPIRY_WATCH_NAMES: "api-cert-*", EXPIRY_CHECK_APP_REGISTRATION: "true", CLIENT_ID: appId });

  it("reports the app's certificates and client secrets by their end dates, and alerts on them", async () => {
    kv.putApplication({
      appId,
      displayName: "queue-mailer",
      keyCredentials: [{ displayName: "smtp-cert-2026", endDateTime: at(10) }],
      passwordCredentials: [{ displayName: "legacy secret", endDateTime: at(-1) }],
    });
    const result = await runConfiguredExpiryWatch({ config: appConfig(), storage, logger: capturingLogger(), now: at(0) });
    const summary = Object.fromEntries(result.findings.map((f) => [f.name, `${f.kind} ${f.status} ${f.daysLeft ?? ""}`.trim()]));
    assert.deepEqual(summary, {
      "api-cert-40": "certificate ok 40",
      "api-cert-20": "certificate warning 20",
      "queue-mailer: smtp-cert-2026": "app-certificate warning 10",
      "queue-mailer: legacy secret": "app-secret expired -1",
    });
    assert.deepEqual(delivered(result, "log"), ["queue-mailer: legacy secret:daily", "queue-mailer: smtp-cert-2026:threshold-14"], "api-cert-20 was alerted for 30 days already");
    assert.ok(kv.counts.graphRequests >= 1);
    await takeEmails();
  });

  it("a missing Graph permission is a clear finding, not a crash, and the vault is still checked", async () => {
    kv.denyGraph(true);
    try {
      const result = await runConfiguredExpiryWatch({ config: appConfig(), storage, logger: capturingLogger(), now: at(0) });
      const error = result.findings.find((f) => f.status === "error");
      assert.ok(error);
      assert.match(error.detail ?? "", /Microsoft Graph refused to read the app registration \(403\)/);
      assert.match(error.action, /Application\.Read\.All/);
      assert.ok(result.findings.some((f) => f.name === "api-cert-40" && f.status === "ok"));
    } finally {
      kv.denyGraph(false);
    }
  });
});

describe("queue-mailer expiry (CLI)", () => {
  const bin = fileURLToPath(new URL("../bin/queue-mailer.js", import.meta.url));
  const runCli = (args: string[], env: Record<string, string>) =>
    new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, [bin, ...args], { env: { PATH: process.env["PATH"] ?? "", ...env }, stdio: ["ignore", "pipe", "pipe"] });
      let stdout = "";
      let stderr = "";
      child.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
      child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
      child.on("exit", (status) => resolve({ status, stdout, stderr }));
    });

  it("--json with CERT_PATH expiring in 5 days: days left 5 (±1), non-zero exit, no storage settings needed", async () => {
    const dir = mkdtempSync(join(tmpdir(), "qm-expiry-"));
    try {
      const cert = issueCertificate({ commonName: "five days", days: 5 });
      const path = join(dir, "sender.pem");
      writeFileSync(path, cert.certificatePem + cert.privateKeyPem);
      const result = await runCli(["expiry", "--json"], { CERT_PATH: path });
      assert.equal(result.status, 1, result.stderr);
      const report = JSON.parse(result.stdout) as { findings: Array<{ name: string; daysLeft: number; status: string; kind: string }> };
      assert.equal(report.findings.length, 1);
      assert.equal(report.findings[0]?.kind, "certificate-file");
      assert.ok(Math.abs((report.findings[0]?.daysLeft ?? 0) - 5) <= 1, `days left ${report.findings[0]?.daysLeft}`);
      assert.equal(report.findings[0]?.status, "critical");

      const healthy = issueCertificate({ commonName: "a year", days: 365 });
      writeFileSync(path, healthy.privateKeyPem + healthy.certificatePem);
      const ok = await runCli(["expiry"], { CERT_PATH: path });
      assert.equal(ok.status, 0, ok.stderr);
      assert.match(ok.stdout, /sender\.pem \(in use\)\s+certificate-file\s+\S+\s+36[45]\s+ok/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("reads Key Vault through the real SDK from a separate process and prints a table", async () => {
    const result = await runCli(["expiry"], { ...kv.env, CERT_NAME: "smtp-sender" });
    assert.equal(result.status, 1, result.stderr);
    assert.match(result.stdout, /^NAME\s+KIND\s+EXPIRES\s+DAYS LEFT\s+STATUS/);
    assert.match(result.stdout, /old-secret\s+secret\s+\S+\s+-3\s+expired/);
    assert.match(result.stdout, /forever-secret\s+secret\s+never expires\s+never-expires/);
  });
});
