// `npm run local`: the whole path on this machine with no cloud account. Starts the local stack
// (Azurite, OAuth server, SMTP server that checks tokens; with TRANSPORT=graph also the Microsoft
// Graph mail double), writes a dev certificate, enqueues sample messages and runs `queue-mailer
// worker` as a child process with the same settings a deployment would have, printing each delivery.
// `--once` exits when the samples are delivered (0) or not (1).
import { spawn } from "node:child_process";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { enqueueEmail } from "../../shared/enqueueEmail.js";
import type { EmailMessageInput } from "../../shared/message/schema.js";
import { openMailQueues } from "../../shared/queue/mailQueue.js";
import { AUTH_METHODS, loadStorageConfig, type AuthMethod } from "../../shared/config.js";
import { startLocalStack } from "./localStack.js";

const { values } = parseArgs({ options: { once: { type: "boolean" }, dir: { type: "string" } }, strict: true });
const once = values.once === true;
const dir = resolve(values.dir ?? ".local");
const outboxDir = join(dir, "outbox");
rmSync(outboxDir, { recursive: true, force: true });
mkdirSync(outboxDir, { recursive: true });

const samples: EmailMessageInput[] = [
  { to: "Ada Lovelace <ada@example.test>", subject: "Welcome to queue-mailer", text: "Plain text, sent through XOAUTH2.", headers: { "X-Campaign": "local-demo" } },
  {
    to: ["grace@example.test", "\"Hopper, Grace\" <grace.hopper@example.test>"],
    cc: "linus@example.test",
    subject: "Your receipt",
    html: "<h1>Thanks!</h1><p>HTML with an attachment.</p>",
    text: "Thanks! Text alternative.",
    attachments: [{ filename: "receipt.txt", contentType: "text/plain", content: Buffer.from("Total: 42.00\n").toString("base64") }],
  },
  { to: "margaret@example.test", bcc: "audit@example.test", subject: "Password reset", text: "Your code is 123456." },
];

console.log(`queue-mailer local: starting Azurite, the OAuth server and the SMTP server${process.env["TRANSPORT"] === "graph" ? " (and the Microsoft Graph double)" : ""} on 127.0.0.1 …`);
// AUTH_METHOD picks the credential to demonstrate (certificate by default); the local servers are
// set up to accept it, and the worker gets the matching settings.
const authMethod = (process.env["AUTH_METHOD"] || "certificate") as AuthMethod;
if (!(AUTH_METHODS as readonly string[]).includes(authMethod)) {
  console.error(`AUTH_METHOD must be one of ${AUTH_METHODS.join(", ")}; got "${authMethod}"`);
  process.exit(2);
}
// TRANSPORT picks how the worker sends: SMTP (default) or Microsoft Graph sendMail.
const transport = process.env["TRANSPORT"] || "smtp";
if (transport !== "smtp" && transport !== "graph") {
  console.error(`TRANSPORT must be smtp or graph; got "${transport}"`);
  process.exit(2);
}
const stack = await startLocalStack({ caDir: join(dir, "ca"), workDir: dir, outboxDir, preferDefaultPorts: !once, authMethod, transport });
const env = stack.env;
console.log(`  storage   ${stack.azurite.connectionString.startsWith("UseDevelopmentStorage") ? "UseDevelopmentStorage=true (ports 10000-10002)" : `ports ${stack.azurite.ports.queue} (queue)`}`);
// What the local token endpoint checks depends on the method being demonstrated.
const tokenCheck: Record<AuthMethod, string> = {
  certificate: `verifies client assertions signed with ${relative(process.cwd(), stack.certPath)}`,
  secret: `checks the client secret (${env["CLIENT_AUTH"] ?? "post"})`,
  password: `checks the mailbox password (password grant)`,
  "google-service-account": `verifies JWT bearer assertions signed with ${stack.google ? relative(process.cwd(), stack.google.keyPath) : "the service account key"}`,
  "refresh-token": `redeems and rotates the signed-in user's refresh token in ${stack.refreshTokenPath ? relative(process.cwd(), stack.refreshTokenPath) : "REFRESH_TOKEN_PATH"} (reuse of a rotated one revokes them all)`,
};
console.log(`  token     ${stack.google?.server.tokenUrl ?? stack.oauth.tokenUrl}  (AUTH_METHOD=${authMethod}: ${tokenCheck[authMethod]})`);
console.log(`  smtp      127.0.0.1:${stack.smtp.port}  (STARTTLS + XOAUTH2 required, token checked; outbox ${relative(process.cwd(), outboxDir)})${transport === "smtp" ? "" : "  [not used: TRANSPORT=graph]"}`);
if (stack.graph) console.log(`  graph     ${stack.graph.url}  (TRANSPORT=graph: sendMail and upload sessions, Graph token checked; scope ${env["TOKEN_SCOPE"]})`);

stack.smtp.onMessage((message) => {
  const subject = message.headers["subject"]?.[0] ?? "";
  console.log(`delivered #${message.seq}: "${subject}" from ${message.mailFrom} to ${message.rcptTo.join(", ")} → ${relative(process.cwd(), message.file ?? "")}`);
});
let graphDeliveries = 0;
stack.graph?.onMessage((message) => {
  graphDeliveries++;
  // The Graph double keeps messages in memory; write them next to the SMTP sink's for a look.
  const file = join(outboxDir, `graph-${graphDeliveries}.eml`);
  writeFileSync(file, message.raw);
  const attachments = message.attachments.length > 0 ? `, ${message.attachments.length} attachment(s)` : "";
  console.log(`delivered via Graph ${message.via} #${graphDeliveries}: "${message.subject ?? ""}" from ${message.from} to ${[...message.to, ...message.cc, ...message.bcc].join(", ")}${attachments} → ${relative(process.cwd(), file)}`);
});

const { queue } = await openMailQueues(loadStorageConfig(env));
for (const sample of samples) await enqueueEmail(queue, sample);
console.log(`enqueued ${samples.length} sample messages on "${env["MAIL_QUEUE"]}"`);

const cliMain = fileURLToPath(new URL("../main.ts", import.meta.url));
// The setup checklist for this stack, as `queue-mailer doctor` prints it for a deployment (a child
// process like the worker below, for the same reason: the local CA). It takes no queue message.
await new Promise<void>((done) => {
  spawn(process.execPath, ["--import", "tsx", cliMain, "doctor"], { env: { ...process.env, ...env, NODE_EXTRA_CA_CERTS: stack.caPath }, stdio: ["ignore", "inherit", "inherit"] }).once("close", () => done());
});
// The worker is a separate process, as in a container: it trusts the local CA (for STARTTLS to
// the SMTP server) the standard Node way, which only works from process start.
const worker = spawn(process.execPath, ["--import", "tsx", cliMain, "worker", ...(once ? ["--drain"] : [])], {
  env: { ...process.env, ...env, NODE_EXTRA_CA_CERTS: stack.caPath },
  stdio: ["ignore", "inherit", "pipe"],
});
worker.stderr?.on("data", (chunk: Buffer) => {
  for (const line of chunk.toString().split("\n").filter(Boolean)) {
    // Print the worker's notable events compactly; the full JSON lines are in the worker's output.
    try {
      const record = JSON.parse(line) as { level: string; event: string; error?: { code: string; message: string } };
      if (record.level === "warn" || record.level === "error") console.log(`worker ${record.level}: ${record.event} ${record.error ? `${record.error.code}: ${record.error.message}` : ""}`);
    } catch {
      console.log(`worker: ${line}`);
    }
  }
});

if (!once) {
  console.log(`\nRunning. Add messages from another terminal, e.g.:\n  AzureWebJobsStorage="${stack.azurite.connectionString}" npx queue-mailer enqueue --to you@example.test --subject Hi --text Hello\nCtrl-C stops everything.`);
  process.once("SIGINT", () => worker.kill("SIGTERM"));
  process.once("SIGTERM", () => worker.kill("SIGTERM"));
}

const exitCode = await new Promise<number>((resolveExit) => worker.once("exit", (code) => resolveExit(code ?? 1)));
// Deliveries through the transport in use (the other server stays idle).
const delivered = transport === "graph" ? (stack.graph?.messages.length ?? 0) : stack.smtp.messages.length;
await stack.stop();
if (once) {
  const ok = exitCode === 0 && delivered >= samples.length;
  console.log(ok ? `done: ${delivered} of ${samples.length} samples delivered, .eml files in ${relative(process.cwd(), outboxDir)}` : `FAILED: ${delivered} of ${samples.length} samples delivered (worker exit ${exitCode})`);
  process.exit(ok ? 0 : 1);
}
console.log(`stopped (${delivered} delivered)`);
process.exit(0);

