import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { loadBounceConfig, loadSendConfig, loadStorageConfig, readSettings, settingSpecs } from "../shared/config.js";
import { ConfigError } from "../shared/errors.js";
import { spawnCli } from "./support/cli.js";

const complete = {
  AzureWebJobsStorage: "UseDevelopmentStorage=true",
  TENANT_ID: "contoso.onmicrosoft.com",
  CLIENT_ID: "11111111-2222-3333-4444-555555555555",
  KEY_VAULT_URL: "https://my-vault.vault.azure.net",
  CERT_NAME: "smtp-cert",
  SMTP_USER: "mailer@contoso.com",
};

function configError(fn: () => unknown): ConfigError {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof ConfigError, `expected ConfigError, got ${String(error)}`);
    return error;
  }
  assert.fail("expected a ConfigError");
}

describe("config", () => {
  it("applies the documented defaults", () => {
    const config = loadSendConfig(complete);
    assert.ok(config.auth.method === "certificate");
    assert.equal(config.auth.tokenUrl, "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token");
    assert.equal(config.auth.scope, "https://outlook.office365.com/.default");
    assert.equal(config.auth.assertionAlg, "PS256");
    assert.deepEqual(config.auth.certificate, { kind: "keyVault", vaultUrl: complete.KEY_VAULT_URL, name: "smtp-cert" });
    assert.deepEqual({ host: config.smtp.host, port: config.smtp.port, max: config.smtp.maxConnections, rate: config.smtp.ratePerMinute }, { host: "smtp.office365.com", port: 587, max: 3, rate: 30 });
    assert.equal(config.storage.queueName, "outbound-email");
    assert.equal(config.storage.poisonQueueName, "outbound-email-poison");
    assert.equal(config.mailFrom, "mailer@contoso.com");
    assert.equal(config.queue.maxDequeueCount, 5);
  });

  it("names every missing setting with its fix, in one error", () => {
    const error = configError(() => loadSendConfig({}));
    assert.equal(error.code, "CONFIG_INVALID");
    assert.equal(error.kind, "config");
    assert.deepEqual(new Set(error.settings), new Set(["AzureWebJobsStorage", "CLIENT_ID", "TENANT_ID", "KEY_VAULT_URL", "SMTP_USER"]));
    assert.match(error.message, /CLIENT_ID: is not set\. Set it to the Application \(client\) ID/);
  });

  it("refuses plain http token URLs except on loopback", () => {
    const remote = configError(() => loadSendConfig({ ...complete, TOKEN_URL: "http://login.example.com/token" }));
    assert.deepEqual(remote.settings, ["TOKEN_URL"]);
    assert.match(remote.message, /must use https/);
    assert.equal(loadSendConfig({ ...complete, TOKEN_URL: "http://127.0.0.1:8080/t/oauth2/v2.0/token" }).auth.tokenUrl, "http://127.0.0.1:8080/t/oauth2/v2.0/token");
  });

  it("rejects invalid numbers and enums by name", () => {
    const error = configError(() => loadSendConfig({ ...complete, SMTP_PORT: "abc", ASSERTION_ALG: "HS256", SEND_RATE_PER_MINUTE: "-1" }));
    assert.deepEqual(new Set(error.settings), new Set(["SMTP_PORT", "ASSERTION_ALG", "SEND_RATE_PER_MINUTE"]));
  });

  it("CERT_PATH replaces Key Vault; CERT_NAME without KEY_VAULT_URL is named", () => {
    const config = loadSendConfig({ ...complete, KEY_VAULT_URL: "", CERT_NAME: "", CERT_PATH: "/certs/app.pfx", CERT_PASSWORD: "pfx-password-123" });
    assert.ok(config.auth.method === "certificate");
    assert.deepEqual(config.auth.certificate, { kind: "file", path: "/certs/app.pfx", password: "pfx-password-123" });
    const error = configError(() => loadSendConfig({ ...complete, KEY_VAULT_URL: "" }));
    assert.deepEqual(error.settings, ["KEY_VAULT_URL"]);
  });

  it("storage-only commands need only storage settings", () => {
    assert.equal(loadStorageConfig({ AzureWebJobsStorage: "UseDevelopmentStorage=true", MAIL_QUEUE: "mail" }).poisonQueueName, "mail-poison");
    assert.deepEqual(configError(() => loadStorageConfig({ AzureWebJobsStorage: "x", MAIL_QUEUE: "Bad_Name" })).settings, ["MAIL_QUEUE"]);
  });

  it("reads local.settings.json Values, and the environment wins", () => {
    const dir = mkdtempSync(join(tmpdir(), "qm-settings-"));
    try {
      writeFileSync(join(dir, "local.settings.json"), JSON.stringify({ Values: { MAIL_QUEUE: "from-file", SMTP_USER: "file@contoso.com" } }));
      const settings = readSettings(dir, { MAIL_QUEUE: "from-env" });
      assert.equal(settings["MAIL_QUEUE"], "from-env");
      assert.equal(settings["SMTP_USER"], "file@contoso.com");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("every declared setting is in local.settings.sample.json", async () => {
    const sample = JSON.parse((await import("node:fs")).readFileSync("local.settings.sample.json", "utf8")) as { Values: Record<string, string> };
    const missing = settingSpecs.map((s) => s.name).filter((name) => !(name in sample.Values) && !name.startsWith("AzureWebJobsStorage__"));
    assert.deepEqual(missing, []);
  });

  it("bounce watch: IMAP defaults follow AUTH_METHOD, the token asks for IMAP_SCOPE, every problem named", () => {
    const microsoft = loadBounceConfig(complete);
    assert.deepEqual([microsoft.imap, microsoft.auth.scope, microsoft.folder, microsoft.doneFolder, microsoft.softBounceLimit, microsoft.schedule, microsoft.enabled], [
      { host: "outlook.office365.com", port: 993, user: "mailer@contoso.com" }, "https://outlook.office365.com/.default", "INBOX", "queue-mailer-processed", 3, "0 */5 * * * *", true,
    ]);
    const google = loadBounceConfig({ ...complete, AUTH_METHOD: "google-service-account", GOOGLE_KEY_PATH: "/keys/sa.json" });
    assert.deepEqual([google.imap.host, google.auth.scope], ["imap.gmail.com", "https://mail.google.com/"]);
    // A Graph sender's TOKEN_SCOPE is for Graph; IMAP asks for its own.
    const delegated = loadBounceConfig({ ...complete, AUTH_METHOD: "password", MAILBOX_PASSWORD: "pw", TOKEN_SCOPE: "https://graph.microsoft.com/Mail.Send" });
    assert.equal(delegated.auth.scope, "https://outlook.office365.com/IMAP.AccessAsUser.All");
    const error = configError(() => loadBounceConfig({ ...complete, BOUNCE_DONE_FOLDER: "inbox", SOFT_BOUNCE_LIMIT: "0", BOUNCE_CHECK_SCHEDULE: "*/5 * * * *" }));
    assert.deepEqual(error.settings.sort(), ["BOUNCE_CHECK_SCHEDULE", "BOUNCE_DONE_FOLDER", "SOFT_BOUNCE_LIMIT"]);
  });
});

describe("queue-mailer CLI without settings", () => {
  const run = (args: string[], cwd: string) => spawnCli(args, { cwd });

  it("--help works with no settings at all", async () => {
    const dir = mkdtempSync(join(tmpdir(), "qm-cli-"));
    try {
      const result = await run(["--help"], dir);
      assert.equal(result.status, 0, result.stderr);
      assert.match(result.stdout, /queue-mailer worker \[--drain\]/);
      assert.match(result.stdout, /queue-mailer enqueue/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("worker names each missing setting and exits non-zero before touching the queue", async () => {
    const dir = mkdtempSync(join(tmpdir(), "qm-cli-"));
    try {
      const result = await run(["worker"], dir);
      assert.equal(result.status, 2);
      for (const setting of ["AzureWebJobsStorage", "CLIENT_ID", "TENANT_ID", "KEY_VAULT_URL", "SMTP_USER"]) {
        assert.match(result.stderr, new RegExp(`${setting}: is not set`));
      }
      assert.match(result.stderr, /CONFIG_INVALID/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("documentation", () => {
  it("the README settings table is generated from shared/config.ts", async () => {
    const { readmeTable, settingsTable } = await import("../scripts/settingsTable.js");
    const readme = (await import("node:fs")).readFileSync("README.md", "utf8");
    assert.equal(readmeTable(readme), settingsTable(), "run: node --import tsx scripts/settingsTable.ts --write");
  });
});
