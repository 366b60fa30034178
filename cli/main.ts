// The `queue-mailer` command. `--help` needs no settings; each command checks only the settings it
// needs and names every missing or invalid one before it touches the queue.
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { parseArgs } from "node:util";
import { loadExpiryConfig, loadSendConfig, loadStorageConfig, readSettings } from "../shared/config.js";
import { findingsTable } from "../shared/expiry/report.js";
import { collectFindings, expirySourcesFor } from "../shared/expiry/runExpiryWatch.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { MailerError } from "../shared/errors.js";
import { jsonLineLogger, type LogLevel } from "../shared/log.js";
import { createMailer } from "../shared/mailer.js";
import type { EmailMessageInput } from "../shared/message/schema.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { openContainer } from "../shared/storage/storageClients.js";
import { authorizeCommand } from "./authorizeCommand.js";
import { bouncesCommand } from "./bouncesCommand.js";
import { doctorCommand } from "./doctorCommand.js";
import { poisonCommand } from "./poisonCommand.js";
import { statusCommand } from "./statusCommand.js";
import { suppressionCommand } from "./suppressionCommand.js";
import { templateCommand } from "./templateCommand.js";
import { runWorker } from "./worker.js";

const usage = `queue-mailer: queued transactional email over Outlook SMTP with OAuth2 (XOAUTH2)

Usage:
  queue-mailer worker [--drain]       Send messages from MAIL_QUEUE (like the Functions host does).
                                      --drain: exit 0 once no message is visible and none is in flight.
  queue-mailer enqueue [options]      Validate a message and put it on MAIL_QUEUE.
      --to ADDRESS (repeatable)  --cc ADDRESS  --bcc ADDRESS  --from ADDRESS  --reply-to ADDRESS
      --subject TEXT  --text TEXT  --html HTML  --id KEY  --header "Name: value" (repeatable)
      --attach FILE (repeatable)      Attach a file (messages over 64 KiB travel as a claim check blob).
      --file message.json             Read the whole message (schema v1) from a file instead.
      --template NAME --data data.json
                                      Render template NAME (TEMPLATE_DIR or TEMPLATE_CONTAINER) with
                                      the JSON object in data.json when sent, instead of --subject/--text/--html.
      --send-at ISO-8601              Not sent before then (e.g. 2030-01-31T09:00:00Z).
      --expires-at ISO-8601           Not sent after then: poisoned with MESSAGE_EXPIRED instead.
  queue-mailer expiry [--json]        Report certificates and secrets by expiry (Key Vault, CERT_PATH, app
                                      registration). Exits 1 when anything is expired, within
                                      EXPIRY_CRITICAL_DAYS, or could not be checked. Sends and stores nothing.
  queue-mailer poison list [--json]   Show poisoned messages with their reasons.
  queue-mailer poison requeue (--id ID ... | --all)
                                      Put poisoned messages back on MAIL_QUEUE after a fix.
  queue-mailer doctor [--json] [--send-test ADDRESS] [--dns]
                                      Check the setup step by step (settings, storage, Key Vault,
                                      credential, token, transport) and print the fix for each
                                      failure. Takes no queue message; sends mail only with
                                      --send-test; --dns checks SPF, DKIM and DMARC of the From
                                      domain. Exits 1 when a step failed, 2 for bad arguments.
  queue-mailer authorize [--device-code] [--timeout SECONDS]
                                      AUTH_METHOD=refresh-token: a user signs in once (browser, with
                                      a redirect to http://localhost; --device-code: a code to enter
                                      on any device) and the refresh token is stored in
                                      REFRESH_TOKEN_NAME or REFRESH_TOKEN_PATH. Waits 300 s at most.
  queue-mailer status ID [--json]     What happened to message ID (sent, retried, poisoned, ...),
                                      newest last, from the deliveryevents table. Exits 1 if unknown.
  queue-mailer bounces [--json]       Read the sending mailbox over IMAP once now (as the bounceWatch
                                      timer does): bounce reports for our messages go on the
                                      suppression list and to BOUNCE_DONE_FOLDER; other mail is left
                                      alone. Prints what was found and suppressed; exits 1 with the
                                      error code when the pass failed.
  queue-mailer suppression list [--json]
                                      Addresses the sender leaves out (bounced, or added by hand),
                                      with why and since when.
  queue-mailer suppression add ADDRESS [--reason TEXT]
  queue-mailer suppression remove ADDRESS
                                      Stop sending to ADDRESS, or send to it again.
  queue-mailer template preview NAME --data data.json [--out DIR]
                                      Render template NAME (TEMPLATE_DIR or TEMPLATE_CONTAINER) and
                                      write NAME.eml and NAME.html to DIR (default: the current folder).
  queue-mailer --help                 This text.

Settings come from the environment and from local.settings.json "Values" (environment wins).
See README.md for every setting.
`;

async function enqueueCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({
    args,
    options: {
      to: { type: "string", multiple: true },
      cc: { type: "string", multiple: true },
      bcc: { type: "string", multiple: true },
      from: { type: "string" },
      "reply-to": { type: "string", multiple: true },
      subject: { type: "string" },
      text: { type: "string" },
      html: { type: "string" },
      id: { type: "string" },
      header: { type: "string", multiple: true },
      file: { type: "string" },
      attach: { type: "string", multiple: true },
      "send-at": { type: "string" },
      "expires-at": { type: "string" },
      template: { type: "string" },
      data: { type: "string" },
    },
    strict: true,
  });
  // Typed loosely on purpose: enqueueEmail validates it, the template form included.
  let message: EmailMessageInput & { template?: string; data?: Record<string, unknown> };
  if (values.file) {
    message = JSON.parse(readFileSync(values.file, "utf8")) as EmailMessageInput;
  } else {
    const headers = Object.fromEntries((values.header ?? []).map((h) => {
      const colon = h.indexOf(":");
      return [h.slice(0, colon).trim(), h.slice(colon + 1).trim()];
    }));
    const list = (v: string[] | undefined) => (v === undefined ? undefined : v.length === 1 ? v[0] : v);
    message = Object.fromEntries(Object.entries({
      to: list(values.to),
      cc: list(values.cc),
      bcc: list(values.bcc),
      replyTo: list(values["reply-to"]),
      from: values.from,
      subject: values.subject,
      text: values.text,
      html: values.html,
      id: values.id,
      headers: Object.keys(headers).length > 0 ? headers : undefined,
    }).filter(([, v]) => v !== undefined)) as unknown as EmailMessageInput;
  }
  // Scheduling and templates apply to a message from --file as well.
  if (values["send-at"] !== undefined) message.sendAt = values["send-at"];
  if (values["expires-at"] !== undefined) message.expiresAt = values["expires-at"];
  if (values.template !== undefined) message.template = values.template;
  if (values.data !== undefined) message.data = JSON.parse(readFileSync(values.data, "utf8")) as Record<string, unknown>;
  if (values.attach) {
    message.attachments = [
      ...(message.attachments ?? []),
      ...values.attach.map((path) => ({ filename: basename(path), content: readFileSync(path).toString("base64") })),
    ];
  }
  const storage = loadStorageConfig(readSettings());
  const { queue } = await openMailQueues(storage);
  const result = await enqueueEmail({ queue, attachments: await openContainer(storage, storage.attachmentContainer) }, message);
  console.log(JSON.stringify({ enqueued: true, queue: storage.queueName, ...result }));
  return 0;
}

async function workerCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { drain: { type: "boolean" }, "log-level": { type: "string" } }, strict: true });
  const config = loadSendConfig(readSettings());
  const logger = jsonLineLogger((line) => process.stderr.write(line + "\n"), (values["log-level"] as LogLevel | undefined) ?? "info");
  const mailer = createMailer(config, logger);
  const stop = new AbortController();
  // SIGTERM/SIGINT: stop taking messages, finish what is in flight, close the pool.
  const onSignal = () => stop.abort();
  process.once("SIGTERM", onSignal);
  process.once("SIGINT", onSignal);
  try {
    const { circuitOpen, ...summary } = await runWorker({ mailer, logger, drain: values.drain === true, signal: stop.signal });
    console.log(JSON.stringify({ worker: "stopped", ...summary }));
    if (circuitOpen) {
      process.stderr.write(`queue-mailer worker: cannot make progress, sending is paused: ${circuitOpen.code}: ${circuitOpen.message}\n${circuitOpen.hint ? `hint: ${circuitOpen.hint}\n` : ""}Messages are still in the queue.\n`);
      return 3;
    }
    return 0;
  } finally {
    await mailer.close();
  }
}

async function expiryCommand(args: string[]): Promise<number> {
  const { values } = parseArgs({ args, options: { json: { type: "boolean" } }, strict: true });
  const config = loadExpiryConfig(readSettings());
  const findings = await collectFindings(expirySourcesFor(config), config, new Date());
  const failing = findings.filter((f) => f.status === "expired" || f.status === "critical" || f.status === "error");
  if (values.json) {
    const printable = findings.map((f) => ({ ...f, expiresOn: f.expiresOn?.toISOString() ?? null }));
    console.log(JSON.stringify({ checkedAt: new Date().toISOString(), criticalDays: config.criticalDays, findings: printable, failing: failing.length }, null, 2));
  } else {
    console.log(findingsTable(findings));
    if (failing.length > 0) console.log(`\n${failing.length} item(s) expired, within ${config.criticalDays} days, or not checkable.`);
  }
  return failing.length > 0 ? 1 : 0;
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case undefined:
      case "help":
      case "--help":
      case "-h":
        process.stdout.write(usage);
        return command === undefined ? 1 : 0;
      case "worker":
        return await workerCommand(rest);
      case "enqueue":
        return await enqueueCommand(rest);
      case "expiry":
        return await expiryCommand(rest);
      case "poison":
        return await poisonCommand(rest);
      case "doctor":
        return await doctorCommand(rest);
      case "authorize":
        return await authorizeCommand(rest);
      case "status":
        return await statusCommand(rest);
      case "template":
        return await templateCommand(rest);
      case "suppression":
        return await suppressionCommand(rest);
      case "bounces":
        return await bouncesCommand(rest);
      default:
        process.stderr.write(`queue-mailer: unknown command "${command}"\n\n${usage}`);
        return 2;
    }
  } catch (error) {
    if (error instanceof MailerError) {
      process.stderr.write(`queue-mailer ${command}: ${error.code}: ${error.message}\n${error.hint ? `hint: ${error.hint}\n` : ""}`);
      return error.kind === "config" ? 2 : 1;
    }
    process.stderr.write(`queue-mailer ${command}: ${(error as Error).message}\n`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
