// `queue-mailer doctor` with AUTH_METHOD=google-service-account (its own local stack: the Google
// token endpoint double, the SMTP sink checking Gmail-style tokens, Azurite), plus the Key Vault
// double for a key stored as a secret. Google's refusals are produced for real (delegation
// revoked, a user outside the domain, a broken key) and each must name the step and the Google
// setting to fix. The service account's private key and every token stay out of every output.
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, beforeEach, describe, it } from "node:test";
import { startDnsServer, type DnsServer } from "../cli/local/dnsServer.js";
import { GOOGLE_MAIL_SCOPE, type GoogleServiceAccountKeyJson, type GoogleTokenServer } from "../cli/local/googleTokenServer.js";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import type { SmtpFault, SmtpFaultAction } from "../cli/local/smtpSink.js";
import { assertFails, doctorRunner, JWT } from "./support/doctorRun.js";
import { useLocalStack } from "./support/harness.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";

const GMAIL_BAD_CREDENTIALS = "5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials";
const DOMAIN = LOCAL_MAILBOX.split("@")[1]!;

let fault: ((ctx: SmtpFault) => SmtpFaultAction | undefined) | undefined;
const outputs: string[] = [];

const doctor = doctorRunner(outputs);

describe("queue-mailer doctor, AUTH_METHOD=google-service-account", () => {
  const local = useLocalStack("qm-doctor-google-", { authMethod: "google-service-account", fault: (ctx) => fault?.(ctx) });
  let kv: KeyVaultDouble;
  let restoreEnv: (() => void) | undefined;
  let dns: DnsServer;
  let google: GoogleTokenServer;
  let key: GoogleServiceAccountKeyJson;

  before(async () => {
    kv = await startKeyVaultDouble();
    // Before any Azure SDK client of this process is built: NO_PROXY is read once per process.
    restoreEnv = kv.applyEnv();
    dns = await startDnsServer();
    assert.ok(local.stack.google, "the stack serves Google");
    ({ server: google, key } = local.stack.google);
    kv.putSecret("google-key", JSON.stringify(key));
  });

  after(async () => {
    restoreEnv?.();
    await Promise.allSettled([kv?.close(), dns?.close()]);
  });

  beforeEach(() => {
    fault = undefined;
    google.resetStats();
    google.delegate(key.client_id, [GOOGLE_MAIL_SCOPE]);
    local.stack.smtp.messages.length = 0;
    kv.resetCounts();
  });

  it("a healthy setup passes through Gmail's path, the key from a file or from Key Vault", async () => {
    const fromFile = await doctor(local.stack.env, { sendTest: "someone@example.test" });
    assert.equal(fromFile.report.ok, true, fromFile.text);
    assert.match(fromFile.check("credential").message, new RegExp(`${key.client_email}, client id ${key.client_id}, key id ${key.private_key_id}`));
    assert.equal(fromFile.check("send-test").status, "pass");
    assert.equal(local.stack.smtp.messages.filter((m) => m.rcptTo.includes("someone@example.test")).length, 1);
    const fromVault = await doctor({ ...local.stack.env, ...kv.env, GOOGLE_KEY_PATH: "", GOOGLE_KEY_NAME: "google-key", KEY_VAULT_URL: kv.vaultUrl });
    assert.equal(fromVault.report.ok, true, fromVault.text);
    assert.match(fromVault.check("keyvault").message, /secret "google-key" \(Google key\) read/);
  });

  it("delegation revoked: unauthorized_client names the client id and scope for the Admin console", async () => {
    google.revokeDelegation(key.client_id);
    const check = assertFails(await doctor(local.stack.env), "token", "TOKEN_UNAUTHORIZED_CLIENT");
    assert.ok((check.fix ?? "").includes(`Manage Domain Wide Delegation > Add new: Client ID ${key.client_id} (${key.client_email}), OAuth scopes ${GOOGLE_MAIL_SCOPE}`), check.fix ?? "");
  });

  it("a user outside the Workspace domain: invalid_grant names SMTP_USER", async () => {
    const check = assertFails(await doctor({ ...local.stack.env, SMTP_USER: "nobody@contoso.test", MAIL_FROM: "nobody@contoso.test" }), "token", "TOKEN_INVALID_GRANT");
    assert.match(check.message, /Invalid email or User ID/);
    assert.match(check.fix ?? "", /SMTP_USER \(the assertion's sub\) is not a user of the Workspace domain/);
  });

  it("Gmail's 535 5.7.8 at AUTH gets Gmail's fix, not Exchange's commands", async () => {
    fault = (ctx) => (ctx.phase === "auth" ? { reply: 535, message: GMAIL_BAD_CREDENTIALS } : undefined);
    const check = assertFails(await doctor(local.stack.env), "transport", "SMTP_AUTH_REJECTED");
    assert.match(check.fix ?? "", /Gmail refused the token for SMTP_USER/);
    assert.doesNotMatch(check.fix ?? "", /New-ServicePrincipal/);
  });

  it("a key file that is not a service account key fails step credential, and no token is asked for", async () => {
    const path = join(local.workDir, "user-credential.json");
    writeFileSync(path, JSON.stringify({ type: "authorized_user", client_id: "x", client_secret: "y", refresh_token: "z" }));
    const run = await doctor({ ...local.stack.env, GOOGLE_KEY_PATH: path });
    const check = assertFails(run, "credential", "GOOGLE_KEY_INVALID");
    assert.match(check.message, /a user's OAuth credential, not a service account key/);
    assert.equal(run.check("token").status, "skip");
    assert.equal(google.stats.tokenRequests, 0);
  });

  it("the key in Key Vault, refused: Key Vault Secrets User", async () => {
    kv.failNext(1, 403);
    const check = assertFails(await doctor({ ...local.stack.env, ...kv.env, GOOGLE_KEY_PATH: "", GOOGLE_KEY_NAME: "google-key", KEY_VAULT_URL: kv.vaultUrl }), "keyvault", "KEYVAULT_ACCESS_DENIED");
    assert.match(check.fix ?? "", /--role "Key Vault Secrets User"/);
  });

  it("--dns checks Google's SPF include and DKIM selector", async () => {
    dns.set(DOMAIN, { TXT: ["v=spf1 include:_spf.google.com ~all"] });
    dns.set(`google._domainkey.${DOMAIN}`, { TXT: [`v=DKIM1; k=rsa; p=${Buffer.alloc(294, 7).toString("base64")}`] });
    dns.set(`_dmarc.${DOMAIN}`, { TXT: ["v=DMARC1; p=none"] });
    const run = await doctor({ ...local.stack.env, DNS_SERVERS: dns.address }, { dns: true });
    for (const step of ["dns-spf", "dns-dkim", "dns-dmarc"] as const) assert.equal(run.check(step).status, "pass", run.text);
    assert.match(run.check("dns-spf").message, /includes _spf\.google\.com/);
    dns.set(`google._domainkey.${DOMAIN}`, undefined);
    const missing = await doctor({ ...local.stack.env, DNS_SERVERS: dns.address }, { dns: true });
    assert.match(assertFails(missing, "dns-dkim", "DNS_DKIM_MISSING").fix ?? "", /Authenticate email > contoso\.test > Generate new record/);
  });

  it("no output holds the private key or a token", () => {
    const keyLine = key.private_key.split("\n").find((line) => line.length >= 60) ?? key.private_key;
    assert.ok(outputs.length > 20);
    for (const text of outputs) {
      assert.ok(!text.includes(keyLine), "the private key appears in the output");
      assert.doesNotMatch(text, JWT, "a token or assertion appears in the output");
    }
  });
});
