// `queue-mailer template preview NAME --data data.json [--out DIR]`: renders a template exactly as
// the sender would (same engine, escaping, generated text part, same MIME mapping) and writes
// NAME.eml (open it in a mail client) and NAME.html (open it in a browser), so a person can look
// before shipping. Sends nothing and takes nothing from the queue.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import MailComposer from "nodemailer/lib/mail-composer";
import { loadTemplateConfig, readSettings } from "../shared/config.js";
import { MailerError } from "../shared/errors.js";
import { lazy } from "../shared/lazy.js";
import { containerTemplates, directoryTemplates, renderMessageJson } from "../shared/message/templates.js";
import { validateMessage } from "../shared/message/validate.js";
import { openContainer } from "../shared/storage/storageClients.js";
import { mailOptionsFor } from "../shared/transport/mailOptions.js";

const usage = "usage: queue-mailer template preview NAME --data data.json [--out DIR]\n";

export async function templateCommand(args: string[]): Promise<number> {
  const [subcommand, ...rest] = args;
  if (subcommand !== "preview") {
    process.stderr.write(usage);
    return 2;
  }
  const { values, positionals } = parseArgs({ args: rest, options: { data: { type: "string" }, out: { type: "string" } }, allowPositionals: true, strict: true });
  const [name, ...extra] = positionals;
  if (name === undefined || extra.length > 0 || values.data === undefined) {
    process.stderr.write(usage);
    return 2;
  }
  let data: unknown;
  try {
    data = JSON.parse(readFileSync(values.data, "utf8"));
  } catch (error) {
    throw new MailerError("TEMPLATE_DATA_INVALID", `${values.data} cannot be read as JSON: ${(error as Error).message}`, { kind: "permanent", hint: "Give --data a file holding one JSON object: the template's variables." });
  }
  const config = loadTemplateConfig(readSettings());
  const { dir, container } = config.templates;
  const storage = config.storage;
  // loadTemplateConfig gives storage settings whenever the templates are in a container.
  const renderer = dir !== undefined || storage === undefined || container === undefined ? directoryTemplates(dir ?? ".") : containerTemplates(lazy(() => openContainer(storage, container)));
  const from = config.mailFrom ?? "preview@example.com";
  // The same path as a queued message: render, then validate (a subject the template makes invalid is reported here).
  const message = validateMessage(await renderMessageJson({ to: "preview@example.com", template: name, data }, renderer), { from, id: `preview-${name}` });
  const eml = await new MailComposer(mailOptionsFor(message, from.replace(/^.*</, "").replace(/>.*$/, ""))).compile().build();
  const out = resolve(values.out ?? ".");
  mkdirSync(out, { recursive: true });
  const files = { eml: join(out, `${name}.eml`), html: join(out, `${name}.html`) };
  writeFileSync(files.eml, eml);
  writeFileSync(files.html, message.html ?? "");
  console.log(JSON.stringify({ template: name, from: renderer.where, subject: message.subject, ...files }));
  return 0;
}
