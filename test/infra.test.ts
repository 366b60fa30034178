// Deployment files against the code: infra/main.bicep, host.json and .funcignore are checked
// against settingSpecs (shared/config.ts), the table names exported by the code and the
// function registrations. Everything is computed from the code, so a new setting, table or queue
// fails here until the deployment is updated too.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { settingSpecs } from "../shared/config.js";
import { ALERT_TABLE } from "../shared/expiry/alertLedger.js";
import { CONNECTION_TABLE } from "../shared/send/connectionSlots.js";
import { DAILY_RECIPIENT_TABLE } from "../shared/send/dailyRecipientBudget.js";
import { MAILBOX_PAUSE_TABLE } from "../shared/send/mailboxPause.js";
import { RATE_TABLE } from "../shared/send/rateLimiter.js";
import { SEND_LEDGER_TABLE } from "../shared/send/sendLedger.js";
import { DELIVERY_EVENTS_TABLE } from "../shared/events/deliveryEvents.js";
import { SUPPRESSIONS_TABLE } from "../shared/bounces/suppressionList.js";

const bicep = readFileSync("infra/main.bicep", "utf8");
const specNames = settingSpecs.map((s) => s.name);
const specDefault = (name: string): string => {
  const value = settingSpecs.find((s) => s.name === name)?.default;
  assert.ok(value !== undefined, `${name} has no default in settingSpecs`);
  return value;
};

/** Settings the deployment sets that are read by the Functions host or the Azure SDK, not by shared/config.ts. */
const hostSettings = new Set([
  "AzureWebJobsStorage__credential",
  "AzureWebJobsStorage__clientId",
  "AZURE_CLIENT_ID",
  "APPLICATIONINSIGHTS_CONNECTION_STRING",
  "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
]);
/** On Flex Consumption these are rejected or ignored: the runtime and package come from functionAppConfig. */
const flexDeprecated = [
  "FUNCTIONS_WORKER_RUNTIME",
  "FUNCTIONS_EXTENSION_VERSION",
  "WEBSITE_RUN_FROM_PACKAGE",
  "WEBSITE_CONTENTSHARE",
  "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
  "WEBSITE_NODE_DEFAULT_VERSION",
];

/** The lines between `// app-settings:start` and `// app-settings:end`. */
function appSettingsRegion(): string[] {
  const lines = bicep.split("\n");
  const start = lines.findIndex((l) => l.startsWith("// app-settings:start"));
  const end = lines.findIndex((l) => l.startsWith("// app-settings:end"));
  assert.ok(start >= 0 && end > start, "infra/main.bicep has no // app-settings:start … // app-settings:end region");
  return lines.slice(start + 1, end);
}

/** App setting keys (`KEY: value` lines of the settings objects) with the raw value expression. */
function appSettings(): Map<string, string> {
  const settings = new Map<string, string>();
  for (const line of appSettingsRegion()) {
    const match = /^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.+?)\s*$/.exec(line);
    if (!match || line.trimStart().startsWith("//")) continue;
    assert.ok(!settings.has(match[1]!), `app setting ${match[1]} is set twice`);
    settings.set(match[1]!, match[2]!);
  }
  return settings;
}

/** Names in `// Settings not set here (reason): A, B` comment lines. */
function notSetHere(): Map<string, string> {
  const names = new Map<string, string>();
  for (const match of bicep.matchAll(/^\/\/ Settings not set here \(([^)]*)\):(.*)$/gm)) {
    for (const name of match[2]!.split(",").map((n) => n.trim()).filter(Boolean)) names.set(name, match[1]!);
  }
  return names;
}

/** `param name type = default`: the default as the app would read it when it is a literal. */
function bicepParams(): Map<string, { type: string; literal?: string }> {
  const params = new Map<string, { type: string; literal?: string }>();
  for (const match of bicep.matchAll(/^param (\w+) (\w+)(?: = (.+))?$/gm)) {
    const [, name, type, value] = match;
    const literal = value === undefined ? undefined : /^'([^']*)'$/.exec(value)?.[1] ?? (/^-?\d+$/.test(value) ? value : undefined);
    params.set(name!, { type: type!, ...(literal === undefined ? {} : { literal }) });
  }
  return params;
}

/** The parameter an app setting is set from (`KEY: param` or `KEY: string(param)`), if any. */
function paramFor(setting: string): string | undefined {
  const value = appSettings().get(setting);
  const match = value === undefined ? null : /^(?:string\((\w+)\)|(\w+))$/.exec(value);
  const name = match?.[1] ?? match?.[2];
  return name !== undefined && bicepParams().has(name) ? name : undefined;
}

/** The text of the resource declaration that starts with `resource <symbol>` (up to the next top-level line). */
function resourceBlock(typePrefix: string): string[] {
  const blocks: string[] = [];
  const lines = bicep.split("\n");
  lines.forEach((line, index) => {
    if (!line.startsWith("resource ") || !line.includes(`'${typePrefix}@`)) return;
    const end = lines.findIndex((l, i) => i > index && /^[}\]]/.test(l));
    blocks.push(lines.slice(index, end + 1).join("\n"));
  });
  return blocks;
}

/**
 * host.json may carry // and /* *\/ comments (the Functions host accepts them). Strip them outside
 * string literals only, so URLs and values such as "[4.*, 5.0.0)" stay intact.
 */
function stripJsonComments(text: string): string {
  let out = "";
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (inString) {
      out += c;
      if (c === "\\") out += text[++i] ?? "";
      else if (c === '"') inString = false;
    } else if (c === '"') {
      inString = true;
      out += c;
    } else if (c === "/" && text[i + 1] === "/") {
      while (i < text.length && text[i] !== "\n") i++;
      out += "\n";
    } else if (c === "/" && text[i + 1] === "*") {
      const close = text.indexOf("*/", i + 2);
      i = close < 0 ? text.length : close + 1;
    } else {
      out += c;
    }
  }
  return out;
}

interface HostJson {
  version: string;
  functionTimeout?: string;
  logging?: { applicationInsights?: { samplingSettings?: { isEnabled?: boolean; excludedTypes?: string } } };
  extensionBundle: { id: string; version: string };
  extensions: { queues: { batchSize: number; newBatchThreshold: number; maxDequeueCount: number; visibilityTimeout: string; maxPollingInterval: string; messageEncoding: string } };
}
const hostJson = (): HostJson => JSON.parse(stripJsonComments(readFileSync("host.json", "utf8"))) as HostJson;

/**
 * What `func azure functionapp publish` does with .funcignore: Azure Functions Core Tools'
 * GitIgnoreParser (a port of codemix/gitignore-parser). Patterns match from the start of the
 * relative path, a leading "/" is dropped, "*" does not cross "/", "**" does, and any "!" pattern
 * that matches wins.
 */
function funcIgnore(content: string): { accepts(path: string): boolean } {
  const lists: [string[], string[]] = [[], []];
  for (const raw of content.split("\n")) {
    let line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const negative = line.startsWith("!");
    if (negative) line = line.slice(1);
    if (line.startsWith("/")) line = line.slice(1);
    lists[negative ? 1 : 0].push(line);
  }
  const pattern = (p: string) => p.replace(/[-[\]/{}()+?.\\^$|]/g, "\\$&").replaceAll("**", "(.+)").replaceAll("*", "([^\\/]+)");
  const compile = (list: string[]) => (list.length > 0 ? new RegExp(`^((${list.map(pattern).join(")|(")}))`) : /$^/);
  const [positive, negative] = [compile(lists[0]), compile(lists[1])];
  return { accepts: (path) => negative.test(path) || !positive.test(path) };
}

describe("infra/main.bicep app settings", () => {
  it("names every setting in settingSpecs, as an app setting or in a 'Settings not set here' list", () => {
    const set = appSettings();
    const listed = notSetHere();
    const missing = specNames.filter((name) => !set.has(name) && !listed.has(name));
    assert.deepEqual(missing, [], "add these to infra/main.bicep as app settings or to a // Settings not set here (…): list");
    const both = specNames.filter((name) => set.has(name) && listed.has(name));
    assert.deepEqual(both, [], "set and listed as not set");
  });

  it("sets and lists only settings the code or the host reads", () => {
    const unknownSet = [...appSettings().keys()].filter((name) => !specNames.includes(name) && !hostSettings.has(name));
    assert.deepEqual(unknownSet, [], "not in settingSpecs nor in the host allowlist of this test");
    const unknownListed = [...notSetHere().keys()].filter((name) => !specNames.includes(name));
    assert.deepEqual(unknownListed, [], "listed as not set here but not in settingSpecs (stale)");
    const deprecated = flexDeprecated.filter((name) => appSettings().has(name));
    assert.deepEqual(deprecated, [], "Flex Consumption rejects or ignores these");
  });

  it("every settings object in the region is applied to the app", () => {
    for (const match of appSettingsRegion().join("\n").matchAll(/^var (\w+) = /gm)) {
      const uses = bicep.match(new RegExp(`\\b${match[1]}\\b`, "g"))?.length ?? 0;
      assert.ok(uses > 1, `var ${match[1]} is declared but never used`);
    }
    assert.match(bicep, /resource \w+ 'Microsoft\.Web\/sites\/config@[\d-]+' = \{\s*parent: functionApp\s*name: 'appsettings'\s*properties: union\(hostSettings, mailerSettings, authSettings, webhookSettings(?:, \w+)*\)/);
  });

  it("parameter defaults equal the settingSpecs defaults of the settings they feed", () => {
    const params = bicepParams();
    let compared = 0;
    for (const name of appSettings().keys()) {
      const param = paramFor(name);
      const spec = settingSpecs.find((s) => s.name === name);
      const literal = param === undefined ? undefined : params.get(param)?.literal;
      if (spec?.default === undefined || literal === undefined) continue;
      assert.equal(literal, spec.default, `param ${param} (app setting ${name})`);
      compared++;
    }
    assert.ok(compared >= 5, `only ${compared} defaults compared; did the parameter names change?`);
  });

  it("host storage is identity-based for the connection the queue trigger names", () => {
    const source = readFileSync("functions/sendEmail.ts", "utf8");
    const connection = /connection:\s*"(\w+)"/.exec(source)?.[1];
    assert.equal(connection, "AzureWebJobsStorage");
    const set = appSettings();
    assert.equal(set.get(`${connection}__credential`), "'managedidentity'");
    for (const service of ["queue", "table", "blob"]) {
      assert.equal(set.get(`${connection}__${service}ServiceUri`), `storage.properties.primaryEndpoints.${service}`);
    }
    assert.equal(set.get(`${connection}__clientId`), "identity.properties.clientId");
    assert.equal(set.get("AZURE_CLIENT_ID"), "identity.properties.clientId", "DefaultAzureCredential must pick the user-assigned identity");
    assert.ok(!set.has(connection), "no connection string: the account has shared keys turned off");
    assert.doesNotMatch(bicep, /listKeys\(/);
  });

  it("the parameters file names only parameters main.bicep declares", () => {
    const file = JSON.parse(readFileSync("infra/main.parameters.json", "utf8")) as { parameters: Record<string, { value: unknown }> };
    const declared = bicepParams();
    assert.deepEqual(Object.keys(file.parameters).filter((name) => !declared.has(name)), []);
  });
});

describe("infra/main.bicep resources", () => {
  it("Flex Consumption, Node.js 22, one user-assigned identity for everything", () => {
    assert.match(bicep, /sku: \{\s*name: 'FC1'\s*tier: 'FlexConsumption'\s*\}/);
    assert.match(bicep, /kind: 'functionapp,linux'/);
    assert.match(bicep, /runtime: \{\s*name: 'node'\s*version: '22'\s*\}/);
    assert.match(bicep, /type: 'blobContainer'[\s\S]*?type: 'UserAssignedIdentity'/);
    assert.match(bicep, /identity: \{\s*type: 'UserAssigned'/);
    assert.doesNotMatch(bicep, /SystemAssigned'/);
  });

  it("storage without shared keys, TLS 1.2; Key Vault in RBAC mode", () => {
    assert.match(bicep, /allowSharedKeyAccess: false/);
    assert.match(bicep, /minimumTlsVersion: 'TLS1_2'/);
    assert.match(bicep, /allowBlobPublicAccess: false/);
    assert.match(bicep, /enableRbacAuthorization: true/);
  });

  it("creates every table the code uses", () => {
    const tables = /^var appTables = \[([\s\S]*?)\]/m.exec(bicep)?.[1] ?? "";
    for (const table of [SEND_LEDGER_TABLE, ALERT_TABLE, RATE_TABLE, CONNECTION_TABLE, MAILBOX_PAUSE_TABLE, DAILY_RECIPIENT_TABLE, DELIVERY_EVENTS_TABLE, SUPPRESSIONS_TABLE]) {
      assert.match(tables, new RegExp(`'${table}'`), `table ${table}`);
    }
    const [block] = resourceBlock("Microsoft.Storage/storageAccounts/tableServices/tables");
    assert.match(block ?? "", /for \w+ in appTables:/);
  });

  it("creates the mail queue and its poison queue with the code's names", () => {
    const param = paramFor("MAIL_QUEUE");
    assert.ok(param, "MAIL_QUEUE is set from a parameter");
    assert.equal(bicepParams().get(param)?.literal, specDefault("MAIL_QUEUE"));
    // shared/config.ts: poisonQueueName = `${queueName}-poison`
    const poisonVar = new RegExp(`^var (\\w+) = '\\$\\{${param}\\}-poison'$`, "m").exec(bicep)?.[1];
    assert.ok(poisonVar, "a var '${mailQueue}-poison'");
    const [block] = resourceBlock("Microsoft.Storage/storageAccounts/queueServices/queues");
    assert.match(block ?? "", new RegExp(`for \\w+ in \\[${param}, ${poisonVar}\\]`));
  });

  it("creates the attachments container and the deployment package container", () => {
    const param = paramFor("ATTACHMENT_CONTAINER");
    assert.ok(param, "ATTACHMENT_CONTAINER is set from a parameter");
    assert.equal(bicepParams().get(param)?.literal, specDefault("ATTACHMENT_CONTAINER"));
    const containers = resourceBlock("Microsoft.Storage/storageAccounts/blobServices/containers");
    assert.ok(containers.some((b) => new RegExp(`name: ${param}\\b`).test(b)), "a container named by the ATTACHMENT_CONTAINER parameter");
    const deployment = /value: '\$\{storage\.properties\.primaryEndpoints\.blob\}\$\{(\w+)\}'/.exec(bicep)?.[1];
    assert.ok(deployment && containers.some((b) => new RegExp(`name: ${deployment}\\b`).test(b)), "the functionAppConfig deployment container is created");
  });

  it("role definitions: the right GUID for each role, assigned by signingMode", () => {
    const block = /^var roles = \{([\s\S]*?)^\}/m.exec(bicep)?.[1] ?? "";
    const roles = Object.fromEntries([...block.matchAll(/(\w+): '([0-9a-f-]{36})'/g)].map((m) => [m[1], m[2]]));
    const expected = {
      keyVaultCertificateUser: "db79e9a7-68ee-4b58-9aeb-b90e7c24fcba",
      keyVaultSecretsUser: "4633458b-17de-408a-b874-0445c86b69e6",
      keyVaultCryptoUser: "12338af0-0e69-4776-bea7-57ae8d297424",
      keyVaultReader: "21090545-7ca7-4776-b22c-e363652d74d2",
      storageBlobDataOwner: "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
      storageQueueDataContributor: "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
      storageTableDataContributor: "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    };
    for (const [name, guid] of Object.entries(expected)) {
      assert.equal(roles[name], guid, `roles.${name}`);
      assert.match(bicep, new RegExp(`roles\\.${name}\\b`), `roles.${name} is assigned somewhere`);
    }
    // certificate: export → Certificate User, remote → Crypto User; the secret-based methods →
    // Secrets User when they name a vault secret; Reader always (expiry watch).
    assert.match(bicep, /^var appVaultSigningRoles = !usesCertificate \? \[\] : signingMode == 'export' \? \[roles\.keyVaultCertificateUser\] : \[roles\.keyVaultCryptoUser\]$/m);
    assert.match(bicep, /^var credentialSecretNames = filter\(\[clientSecretName, googleKeySecretName, mailboxPasswordSecretName\]/m);
    assert.match(bicep, /^var appVaultSecretRoles = empty\(expiryWebhookSecretName\) && empty\(credentialSecretNames\) \? \[\] : \[roles\.keyVaultSecretsUser\]$/m);
    assert.match(bicep, /^var appVaultRoles = concat\(appVaultSigningRoles, \[roles\.keyVaultReader\], appVaultSecretRoles\)$/m);
    // Each secret setting comes from the parameter of the same meaning, and the method from authMethod.
    assert.equal(appSettings().get("AUTH_METHOD"), "authMethod");
    assert.equal(appSettings().get("CLIENT_SECRET_NAME"), "clientSecretName");
    assert.equal(appSettings().get("GOOGLE_KEY_NAME"), "googleKeySecretName");
    assert.equal(appSettings().get("MAILBOX_PASSWORD_NAME"), "mailboxPasswordSecretName");
    assert.match(appSettings().get("CERT_SIGNING") ?? "", /signingMode == 'remote' \? 'vault' : 'local'/);
    const [storageRoles] = resourceBlock("Microsoft.Authorization/roleAssignments").filter((b) => b.includes("scope: storage") && b.includes("identity.properties.principalId"));
    for (const role of ["storageBlobDataOwner", "storageQueueDataContributor", "storageTableDataContributor"]) {
      assert.match(storageRoles ?? "", new RegExp(`roles\\.${role}\\b`), `the app identity gets ${role}`);
    }
  });

  it("alert rules match the records the code writes", () => {
    assert.match(bicep, /message contains '"event":"expiry\.alert"'/);
    assert.match(bicep, /message contains '"event":"message\.poisoned"'/);
    assert.match(bicep, /message contains '"event":"circuit\.open"'/);
    // The same event names in the code, so renaming one breaks this test instead of the alert.
    assert.match(readFileSync("shared/expiry/channels/logChannel.ts", "utf8"), /"expiry\.alert"/);
    assert.match(readFileSync("shared/queue/handleQueueMessage.ts", "utf8"), /"message\.poisoned"/);
    assert.match(readFileSync("shared/send/circuitBreaker.ts", "utf8"), /"circuit\.open"/);
    assert.equal(resourceBlock("Microsoft.Insights/scheduledQueryRules").length, 3);
    // Sampling must not drop the traces these rules count.
    assert.match(hostJson().logging?.applicationInsights?.samplingSettings?.excludedTypes ?? "", /\bTrace\b/);
  });
});

describe("host.json", () => {
  it("comments are stripped outside strings only", () => {
    const parsed = JSON.parse(stripJsonComments('{ // note\n "url": "https://x/y", /* block */ "v": "[4.*, 5.0.0)", "q": "a\\"//b" }'));
    assert.deepEqual(parsed, { url: "https://x/y", v: "[4.*, 5.0.0)", q: 'a"//b' });
  });

  it("maxDequeueCount equals MAX_DEQUEUE_COUNT, messages reach the handler as sent, bundle 4.x", () => {
    const host = hostJson();
    assert.equal(host.version, "2.0");
    assert.equal(host.extensions.queues.maxDequeueCount, Number(specDefault("MAX_DEQUEUE_COUNT")));
    assert.equal(host.extensions.queues.messageEncoding, "none");
    assert.equal(host.extensionBundle.id, "Microsoft.Azure.Functions.ExtensionBundle");
    assert.equal(host.extensionBundle.version, "[4.*, 5.0.0)");
  });

  it("one instance runs at most SMTP_MAX_CONNECTIONS sends at once", () => {
    // The host runs up to batchSize + newBatchThreshold invocations per instance. Sends beyond the
    // pool's maxConnections would not open more connections (nodemailer queues them in the process),
    // so Exchange's limit holds either way. What this asserts is that no invocation waits for a
    // pooled connection while it keeps its message hidden from other instances and uses up its
    // function timeout.
    const { batchSize, newBatchThreshold } = hostJson().extensions.queues;
    assert.ok(Number.isInteger(batchSize) && batchSize >= 1 && batchSize <= 32, `batchSize ${batchSize}`);
    assert.ok(Number.isInteger(newBatchThreshold) && newBatchThreshold >= 0, `newBatchThreshold ${newBatchThreshold}`);
    assert.ok(batchSize + newBatchThreshold <= Number(specDefault("SMTP_MAX_CONNECTIONS")), `batchSize ${batchSize} + newBatchThreshold ${newBatchThreshold}`);
  });

  it("timeouts are valid TimeSpans and bounded", () => {
    const seconds = (value: string | undefined) => {
      const match = /^(\d{2}):(\d{2}):(\d{2})$/.exec(value ?? "");
      assert.ok(match, `not hh:mm:ss: ${value}`);
      return Number(match[1]) * 3600 + Number(match[2]) * 60 + Number(match[3]);
    };
    const host = hostJson();
    const timeout = seconds(host.functionTimeout);
    assert.ok(timeout > 0 && timeout <= 30 * 60, "functionTimeout within Flex Consumption's default of 30 minutes");
    assert.ok(seconds(host.extensions.queues.visibilityTimeout) > 0);
    assert.ok(seconds(host.extensions.queues.maxPollingInterval) >= 1);
  });
});

describe(".funcignore", () => {
  const ignore = funcIgnore(readFileSync(".funcignore", "utf8"));

  it("ships the compiled functions, host.json, package.json and production modules", () => {
    for (const path of ["dist/functions/sendEmail.js", "dist/functions/expiryWatch.js", "dist/shared/config.js", "host.json", "package.json", "node_modules/nodemailer/lib/nodemailer.js", "node_modules/some-package/bin/run.js", "node_modules/some-package/test/x.js"]) {
      assert.ok(ignore.accepts(path), `${path} must be published`);
    }
  });

  it("leaves out tests, local state and settings, and the TypeScript sources", () => {
    for (const path of ["test/infra.test.ts", "test/support/harness.ts", ".local/dev-client.pem", ".local/outbox/a.eml", "local.settings.json", ".test-ca/ca.pem", "functions/sendEmail.ts", "shared/config.ts", "cli/main.ts", "infra/main.bicep", "__azurite_db_queue__.json"]) {
      assert.ok(!ignore.accepts(path), `${path} must not be published`);
    }
  });

  it("the matcher follows Core Tools' rules: prefix match, '*' within one path segment, '!' wins", () => {
    const sample = funcIgnore("*.ts\n!dist/**\ntest\n");
    assert.ok(!sample.accepts("index.ts"));
    assert.ok(sample.accepts("src/index.ts"), "'*' does not cross '/'");
    assert.ok(sample.accepts("dist/index.ts"));
    assert.ok(!sample.accepts("test/a.js"));
  });
});
