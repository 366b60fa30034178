// The expiry watch on a fixed clock against the Key Vault (and Graph) double through the real
// Azure SDK, alert state in Azurite tables, email on the Azurite mail queue, and a real local
// webhook receiver. Each test sets up its own items, queue and webhook (scenario()) and makes the
// earlier runs it depends on itself.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { startAzurite, type Azurite } from "../cli/local/azurite.js";
import { issueCertificate } from "../cli/local/devCertificates.js";
import { loadExpiryConfig, loadStorageConfig, type ExpiryConfig, type StorageConfig } from "../shared/config.js";
import { runConfiguredExpiryWatch } from "../shared/expiry/expiryWatch.js";
import type { ExpiryRunResult } from "../shared/expiry/runExpiryWatch.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { spawnCli } from "./support/cli.js";
import { capturingLogger, type CapturedLogger } from "./support/harness.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";

const DAY = 86_400_000;
// Noon UTC on a fixed date. Daily alerts are keyed by UTC date, and every run below is at T0 plus
// whole days plus at most 0.2 day, so each lands on the date it means at any time of day (with
// T0 from the wall clock, the runs at +0.2 and +7.1 days fell on the next date from 19:12 UTC on).
// Nothing in this process needs T0 near the real time: the watch evaluates the dates it is given,
// and the Key Vault double's tokens are timed by the real clock on both sides. Only the CLI test
// against the vault dates its items from the real clock, because the CLI evaluates with its own.
const T0 = new Date("2026-03-02T12:00:00.000Z");
const at = (days: number, from: Date = T0) => new Date(from.getTime() + days * DAY);

let azurite: Azurite;
let kv: KeyVaultDouble;
let restoreEnv: () => void;
let webhook: Server;
let webhookBase: string;
/** Webhook receivers by path, one per scenario. */
const hooks = new Map<string, { posts: Array<{ text: string }>; failing: boolean }>();
let keyPair: ReturnType<typeof issueCertificate>;
let scenarios = 0;

before(async () => {
  azurite = await startAzurite();
  kv = await startKeyVaultDouble();
  restoreEnv = kv.applyEnv();
  webhook = createServer((req, res) => {
    let body = "";
    req.on("data", (c: Buffer) => (body += c.toString()));
    req.on("end", () => {
      const hook = hooks.get(req.url ?? "");
      if (!hook) {
        res.writeHead(404).end("no such hook");
        return;
      }
      if (hook.failing) {
        res.writeHead(500).end("internal error");
        return;
      }
      hook.posts.push(JSON.parse(body) as { text: string });
      res.writeHead(200).end("1");
    });
  });
  await new Promise<void>((resolve) => webhook.listen(0, "127.0.0.1", resolve));
  webhookBase = `http://127.0.0.1:${(webhook.address() as AddressInfo).port}`;
  // One key pair for every item: the watch reads only the dates, and RSA key generation is slow.
  keyPair = issueCertificate({ commonName: "expiry test" });
});

after(async () => {
  restoreEnv?.();
  await new Promise((resolve) => webhook?.close(resolve));
  await Promise.allSettled([kv?.close(), azurite?.stop()]);
});

type Run = ExpiryRunResult & { logger: CapturedLogger };

/**
 * One test's own state on the shared servers, so that tests run alone and in any order: its own
 * vault items (names prefixed with its tag and watched through EXPIRY_WATCH_NAMES, so its alert
 * ledger rows, which are keyed by item, are its own too), its own mail queue and webhook path.
 * Items expire in 40, 20, 5, 0 and -3 days from `from`; one is disabled, one never expires.
 */
async function scenario({ from = T0 }: { from?: Date } = {}) {
  const tag = `t${++scenarios}`;
  const name = (item: string) => `${tag}-${item}`;
  /** A finding's name without the tag, for comparing with the names in the tests. */
  const short = (findingName: string) => (findingName.startsWith(`${tag}-`) ? findingName.slice(tag.length + 1) : findingName);

  kv.putCertificate(name("smtp-sender"), { ...keyPair, expiresOn: at(5, from) });
  kv.putCertificate(name("api-cert-40"), { ...keyPair, expiresOn: at(40, from) });
  kv.putCertificate(name("api-cert-20"), { ...keyPair, expiresOn: at(20, from) });
  kv.putCertificate(name("today-cert"), { ...keyPair, expiresOn: new Date(from.getTime() + 3_600_000) });
  kv.putSecret(name("old-secret"), "v", { expiresOn: at(-3, from) });
  kv.putSecret(name("disabled-secret"), "v", { expiresOn: at(20, from), enabled: false });
  kv.putSecret(name("forever-secret"), "v");

  const hook = { posts: [] as Array<{ text: string }>, failing: false };
  hooks.set(`/hook/${tag}`, hook);
  const storage: StorageConfig = loadStorageConfig({ AzureWebJobsStorage: azurite.connectionString, MAIL_QUEUE: `expiry-mail-${tag}` });
  const { queue } = await openMailQueues(storage);
  const config = loadExpiryConfig({
    KEY_VAULT_URL: kv.vaultUrl,
    CERT_NAME: name("smtp-sender"),
    EXPIRY_WATCH_NAMES: `${tag}-*`,
    EXPIRY_ALERT_TO: "ops@contoso.test, oncall@contoso.test",
    EXPIRY_WEBHOOK_URL: `${webhookBase}/hook/${tag}`,
  });

  return {
    tag,
    name,
    short,
    hook,
    async run(days: number, runConfig: ExpiryConfig = config): Promise<Run> {
      const logger = capturingLogger();
      const result = await runConfiguredExpiryWatch({ config: runConfig, storage, logger, now: at(days) });
      return { ...result, logger };
    },
    /** "name:alert" for each alert a channel delivered, the date left off daily alert keys. */
    delivered(result: ExpiryRunResult, channel: string): string[] {
      return (result.channels[channel]?.delivered ?? []).map((a) => `${short(a.finding.name)}:${a.alertKey.replace(/-\d{4}-\d\d-\d\d$/, "")}`).sort();
    },
    async takeEmails(): Promise<Array<{ to: string[]; subject: string; text: string; html: string }>> {
      const { receivedMessageItems } = await queue.receiveMessages({ numberOfMessages: 32 });
      for (const m of receivedMessageItems) await queue.deleteMessage(m.messageId, m.popReceipt);
      return receivedMessageItems.map((m) => JSON.parse(Buffer.from(m.messageText, "base64").toString("utf8")));
    },
  };
}

const DAILY = ["old-secret:daily", "smtp-sender:daily", "today-cert:daily"];

describe("expiry watch", () => {
  it("day 0: evaluates every item and alerts once per due item on every channel", async () => {
    const s = await scenario();
    const result = await s.run(0);
    assert.deepEqual(
      Object.fromEntries(result.findings.map((f) => [s.short(f.name), `${f.status}${f.daysLeft === undefined ? "" : ` ${f.daysLeft}`}`])),
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
    assert.equal(result.findings.find((f) => f.name === s.name("smtp-sender"))?.inUse, true);

    const expected = ["api-cert-20:threshold-30", ...DAILY];
    for (const channel of ["log", "webhook", "email"]) assert.deepEqual(s.delivered(result, channel), expected, channel);

    const alertLogs = result.logger.lines.map((l) => JSON.parse(l)).filter((r) => r.event === "expiry.alert");
    assert.equal(alertLogs.length, 4);
    const warning = alertLogs.find((r) => r.name === s.name("api-cert-20"));
    assert.deepEqual(warning, { ...warning, level: "warn", kind: "certificate", daysLeft: 20, status: "warning" });
    assert.equal(alertLogs.find((r) => r.name === s.name("old-secret")).level, "error");

    assert.equal(s.hook.posts.length, 1);
    for (const name of ["api-cert-20", "old-secret", "smtp-sender", "today-cert"]) assert.match(s.hook.posts[0]?.text ?? "", new RegExp(s.name(name)));
    assert.doesNotMatch(s.hook.posts[0]?.text ?? "", /api-cert-40|forever-secret/);

    const emails = await s.takeEmails();
    assert.equal(emails.length, 1);
    assert.deepEqual(emails[0]?.to, ["ops@contoso.test", "oncall@contoso.test"]);
    assert.match(emails[0]?.subject ?? "", /1 expired, 3 expiring soon/);
    assert.match(emails[0]?.text ?? "", new RegExp(`${s.name("smtp-sender")} \\(in use\\)\\s+certificate\\s+\\S+\\s+5\\s+critical`));
    assert.match(emails[0]?.html ?? "", /<table/);
  });

  it("a restart the same day repeats nothing", async () => {
    const s = await scenario();
    await s.run(0);
    const result = await s.run(0.2);
    for (const channel of ["log", "webhook", "email"]) assert.deepEqual(s.delivered(result, channel), [], channel);
    assert.equal(s.hook.posts.length, 1, "day 0's post only");
    assert.equal((await s.takeEmails()).length, 1, "day 0's email only");
  });

  it("day 1, two instances at once: the daily alerts go out once, the 30-day warning does not repeat", async () => {
    const s = await scenario();
    await s.run(0);
    const [a, b] = await Promise.all([s.run(1), s.run(1)]);
    assert.ok(a && b);
    for (const channel of ["log", "webhook", "email"]) {
      assert.deepEqual([...s.delivered(a, channel), ...s.delivered(b, channel)].sort(), DAILY, channel);
    }
    assert.equal(s.hook.posts.length, 2, "one post for day 0, one for day 1");
    assert.equal((await s.takeEmails()).length, 2, "one email for day 0, one for day 1");
  });

  it("day 6: the 20-day item crosses 14 and warns once more", async () => {
    const s = await scenario();
    assert.deepEqual(s.delivered(await s.run(0), "log"), ["api-cert-20:threshold-30", ...DAILY]);
    const result = await s.run(6);
    assert.deepEqual(s.delivered(result, "log"), ["api-cert-20:threshold-14", ...DAILY]);
  });

  it("a failing webhook stops no other channel, and its alerts are sent on the next run", async () => {
    const s = await scenario();
    // Days 0 and 6 gave api-cert-20 its warnings, so on day 7 only the daily alerts are due.
    await s.run(0);
    await s.run(6);
    s.hook.failing = true;
    const failed = await s.run(7);
    s.hook.failing = false;
    assert.match(failed.channels["webhook"]?.error ?? "", /WEBHOOK_REJECTED/);
    assert.deepEqual(s.delivered(failed, "log"), DAILY);
    assert.deepEqual(s.delivered(failed, "email"), DAILY);
    assert.ok(failed.logger.lines.some((l) => l.includes('"expiry.channel_failed"') && l.includes('"webhook"')));

    const postsBefore = s.hook.posts.length;
    const retried = await s.run(7.1);
    assert.deepEqual(s.delivered(retried, "webhook"), DAILY);
    assert.deepEqual(s.delivered(retried, "log"), []);
    assert.deepEqual(s.delivered(retried, "email"), []);
    assert.equal(s.hook.posts.length, postsBefore + 1);
  });

  it("a renewed certificate version ends the old version's alerts", async () => {
    const s = await scenario();
    assert.ok(s.delivered(await s.run(7), "log").includes("smtp-sender:daily"), "the old version alerts daily");
    kv.putCertificate(s.name("smtp-sender"), { ...issueCertificate({ commonName: "renewed" }), expiresOn: at(400) });
    const result = await s.run(8);
    const sender = result.findings.find((f) => f.name === s.name("smtp-sender"));
    assert.deepEqual({ status: sender?.status, daysLeft: sender?.daysLeft }, { status: "ok", daysLeft: 392 });
    assert.ok(!s.delivered(result, "log").some((a) => a.startsWith("smtp-sender")));
  });

  it("reports a vault it cannot read as a finding, without crashing", async () => {
    const s = await scenario();
    kv.failNext(2, 403); // the certificate list and the secret list
    const result = await s.run(9);
    const errors = result.findings.filter((f) => f.status === "error");
    assert.equal(errors.length, 2);
    assert.match(errors[0]?.action ?? "", /Key Vault Reader/);
    assert.ok(result.logger.lines.some((l) => l.includes('"expiry.check_failed"')));
  });
});

describe("expiry watch: app registration through Microsoft Graph", () => {
  const appConfig = (tag: string, appId: string) =>
    loadExpiryConfig({ KEY_VAULT_URL: kv.vaultUrl, EXPIRY_WATCH_NAMES: `${tag}-api-cert-*`, EXPIRY_CHECK_APP_REGISTRATION: "true", CLIENT_ID: appId });

  it("reports the app's certificates and client secrets by their end dates, and alerts on them", async () => {
    const s = await scenario();
    const appId = randomUUID();
    kv.putApplication({
      appId,
      displayName: "queue-mailer",
      keyCredentials: [{ displayName: "smtp-cert-2026", endDateTime: at(10) }],
      passwordCredentials: [{ displayName: "legacy secret", endDateTime: at(-1) }],
    });
    const graphBefore = kv.counts.graphRequests;
    await s.run(0); // the vault alone first: api-cert-20's 30-day warning goes out here
    const result = await s.run(0, appConfig(s.tag, appId));
    const summary = Object.fromEntries(result.findings.map((f) => [s.short(f.name), `${f.kind} ${f.status} ${f.daysLeft ?? ""}`.trim()]));
    assert.deepEqual(summary, {
      "api-cert-40": "certificate ok 40",
      "api-cert-20": "certificate warning 20",
      "queue-mailer: smtp-cert-2026": "app-certificate warning 10",
      "queue-mailer: legacy secret": "app-secret expired -1",
    });
    assert.deepEqual(s.delivered(result, "log"), ["queue-mailer: legacy secret:daily", "queue-mailer: smtp-cert-2026:threshold-14"], "api-cert-20 was alerted for 30 days already");
    assert.ok(kv.counts.graphRequests > graphBefore);
  });

  it("a missing Graph permission is a clear finding, not a crash, and the vault is still checked", async () => {
    const s = await scenario();
    kv.denyGraph(true);
    try {
      const result = await s.run(0, appConfig(s.tag, randomUUID()));
      const error = result.findings.find((f) => f.status === "error");
      assert.ok(error);
      assert.match(error.detail ?? "", /Microsoft Graph refused to read the app registration \(403\)/);
      assert.match(error.action, /Application\.Read\.All/);
      assert.ok(result.findings.some((f) => f.name === s.name("api-cert-40") && f.status === "ok"));
    } finally {
      kv.denyGraph(false);
    }
  });
});

describe("queue-mailer expiry (CLI)", () => {
  const runCli = (args: string[], env: Record<string, string>) => spawnCli(args, { env });

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
    // Dated from this process's clock, not T0: the CLI evaluates against its own clock.
    const s = await scenario({ from: new Date() });
    const result = await runCli(["expiry"], { ...kv.env, CERT_NAME: s.name("smtp-sender"), EXPIRY_WATCH_NAMES: `${s.tag}-*` });
    assert.equal(result.status, 1, result.stderr);
    assert.match(result.stdout, /^NAME\s+KIND\s+EXPIRES\s+DAYS LEFT\s+STATUS/);
    assert.match(result.stdout, new RegExp(`^${s.name("old-secret")}\\s+secret\\s+\\S+\\s+-3\\s+expired`, "m"));
    assert.match(result.stdout, new RegExp(`^${s.name("forever-secret")}\\s+secret\\s+never expires\\s+never-expires`, "m"));
  });
});
