// Templates (issue 14): a message names a template and gives data; the sender renders it with
// Handlebars (HTML-escaped, subject made one line), generates the text part from the HTML when the
// template has none, picks up an updated blob template, and poisons a missing template or variable
// with TEMPLATE_NOT_FOUND / TEMPLATE_DATA_MISSING naming it. Through the real worker, queue, blob
// storage and SMTP server; the CLI's `template preview` and `enqueue --template` as processes.
import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { before, describe, it } from "node:test";
import { simpleParser } from "mailparser";
import { runWorker } from "../cli/worker.js";
import { loadSendConfig, loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { createMailer } from "../shared/mailer.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { openContainer } from "../shared/storage/storageClients.js";
import { spawnCli } from "./support/cli.js";
import { capturingLogger, drain, readPoison, useLocalStack } from "./support/harness.js";

const HOSTILE = "<script>alert(1)</script>\r\nBcc: evil@example.test";

describe("message templates", () => {
  const local = useLocalStack("qm-templates-");
  let templateDir = "";
  const dirEnv = (queue: string) => ({ ...local.stack.env, MAIL_QUEUE: queue, TEMPLATE_DIR: templateDir });
  const delivered = (to: string) => local.stack.smtp.messages.filter((m) => m.rcptTo.includes(to));

  before(() => {
    templateDir = join(local.workDir, "templates");
    mkdirSync(join(templateDir, "welcome"), { recursive: true });
    writeFileSync(join(templateDir, "welcome", "subject.hbs"), "Welcome, {{name}}!");
    writeFileSync(join(templateDir, "welcome", "html.hbs"), "<h1>Hello {{name}}</h1><p>Your code is <b>{{code}}</b>.</p>");
    mkdirSync(join(templateDir, "receipt"), { recursive: true });
    writeFileSync(join(templateDir, "receipt", "subject.txt"), "Receipt {{order}}");
    writeFileSync(join(templateDir, "receipt", "html.html"), "<p>Order {{order}}</p>");
    writeFileSync(join(templateDir, "receipt", "text.txt"), "Order {{order}} (written text part) & more");
  });

  it("renders with escaping: a data value with <script> and CRLF arrives inert; text generated from HTML", { timeout: 30_000 }, async () => {
    const env = dirEnv("tpl-escape");
    const { queue } = await openMailQueues(loadStorageConfig(env));
    await enqueueEmail(queue, { id: "tpl-1", to: "escape@example.test", template: "welcome", data: { name: HOSTILE, code: "A&B" } });
    const summary = await drain(env, capturingLogger());
    assert.deepEqual({ sent: summary.sent, poisoned: summary.poisoned }, { sent: 1, poisoned: 0 });
    const [message] = delivered("escape@example.test");
    assert.ok(message, "delivered");
    // CRLF in data never starts a header: no Bcc header, no extra recipient.
    assert.deepEqual(message.rcptTo, ["escape@example.test"]);
    assert.equal(message.headers["bcc"], undefined);
    assert.equal(message.headers["subject"]?.length, 1);
    const parsed = await simpleParser(message.raw);
    assert.equal(parsed.subject, "Welcome, <script>alert(1)</script> Bcc: evil@example.test!", "one line, the value shown as text");
    const html = String(parsed.html);
    assert.ok(!html.includes("<script>"), html);
    assert.ok(html.includes("&lt;script&gt;alert(1)&lt;/script&gt;"), html);
    assert.ok(html.includes("<b>A&amp;B</b>"), html);
    // The text part, generated from the HTML: the words, no markup.
    const text = parsed.text ?? "";
    assert.match(text, /Your code is A&B\./);
    assert.match(text, /HELLO|Hello/);
    assert.ok(!text.includes("<b>") && !text.includes("<p>"), text);
  });

  it("a written text part is used as it is (not HTML-escaped)", { timeout: 30_000 }, async () => {
    const env = dirEnv("tpl-text");
    const { queue } = await openMailQueues(loadStorageConfig(env));
    await enqueueEmail(queue, { id: "tpl-2", to: "text@example.test", template: "receipt", data: { order: "42 <x>" } });
    await drain(env, capturingLogger());
    const [message] = delivered("text@example.test");
    assert.ok(message);
    const parsed = await simpleParser(message.raw);
    assert.equal(parsed.subject, "Receipt 42 <x>");
    assert.equal(parsed.text?.trim(), "Order 42 <x> (written text part) & more");
    assert.match(String(parsed.html), /Order 42 &lt;x&gt;/);
  });

  it("a missing template and a missing variable are poisoned with their codes, naming them", { timeout: 30_000 }, async () => {
    const env = dirEnv("tpl-missing");
    const { queue } = await openMailQueues(loadStorageConfig(env));
    await enqueueEmail(queue, { id: "tpl-3", to: "missing@example.test", template: "no-such-template", data: {} });
    await enqueueEmail(queue, { id: "tpl-4", to: "missing@example.test", template: "welcome", data: { name: "Ann" } });
    const summary = await drain(env, capturingLogger());
    assert.deepEqual({ sent: summary.sent, poisoned: summary.poisoned }, { sent: 0, poisoned: 2 });
    assert.equal(delivered("missing@example.test").length, 0);
    const reasons = (await readPoison(summary.mailer)).map((r) => r.reason).sort((a, b) => a.code.localeCompare(b.code));
    assert.deepEqual(reasons.map((r) => r.code), ["TEMPLATE_DATA_MISSING", "TEMPLATE_NOT_FOUND"]);
    assert.match(reasons[0]?.message ?? "", /"welcome".*"code"/);
    assert.match(reasons[1]?.message ?? "", /"no-such-template"/);
  });

  it("a message with a template and a subject, or a path as template name, is refused at enqueue", { timeout: 10_000 }, async () => {
    const { queue } = await openMailQueues(loadStorageConfig(dirEnv("tpl-refused")));
    await assert.rejects(enqueueEmail(queue, { to: "x@example.test", template: "welcome", subject: "s" } as never), (e: { code?: string }) => e.code === "MESSAGE_INVALID_TEMPLATE");
    await assert.rejects(enqueueEmail(queue, { to: "x@example.test", template: "../etc" }), (e: { code?: string }) => e.code === "MESSAGE_INVALID_TEMPLATE");
    await assert.rejects(enqueueEmail(queue, { to: "x@example.test", template: "welcome", data: [] as never }), (e: { code?: string }) => e.code === "MESSAGE_INVALID_TYPE");
  });

  it("blob templates (TEMPLATE_CONTAINER) are picked up after an update", { timeout: 30_000 }, async () => {
    const env = { ...local.stack.env, MAIL_QUEUE: "tpl-blob", TEMPLATE_CONTAINER: "mail-templates" };
    const storage = loadStorageConfig(env);
    const container = await openContainer(storage, "mail-templates");
    await container.createIfNotExists();
    const put = (name: string, text: string) => container.getBlockBlobClient(name).upload(text, Buffer.byteLength(text));
    await put("promo/subject.hbs", "Offer for {{name}}");
    await put("promo/html.hbs", "<p>Version one for {{name}}</p>");
    const { queue } = await openMailQueues(storage);
    // One mailer for both sends: the second must not come from a stale cache.
    const logger = capturingLogger();
    const mailer = createMailer(loadSendConfig(env), logger);
    try {
      await enqueueEmail(queue, { id: "tpl-5", to: "blob1@example.test", template: "promo", data: { name: "Bo" } });
      await runWorker({ mailer, logger, drain: true, maxPollIntervalMs: 100 });
      await put("promo/html.hbs", "<p>Version two for {{name}}</p>");
      await new Promise((resolve) => setTimeout(resolve, 1_100)); // the listing is reused for up to 1 s
      await enqueueEmail(queue, { id: "tpl-6", to: "blob2@example.test", template: "promo", data: { name: "Bo" } });
      await runWorker({ mailer, logger, drain: true, maxPollIntervalMs: 100 });
    } finally {
      await mailer.close();
    }
    const first = await simpleParser(delivered("blob1@example.test")[0]?.raw ?? Buffer.alloc(0));
    const second = await simpleParser(delivered("blob2@example.test")[0]?.raw ?? Buffer.alloc(0));
    assert.equal(first.subject, "Offer for Bo");
    assert.match(String(first.html), /Version one for Bo/);
    assert.match(String(second.html), /Version two for Bo/);
  });

  it("`template preview NAME --data --out` writes the rendered .eml and .html; `enqueue --template --data` sends it", { timeout: 30_000 }, async () => {
    const dataFile = join(local.workDir, "data.json");
    writeFileSync(dataFile, JSON.stringify({ name: "<i>Cy</i>", code: "123" }));
    const out = join(local.workDir, "preview");
    const env = dirEnv("tpl-cli");
    const preview = await spawnCli(["template", "preview", "welcome", "--data", dataFile, "--out", out], { env: { TEMPLATE_DIR: templateDir, MAIL_FROM: "sender@example.test" } });
    assert.equal(preview.status, 0, preview.stderr);
    const eml = await simpleParser(readFileSync(join(out, "welcome.eml")));
    assert.equal(eml.subject, "Welcome, <i>Cy</i>!");
    assert.match(eml.text ?? "", /Your code is 123/);
    const html = readFileSync(join(out, "welcome.html"), "utf8");
    assert.equal(html, "<h1>Hello &lt;i&gt;Cy&lt;/i&gt;</h1><p>Your code is <b>123</b>.</p>");

    const missing = await spawnCli(["template", "preview", "welcome", "--data", writeJson(local.workDir, "partial.json", { name: "x" })], { env: { TEMPLATE_DIR: templateDir } });
    assert.equal(missing.status, 1);
    assert.match(missing.stderr, /TEMPLATE_DATA_MISSING: .*"code"/);

    const enqueued = await spawnCli(["enqueue", "--to", "cli@example.test", "--template", "welcome", "--data", dataFile], { env });
    assert.equal(enqueued.status, 0, enqueued.stderr);
    await drain(env, capturingLogger());
    const [message] = delivered("cli@example.test");
    assert.ok(message, "delivered");
    assert.equal((await simpleParser(message.raw)).subject, "Welcome, <i>Cy</i>!");
  });
});

function writeJson(dir: string, name: string, value: unknown): string {
  const path = join(dir, name);
  writeFileSync(path, JSON.stringify(value));
  return path;
}
