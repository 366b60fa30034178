// The benchmark's hand-written contenders, each in a process of its own like `queue-mailer worker`,
// reading the same kind of queue and sending to the same SMTP sink:
//
//   diy    what a user writes in a function: receive a batch, send each with one pooled nodemailer
//          transport and a token fetched once, delete after each send. No ledger, no limits, no
//          validation beyond JSON.parse. Pipelined like the worker (a new batch whenever fewer than
//          BATCH are in flight), so the comparison is the guarantees, not the loop.
//   naive  per message: receive one, request a token, open a new transport, send, delete; three
//          such loops at once (the mailbox's connection cap).
//
// Settings come from the environment (the worker's own: AzureWebJobsStorage, MAIL_QUEUE, SMTP_HOST,
// SMTP_PORT, SMTP_USER, CERT_PATH, TENANT_ID, CLIENT_ID, ...); the CA from NODE_EXTRA_CA_CERTS.
// It logs the worker's JSON lines `worker.started` / `worker.stopped` (time, memory, sent), so the
// benchmark reads both the same way.
import { parseArgs } from "node:util";
import nodemailer from "nodemailer";
import { credentialSourceFor } from "../shared/auth/credentialSource.js";
import { loadSendConfig } from "../shared/config.js";
import { silentLogger } from "../shared/log.js";
import { decodeQueueText } from "../shared/queue/decode.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { TokenProvider } from "../shared/token/tokenProvider.js";

const { values } = parseArgs({ options: { mode: { type: "string", default: "diy" }, batch: { type: "string", default: "32" }, pool: { type: "string", default: "3" } }, strict: true });
const BATCH = Number(values.batch);
const POOL = Number(values.pool);
const config = loadSendConfig(process.env);
const { queue } = await openMailQueues(config.storage, { create: false });
const memory = () => ({ rssBytes: process.memoryUsage().rss, peakRssBytes: process.resourceUsage().maxRSS * 1024 });
const say = (event: string, extra: Record<string, unknown> = {}) => process.stderr.write(`${JSON.stringify({ time: new Date().toISOString(), event, ...extra })}\n`);

interface Plain {
  to: string;
  subject?: string;
  text?: string;
  html?: string;
}
const smtp = { host: config.smtp.host, port: config.smtp.port, requireTLS: true };
const newToken = async () => (await new TokenProvider({ credential: credentialSourceFor(config.auth, silentLogger), logger: silentLogger }).getToken()).token;

let sent = 0;
if (values.mode === "diy") {
  const accessToken = await newToken();
  const transport = nodemailer.createTransport({ ...smtp, pool: true, maxConnections: POOL, maxMessages: Infinity, auth: { type: "OAuth2", user: config.smtp.user, accessToken } });
  say("worker.started", { memory: memory() });
  const inflight = new Set<Promise<void>>();
  for (;;) {
    if (inflight.size >= BATCH) {
      await Promise.race(inflight);
      continue;
    }
    const { receivedMessageItems } = await queue.receiveMessages({ numberOfMessages: Math.min(32, BATCH - inflight.size), visibilityTimeout: 60 });
    if (receivedMessageItems.length === 0) {
      if (inflight.size === 0) break;
      await Promise.race(inflight);
      continue;
    }
    for (const item of receivedMessageItems) {
      const m = JSON.parse(decodeQueueText(item.messageText)) as Plain;
      const p: Promise<void> = transport
        .sendMail({ from: config.smtp.user, to: m.to, subject: m.subject, text: m.text, html: m.html })
        .then(() => queue.deleteMessage(item.messageId, item.popReceipt))
        .then(() => {
          sent += 1;
        })
        .finally(() => inflight.delete(p));
      inflight.add(p);
    }
  }
  transport.close();
} else if (values.mode === "naive") {
  say("worker.started", { memory: memory() });
  await Promise.all(
    Array.from({ length: POOL }, async () => {
      for (;;) {
        const { receivedMessageItems } = await queue.receiveMessages({ numberOfMessages: 1, visibilityTimeout: 60 });
        const item = receivedMessageItems[0];
        if (!item) return;
        const m = JSON.parse(decodeQueueText(item.messageText)) as Plain;
        const transport = nodemailer.createTransport({ ...smtp, auth: { type: "OAuth2", user: config.smtp.user, accessToken: await newToken() } });
        await transport.sendMail({ from: config.smtp.user, to: m.to, subject: m.subject, text: m.text, html: m.html });
        transport.close();
        await queue.deleteMessage(item.messageId, item.popReceipt);
        sent += 1;
      }
    }),
  );
} else {
  throw new Error(`--mode ${values.mode}: expected diy or naive`);
}
say("worker.stopped", { sent, memory: memory() });
process.exit(0);
