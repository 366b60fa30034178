// `npm run bench`: what the sender costs on top of SMTP itself, measured in one run on one machine
// against the same local servers (Azurite, the OAuth server, the token-checking SMTP sink, the Key
// Vault double). Ratios matter more than absolute numbers: this machine is shared and noisy.
//
//   ours      `queue-mailer worker --drain` as a separate process, production path: certificate from
//             the Key Vault double, assertion, token, pooled XOAUTH2 SMTP, ledger; rate limit off.
//   rawSmtp   nodemailer, same pool size, straight to the sink with one token.
//   rawQueue  the same messages received and deleted from Azurite, no sending.
//   diy       what a user writes in a function (bench/diy.ts): receive a batch from the same queue,
//             one pooled nodemailer transport and a token fetched once, delete after each send; no
//             ledger, no limits. Measured at 2,000 and at N messages against ours on as many.
//   naive     through the same queue: per message receive, a token request, a new transport, send,
//             delete; 3 at once.
//   storageRequestsPerMessage  every request ours (rate limit off, then on) and diy make to Azurite,
//             counted by a proxy in front of it (bench/storageCounter.ts), by service and operation.
//   latency   enqueue → 250 at 20 msg/s, then the first message after 30 s idle.
//   scaleOut  3 worker processes on one queue and one mailbox (bench/scaleOut.ts): the cap scaled
//             down to 20 per 4 s and 3 SMTP connections per mailbox across all of them.
//   oursGraph the same worker with TRANSPORT=graph: the MIME it builds, POSTed to the Graph double's
//             sendMail, at most 4 in flight per mailbox (slots in Table storage); rate limit off.
//   rawGraph  a keep-alive HTTPS loop to the same double: one token, 4 in flight, the same MIME
//             (nodemailer's MailComposer, built per message) POSTed as base64 to sendMail.
//   dailyLimit the worker with DAILY_RECIPIENT_LIMIT = L offered L + 20 one-recipient messages.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { Agent, request } from "node:https";
import { cpus, totalmem } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import nodemailer from "nodemailer";
import MailComposer from "nodemailer/lib/mail-composer";
import { startLocalStack, LOCAL_MAILBOX, type LocalStack } from "../cli/local/localStack.js";
import { loadSendConfig, loadStorageConfig } from "../shared/config.js";
import { credentialSourceFor } from "../shared/auth/credentialSource.js";
import { silentLogger } from "../shared/log.js";
import { encodeQueueText, openMailQueues } from "../shared/queue/mailQueue.js";
import { TokenProvider } from "../shared/token/tokenProvider.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "../test/support/keyVaultDouble.js";
import { runScaleOut } from "./scaleOut.js";
import { startStorageCounter } from "./storageCounter.js";
import { diyCommand, fill, messageJson, rateCapFault, root, runWorker, sinkOf, stallsOf, type CapState } from "./support.js";

const { values } = parseArgs({
  options: {
    messages: { type: "string", default: "5000" },
    naive: { type: "string", default: "300" },
    out: { type: "string", default: "bench/results/latest.json" },
    // Smaller for the suite's quick run (test/bench.test.ts); the defaults are what the README reports.
    "idle-seconds": { type: "string", default: "30" },
    "idle-probes": { type: "string", default: "2" },
    "scale-out-messages": { type: "string", default: "100" },
  },
  strict: true,
});
const N = Number(values.messages);
const NAIVE = Math.min(N, Number(values.naive));
const POOL = 3; // Exchange's per-mailbox connection cap: the same for every contender
const GRAPH_IN_FLIGHT = 4; // Graph's per-mailbox concurrency limit: the same for ours and raw
// Graph runs use at most 2,000 messages: the double enforces Graph's 10,000 requests per mailbox per
// 10 minutes, and ours, raw and the daily-limit run all send as one mailbox within a few minutes
// (2 × 2,000 + 60 stays well clear; 2 × 5,000 would throttle whichever ran second). 2,000 requests at
// 4 in flight are still many seconds of steady state.
const GRAPH_MESSAGES = Math.min(N, 2000);
/** Plain vs template messages: the same count for each, in alternating halves (ABBA). */
const TEMPLATE_MESSAGES = Math.min(N, 1000);
// Daily recipient limit run: L recipients allowed, L + DAILY_EXTRA single-recipient messages offered.
const DAILY_LIMIT = 40;
const DAILY_EXTRA = 20;
const BATCH = 32;
/** ours vs diy also at this size (and at N). */
const DIY_SMALL = 2000;
/** Messages counted through the storage proxy, per contender. */
const STORAGE_MESSAGES = Math.min(N, 500);
/** Latency: messages at a steady rate, then probes after idle. */
const LATENCY_MESSAGES = 200;
const LATENCY_RATE = 20;
const IDLE_SECONDS = Number(values["idle-seconds"]);
const IDLE_PROBES = Math.max(1, Number(values["idle-probes"]));
const SCALE_OUT = { workers: 3, messages: Number(values["scale-out-messages"]) };
const workDir = resolve(root, ".bench");
const caDir = join(workDir, "ca");

const log = (line: string) => process.stderr.write(`${line}\n`);
const seconds = (ms: number) => ms / 1000;
const rate = (count: number, ms: number) => Math.round((count / seconds(ms)) * 10) / 10;

function percentile(sorted: number[], p: number): number {
  return sorted.length === 0 ? 0 : (sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? 0);
}

/**
 * The Graph double of the local stack (in this process, like the sink: both Graph contenders pay for
 * it here). Only arrival times are kept; the recorded messages are dropped to keep memory flat.
 */
function graphOf(stack: LocalStack) {
  const graph = stack.graph;
  if (!graph) throw new Error("the local stack was started without transport \"graph\"");
  const arrivals: number[] = [];
  graph.onMessage((m) => {
    arrivals.push(m.receivedAt.getTime());
    graph.messages.length = 0;
  });
  const mailbox = LOCAL_MAILBOX.toLowerCase();
  return {
    url: graph.url,
    arrivals,
    resetStats: () => graph.resetStats(),
    stats: () => ({ requests: graph.requests.length, maxInFlight: graph.maxInFlight[mailbox] ?? 0, throttled: graph.requests.filter((r) => r.status === 429).length }),
  };
}

/**
 * POST sendMail with the MIME as base64 over a keep-alive HTTPS connection pool. node:https rather
 * than fetch: fetch trusts an extra CA only through NODE_EXTRA_CA_CERTS at process start, and this
 * process is started by `npm run bench` without it (undici, which would take a `ca`, is not installed).
 */
function graphSendMail(agent: Agent, url: string, token: string, mimeBase64: string): Promise<number> {
  return new Promise((resolveStatus, reject) => {
    const req = request(url, { method: "POST", agent, headers: { authorization: `Bearer ${token}`, "content-type": "text/plain", "content-length": Buffer.byteLength(mimeBase64) } }, (res) => {
      res.resume();
      res.once("end", () => resolveStatus(res.statusCode ?? 0));
      res.once("error", reject);
    });
    req.once("error", reject);
    req.end(mimeBase64);
  });
}

async function main(): Promise<void> {
  mkdirSync(workDir, { recursive: true });
  // The rate-cap phase turns this on: 432 4.3.2 once more than `limit` messages arrived within
  // the window, as Exchange does past 30 a minute.
  const capState: CapState = { current: undefined, throttled: 0 };
  // transport "graph": one stack serves both; its env is for Graph, the SMTP rows override it.
  const stack: LocalStack = await startLocalStack({
    caDir,
    workDir,
    transport: "graph",
    fault: rateCapFault(capState),
  });
  const sink = sinkOf(stack, capState);
  const graph = graphOf(stack);
  const kv: KeyVaultDouble = await startKeyVaultDouble({ caDir });
  kv.putCertificate("smtp-sender", { ...stack.clientCertificate, contentType: "application/x-pkcs12" });
  const ca = readFileSync(stack.caPath, "utf8");
  const results: Record<string, unknown> = {};
  try {
    const smtpEnv = { ...stack.env, TRANSPORT: "smtp", TOKEN_SCOPE: stack.oauth.scope };
    const base = { ...smtpEnv, ...kv.env, SMTP_PORT: String(sink.port), CERT_PATH: "", KEY_VAULT_URL: kv.vaultUrl, CERT_NAME: "smtp-sender", SEND_RATE_PER_MINUTE: "0", DAILY_RECIPIENT_LIMIT: "0", WORKER_BATCH_SIZE: String(BATCH), SMTP_MAX_CONNECTIONS: String(POOL) };
    const storageFor = (queue: string) => loadStorageConfig({ ...base, MAIL_QUEUE: queue });
    // Graph: the same worker with TRANSPORT=graph (stack.env's GRAPH_URL and Graph TOKEN_SCOPE).
    const graphBase = { ...base, TRANSPORT: "graph", GRAPH_URL: graph.url, TOKEN_SCOPE: stack.oauth.graphScope, GRAPH_MAX_CONCURRENCY: String(GRAPH_IN_FLIGHT) };

    // rawQueue: receive and delete with the worker's pipelining (a receive of BATCH whenever fewer
    // than BATCH are in flight), no sending.
    log(`rawQueue: ${N} messages…`);
    const raw = await openMailQueues(storageFor("bench-raw"));
    await fill(raw.queue, N);
    let rawQueueMs: number;
    {
      const began = Date.now();
      let done = 0;
      const inflight = new Set<Promise<void>>();
      while (done < N) {
        if (inflight.size >= BATCH) {
          await Promise.race(inflight);
          continue;
        }
        const { receivedMessageItems } = await raw.queue.receiveMessages({ numberOfMessages: BATCH });
        if (receivedMessageItems.length === 0 && inflight.size === 0) break;
        for (const m of receivedMessageItems) {
          const p: Promise<void> = raw.queue.deleteMessage(m.messageId, m.popReceipt).then(() => {
            done += 1;
            inflight.delete(p);
          });
          inflight.add(p);
        }
        if (receivedMessageItems.length === 0) await Promise.race(inflight);
      }
      await Promise.all(inflight);
      rawQueueMs = Date.now() - began;
    }

    // rawSmtp: nodemailer with the same pool size and one token.
    log(`rawSmtp: ${N} messages…`);
    const fileConfig = loadSendConfig({ ...smtpEnv, MAIL_QUEUE: "bench-raw" });
    const tokens = new TokenProvider({ credential: credentialSourceFor(fileConfig.auth, silentLogger), logger: silentLogger });
    const token = (await tokens.getToken()).token;
    let rawSmtpMs: number;
    {
      const transport = nodemailer.createTransport({ pool: true, maxConnections: POOL, maxMessages: Infinity, host: "127.0.0.1", port: sink.port, requireTLS: true, tls: { ca }, auth: { type: "OAuth2", user: LOCAL_MAILBOX, accessToken: token } });
      const began = Date.now();
      await Promise.all(Array.from({ length: N }, (_, i) => transport.sendMail({ from: LOCAL_MAILBOX, to: `user${i}@example.test`, subject: `Receipt ${i}`, text: `Thank you for order ${i}.\nTotal: 42.00` })));
      rawSmtpMs = Date.now() - began;
      transport.close();
    }

    // Daily recipient limit, on Graph: L + DAILY_EXTRA one-recipient messages, room for L. Every
    // other run has the limit off (0), so this run's table row starts empty. It runs beside the
    // memory baseline below: neither is timed, and they share only Azurite (another queue, another
    // transport, the limits they use are per transport or off), so the pair costs one worker's time.
    const dailyQueues = await openMailQueues(storageFor("bench-daily"));
    await fill(dailyQueues.queue, DAILY_LIMIT + DAILY_EXTRA);
    await dailyQueues.poison.clearMessages();
    const dailyBefore = graph.arrivals.length;
    const dailyRunning = runWorker({ ...graphBase, MAIL_QUEUE: "bench-daily", DAILY_RECIPIENT_LIMIT: String(DAILY_LIMIT) }, ["--drain"]);

    // ours, first on 500 messages (memory baseline), then on N. Fresh worker process each time.
    const oursEnv = { ...base, MAIL_QUEUE: "bench-ours" };
    const ours = await openMailQueues(storageFor("bench-ours"));
    const small = Math.min(500, N);
    log(`ours: ${small} messages (memory baseline), beside it the daily limit: ${DAILY_LIMIT + DAILY_EXTRA} messages, limit ${DAILY_LIMIT} (Graph)…`);
    await fill(ours.queue, small);
    const [smallRun, dailyRun] = await Promise.all([runWorker(oursEnv, ["--drain"]), dailyRunning]);
    // Messages that wait are hidden until the window has room (about a day): still in the queue.
    const dailyLimit = {
      limit: DAILY_LIMIT,
      offered: DAILY_LIMIT + DAILY_EXTRA,
      delivered: graph.arrivals.length - dailyBefore,
      stillQueued: (await dailyQueues.queue.getProperties()).approximateMessagesCount ?? -1,
      poisoned: (await dailyQueues.poison.getProperties()).approximateMessagesCount ?? -1,
      waited: dailyRun.waited,
      transport: "graph",
    };
    type Timed = { messagesPerSecond: number; messagesPerSecondWithoutStalls: number; messages: number; seconds: number; stallSeconds: number; longestGapMs: number; firstAfterMs: number };
    // diy and ours on the same number of messages, diy first: at DIY_SMALL, then ours at N and diy
    // at N (ABBA over the two sizes). The time is from the process's start line to the last 250.
    // From the process's start line to the last 250; and the same without Azurite's GC pauses.
    const timing = (arrivals: number[], startedAt: number): Timed => {
      const times = [...arrivals].sort((a, b) => a - b);
      const ms = (times.at(-1) ?? 0) - startedAt;
      const { stallMs, longestGapMs } = stallsOf(times);
      return { messagesPerSecond: rate(times.length, ms), messagesPerSecondWithoutStalls: rate(times.length, ms - stallMs), messages: times.length, seconds: seconds(ms), stallSeconds: seconds(stallMs), longestGapMs, firstAfterMs: (times[0] ?? 0) - startedAt };
    };
    const timed = async (queueName: string, count: number, env: Record<string, string>, command?: string[]): Promise<Timed> => {
      const q = await openMailQueues(storageFor(queueName));
      await fill(q.queue, count);
      const from = sink.messages.length;
      const run = await runWorker({ ...env, MAIL_QUEUE: queueName }, command ? [] : ["--drain"], undefined, command);
      return timing(sink.messages.slice(from).map((m) => m.receivedAt), run.startedAt);
    };
    const diyAt: Record<string, Timed> = {};
    const oursAt: Record<string, Timed> = {};
    if (N > DIY_SMALL) {
      log(`diy, then ours: ${DIY_SMALL} messages each…`);
      diyAt[DIY_SMALL] = await timed("bench-diy-small", DIY_SMALL, base, diyCommand("diy"));
      oursAt[DIY_SMALL] = await timed("bench-ours-small", DIY_SMALL, base);
    }
    log(`ours: ${N} messages…`);
    await fill(ours.queue, N);
    stack.oauth.resetStats();
    sink.resetStats();
    kv.resetCounts();
    const before = sink.messages.length;
    const oursRun = await runWorker(oursEnv, ["--drain"]);
    const delivered = sink.messages.slice(before);
    const last250 = Math.max(...delivered.map((m) => m.receivedAt));
    const sinkStats = sink.stats();
    const oursMs = last250 - oursRun.startedAt;
    const counts = {
      messages: delivered.length,
      tokenRequests: stack.oauth.stats.tokenRequests,
      keyVaultRequests: kv.counts.certificateGets + kv.counts.secretGets,
      keyVaultChallenges: kv.counts.challenges,
      keyVaultTokenRequests: kv.counts.tokenRequests,
      smtpConnections: sinkStats.connections,
      smtpAuths: sinkStats.auths,
    };

    oursAt[N] = timing(delivered.map((m) => m.receivedAt), oursRun.startedAt);
    log(`diy: ${N} messages…`);
    diyAt[N] = await timed("bench-diy", N, base, diyCommand("diy"));

    // naive, through the same queue: per message receive one, a token request, a new transport,
    // send, delete; POOL such loops at once (the mailbox cap). The certificate from a file (a Key
    // Vault read per message would only make it slower).
    log(`naive: ${NAIVE} messages…`);
    stack.oauth.resetStats();
    const naiveRun = await timed("bench-naive", NAIVE, { ...base, CERT_PATH: stack.env["CERT_PATH"] ?? "", KEY_VAULT_URL: "", CERT_NAME: "" }, diyCommand("naive"));
    const naiveMs = naiveRun.seconds * 1000;
    const naiveTokenRequests = stack.oauth.stats.tokenRequests;

    // Storage requests per message, counted by a proxy in front of Azurite: ours with the rate
    // limit off, ours with it on (the rate-cap run below) and diy, each on the same messages.
    const counter = await startStorageCounter(stack.azurite.ports);
    const viaCounter = { AzureWebJobsStorage: counter.connectionString };
    const perMessage = (counts: Record<string, number>, messages: number) => {
      const out: Record<string, number> = {};
      for (const [key, value] of Object.entries(counts).sort()) out[key] = Math.round((value / messages) * 1000) / 1000;
      const total = Object.entries(counts).filter(([key]) => key !== "table.batchOperations").reduce((sum, [, value]) => sum + value, 0);
      return { messages, total: Math.round((total / messages) * 1000) / 1000, per10000Messages: Math.round((total / messages) * 10_000), byOperation: out };
    };
    log(`storage requests: ours and diy, ${STORAGE_MESSAGES} messages each, through a counting proxy…`);
    counter.reset();
    await timed("bench-storage-ours", STORAGE_MESSAGES, { ...base, ...viaCounter });
    const storageOursRateOff = perMessage(counter.counts(), STORAGE_MESSAGES);
    counter.reset();
    await timed("bench-storage-diy", STORAGE_MESSAGES, { ...base, ...viaCounter }, diyCommand("diy"));
    const storageDiy = perMessage(counter.counts(), STORAGE_MESSAGES);

    // Latency from enqueue to 250, with the worker running and messages arriving at a steady
    // rate well below its capacity (as a transactional sender sees them).
    const latencyCount = Math.min(LATENCY_MESSAGES, N);
    const latencyRate = LATENCY_RATE;
    log(`latency: ${latencyCount} messages at ${latencyRate}/s…`);
    const latencyQueue = await openMailQueues(storageFor("bench-latency"));
    await latencyQueue.queue.clearMessages();
    const latencies: number[] = [];
    const allArrived = new Promise<void>((resolveAll) => {
      const stop = sink.onMessage((m) => {
        if (m.enqueuedAt === undefined) return;
        latencies.push(m.receivedAt - m.enqueuedAt);
        if (latencies.length >= latencyCount) {
          stop();
          resolveAll();
        }
      });
    });
    let stopLatencyWorker = () => {};
    const latencyDone = new Promise<void>((r) => (stopLatencyWorker = r));
    const latencyWorker = runWorker({ ...base, MAIL_QUEUE: "bench-latency" }, [], latencyDone);
    await new Promise((r) => setTimeout(r, 2_000)); // let it start and take its token
    for (let i = 0; i < latencyCount; i++) {
      const due = Date.now() + 1000 / latencyRate;
      void latencyQueue.queue.sendMessage(encodeQueueText(messageJson(i, { headers: { "X-Enqueued-At": String(Date.now()) } })));
      await new Promise((r) => setTimeout(r, Math.max(0, due - Date.now())));
    }
    await allArrived;
    // Then nothing for IDLE_SECONDS (the worker's polls back off to their longest interval; pooled
    // connections close), and one message: what a user waits for a password reset at a quiet hour.
    log(`latency after ${IDLE_SECONDS} s idle: ${IDLE_PROBES} message(s)…`);
    const afterIdle: number[] = [];
    for (let probe = 0; probe < IDLE_PROBES; probe++) {
      await new Promise((r) => setTimeout(r, IDLE_SECONDS * 1000));
      const arrived = new Promise<number>((resolveArrived) => {
        const stop = sink.onMessage((m) => {
          if (m.enqueuedAt === undefined) return;
          stop();
          resolveArrived(m.receivedAt - m.enqueuedAt);
        });
      });
      await latencyQueue.queue.sendMessage(encodeQueueText(messageJson(latencyCount + probe, { headers: { "X-Enqueued-At": String(Date.now()) } })));
      afterIdle.push(await arrived);
    }
    stopLatencyWorker();
    await latencyWorker;
    latencies.sort((a, b) => a - b);

    // Rate cap, scaled down: `limit` per `window` instead of 30 a minute.
    const cap = { limit: 20, windowSeconds: 4, messages: Math.min(100, Math.max(41, N)) };
    log(`rate cap: ${cap.messages} messages at ${cap.limit} per ${cap.windowSeconds} s…`);
    const capQueue = await openMailQueues(storageFor("bench-ratecap"));
    await fill(capQueue.queue, cap.messages);
    sink.rateCap(cap.limit, cap.windowSeconds * 1000);
    const capBefore = sink.messages.length;
    counter.reset();
    await runWorker({ ...base, ...viaCounter, MAIL_QUEUE: "bench-ratecap", SEND_RATE_PER_MINUTE: String(cap.limit), SEND_RATE_WINDOW_SECONDS: String(cap.windowSeconds), RETRY_BASE_SECONDS: "1" }, ["--drain"]);
    const capTimes = sink.messages.slice(capBefore).map((m) => m.receivedAt).sort((a, b) => a - b);
    const storageOursRateOn = perMessage(counter.counts(), capTimes.length);
    await counter.close();
    const idealMs = (Math.ceil(cap.messages / cap.limit) - 1) * cap.windowSeconds * 1000;
    const actualMs = (capTimes.at(-1) ?? 0) - (capTimes[0] ?? 0);
    const throttled = sink.stats().throttled;
    sink.rateCapOff();

    // Scale-out: 3 worker processes on one queue and one mailbox, the cap scaled down as above,
    // SMTP_MAX_CONNECTIONS per mailbox across all of them.
    log(`scale-out: ${SCALE_OUT.workers} workers, ${SCALE_OUT.messages} messages, ${cap.limit} per ${cap.windowSeconds} s, ${POOL} connections per mailbox…`);
    const scaleOut = await runScaleOut({ env: base, sink, workers: SCALE_OUT.workers, messages: SCALE_OUT.messages, limit: cap.limit, windowSeconds: cap.windowSeconds, maxConnections: POOL, log });

    // rawGraph: one Graph token, GRAPH_IN_FLIGHT loops over one keep-alive connection each.
    log(`rawGraph: ${GRAPH_MESSAGES} messages…`);
    let rawGraphMs: number;
    {
      const graphConfig = loadSendConfig({ ...stack.env, MAIL_QUEUE: "bench-raw" });
      const graphTokens = new TokenProvider({ credential: credentialSourceFor(graphConfig.auth, silentLogger), logger: silentLogger });
      const graphToken = (await graphTokens.getToken()).token;
      const agent = new Agent({ keepAlive: true, maxSockets: GRAPH_IN_FLIGHT, ca });
      const sendMailUrl = `${graph.url}/v1.0/users/${encodeURIComponent(LOCAL_MAILBOX)}/sendMail`;
      graph.resetStats();
      const began = Date.now();
      let next = 0;
      await Promise.all(
        Array.from({ length: GRAPH_IN_FLIGHT }, async () => {
          while (next < GRAPH_MESSAGES) {
            const i = next++;
            const mime = await new MailComposer({ from: LOCAL_MAILBOX, to: `user${i}@example.test`, subject: `Receipt ${i}`, text: `Thank you for order ${i}.\nTotal: 42.00` }).compile().build();
            const status = await graphSendMail(agent, sendMailUrl, graphToken, mime.toString("base64"));
            if (status !== 202) throw new Error(`rawGraph: sendMail answered ${status}`);
          }
        }),
      );
      rawGraphMs = Date.now() - began;
      agent.destroy();
    }

    // oursGraph: a fresh worker on the same number of messages; its requests as the double saw them.
    log(`oursGraph: ${GRAPH_MESSAGES} messages…`);
    const oursGraphQueue = await openMailQueues(storageFor("bench-ours-graph"));
    await fill(oursGraphQueue.queue, GRAPH_MESSAGES);
    graph.resetStats();
    stack.oauth.resetStats();
    const graphBefore = graph.arrivals.length;
    const oursGraphRun = await runWorker({ ...graphBase, MAIL_QUEUE: "bench-ours-graph" }, ["--drain"]);
    const graphDelivered = graph.arrivals.slice(graphBefore);
    const oursGraphMs = Math.max(...graphDelivered) - oursGraphRun.startedAt;
    const graphStats = { ...graph.stats(), tokenRequests: stack.oauth.stats.tokenRequests };

    // templates: the same worker on the same count, once with the HTML and text written out and
    // once rendered from a template (TEMPLATE_DIR, Handlebars, text generated from the HTML): the
    // same message either way, so the difference is what rendering costs.
    log(`templates: ${TEMPLATE_MESSAGES} written out and ${TEMPLATE_MESSAGES} from a template, alternating (ABBA)…`);
    const templateDir = join(workDir, "templates");
    mkdirSync(join(templateDir, "receipt"), { recursive: true });
    writeFileSync(join(templateDir, "receipt", "subject.hbs"), "Receipt {{order}}");
    writeFileSync(join(templateDir, "receipt", "html.hbs"), "<h1>Thank you, {{name}}!</h1><p>Order {{order}}: {{total}}</p>");
    const plainJson = (i: number) => JSON.stringify({ id: `plain-${i}-${Math.random().toString(36).slice(2)}`, to: `user${i}@example.test`, subject: `Receipt ${i}`, html: `<h1>Thank you, Ada!</h1><p>Order ${i}: 42.00</p>`, text: `THANK YOU, ADA!\n\nOrder ${i}: 42.00` });
    const templateJson = (i: number) => JSON.stringify({ id: `tmpl-${i}-${Math.random().toString(36).slice(2)}`, to: `user${i}@example.test`, template: "receipt", data: { name: "Ada", order: i, total: "42.00" } });
    const timeRun = async (queueName: string, make: (i: number) => string, extra: Record<string, string>, count: number) => {
      const q = await openMailQueues(storageFor(queueName));
      await fill(q.queue, count, make);
      const from = sink.messages.length;
      const run = await runWorker({ ...base, MAIL_QUEUE: queueName, ...extra }, ["--drain"]);
      const arrived = sink.messages.slice(from);
      return { messages: arrived.length, ms: Math.max(...arrived.map((m) => m.receivedAt)) - run.startedAt };
    };
    // Whichever of two long runs comes second is slowed by what the first left behind in Azurite
    // (measured: 10× at 1,000 each, either order), so each runs twice, ABBA, on half the messages,
    // and the totals are compared.
    const perRound = Math.max(1, Math.floor(TEMPLATE_MESSAGES / 2));
    const plainRun = { messages: 0, ms: 0 };
    const templateRun = { messages: 0, ms: 0 };
    for (const [round, kind] of (["plain", "template", "template", "plain"] as const).entries()) {
      const r = kind === "plain"
        ? await timeRun(`bench-plain-${round}`, plainJson, {}, perRound)
        : await timeRun(`bench-templates-${round}`, templateJson, { TEMPLATE_DIR: templateDir }, perRound);
      const total = kind === "plain" ? plainRun : templateRun;
      total.messages += r.messages;
      total.ms += r.ms;
    }
    function ratioWithoutStalls(a: Timed | undefined, b: Timed | undefined): number {
      return Math.round(((a?.messagesPerSecondWithoutStalls ?? 0) / (b?.messagesPerSecondWithoutStalls || 1)) * 100) / 100;
    }
    const plainRate = rate(plainRun.messages, plainRun.ms);
    const templateRate = rate(templateRun.messages, templateRun.ms);

    const rawSmtp = rate(N, rawSmtpMs);
    const rawQueue = rate(N, rawQueueMs);
    const oursRate = rate(counts.messages, oursMs);
    const naive = rate(NAIVE, naiveMs);
    const growth = (oursRun.memoryAtStop.rssBytes - smallRun.memoryAtStop.rssBytes) / smallRun.memoryAtStop.rssBytes;
    const shareOfAllowed = Math.round((idealMs / actualMs) * 1000) / 1000;
    const oursGraph = rate(graphDelivered.length, oursGraphMs);
    const rawGraph = rate(GRAPH_MESSAGES, rawGraphMs);
    Object.assign(results, {
      date: new Date().toISOString(),
      node: process.version,
      machine: { cpus: cpus().length, model: cpus()[0]?.model ?? "unknown", totalMemoryBytes: totalmem(), platform: process.platform, arch: process.arch },
      messages: N,
      rates: {
        ours: { messagesPerSecond: oursRate, messages: counts.messages, seconds: seconds(oursMs) },
        rawSmtp: { messagesPerSecond: rawSmtp, messages: N, seconds: seconds(rawSmtpMs) },
        rawQueue: { messagesPerSecond: rawQueue, messages: N, seconds: seconds(rawQueueMs) },
        naive: { messagesPerSecond: naive, messagesPerSecondWithoutStalls: naiveRun.messagesPerSecondWithoutStalls, messages: NAIVE, seconds: seconds(naiveMs), tokenRequests: naiveTokenRequests },
        oursGraph: { messagesPerSecond: oursGraph, messages: graphDelivered.length, seconds: seconds(oursGraphMs) },
        rawGraph: { messagesPerSecond: rawGraph, messages: GRAPH_MESSAGES, seconds: seconds(rawGraphMs) },
        oursPlain: { messagesPerSecond: plainRate, messages: plainRun.messages, seconds: seconds(plainRun.ms) },
        oursTemplates: { messagesPerSecond: templateRate, messages: templateRun.messages, seconds: seconds(templateRun.ms) },
      },
      ratios: {
        oursVsMinRaw: Math.round((oursRate / Math.min(rawSmtp, rawQueue)) * 100) / 100,
        // Both without Azurite's GC pauses (see stallsOf).
        oursVsNaive: Math.round(((oursAt[N]?.messagesPerSecondWithoutStalls ?? 0) / (naiveRun.messagesPerSecondWithoutStalls || 1)) * 10) / 10,
        oursGraphVsRawGraph: Math.round((oursGraph / rawGraph) * 100) / 100,
        templatesVsPlain: Math.round((templateRate / plainRate) * 100) / 100,
      },
      counts,
      latencyMs: { messages: latencies.length, ratePerSecond: latencyRate, p50: percentile(latencies, 50), p95: percentile(latencies, 95), p99: percentile(latencies, 99) },
      memory: {
        rssBeforeBytes: oursRun.memoryAtStart.rssBytes,
        rssAfterBytes: oursRun.memoryAtStop.rssBytes,
        peakRssBytes: oursRun.memoryAtStop.peakRssBytes,
        rssAfter500Bytes: smallRun.memoryAtStop.rssBytes,
        rssAfterNBytes: oursRun.memoryAtStop.rssBytes,
        growthFrom500ToN: Math.round(growth * 1000) / 1000,
      },
      rateCap: { limit: cap.limit, windowSeconds: cap.windowSeconds, messages: capTimes.length, shareOfAllowed, throttlingReplies: throttled },
      graph: graphStats,
      dailyLimit,
      // The ratio compares the rates without Azurite's GC pauses (which hit whichever run is going).
      diy: Object.fromEntries(Object.keys(diyAt).map((size) => [size, { diy: diyAt[size], ours: oursAt[size], oursVsDiy: ratioWithoutStalls(oursAt[size], diyAt[size]), oursVsDiyWithStalls: Math.round(((oursAt[size]?.messagesPerSecond ?? 0) / (diyAt[size]?.messagesPerSecond ?? 1)) * 100) / 100 }])),
      storageRequestsPerMessage: { oursRateLimitOff: storageOursRateOff, oursRateLimitOn: storageOursRateOn, diy: storageDiy },
      latencyAfterIdleMs: { idleSeconds: IDLE_SECONDS, probes: afterIdle, max: Math.max(...afterIdle) },
      scaleOut,
    });
    results["targets"] = {
      oursAtLeast80PercentOfMinRaw: oursRate >= 0.8 * Math.min(rawSmtp, rawQueue),
      oneTokenRequest: counts.tokenRequests === 1,
      atMostTwoKeyVaultReads: counts.keyVaultRequests <= 2,
      tenTimesNaive: (oursAt[N]?.messagesPerSecondWithoutStalls ?? 0) >= 10 * naiveRun.messagesPerSecondWithoutStalls,
      rateCapAtLeast95Percent: shareOfAllowed >= 0.95,
      noThrottlingReplies: throttled === 0,
      rssGrowthWithin20Percent: Math.abs(growth) <= 0.2,
      graphAtLeast80PercentOfRaw: oursGraph >= 0.8 * rawGraph,
      graphWithinMailboxConcurrency: graphStats.maxInFlight <= GRAPH_IN_FLIGHT && graphStats.throttled === 0,
      templatesWithin10Percent: templateRate >= 0.9 * plainRate,
      dailyLimitHolds: dailyLimit.delivered === DAILY_LIMIT && dailyLimit.poisoned === 0 && dailyLimit.stillQueued === DAILY_EXTRA,
      oursAtLeast80PercentOfDiy: Object.keys(diyAt).every((size) => ratioWithoutStalls(oursAt[size], diyAt[size]) >= 0.8),
      latencyP95Within500ms: percentile(latencies, 95) <= 500,
      latencyAfterIdleWithin2500ms: Math.max(...afterIdle) <= 2500,
      scaleOutAtLeast95Percent: scaleOut.shareOfAllowed >= 0.95,
      scaleOutNoThrottling: scaleOut.throttlingReplies === 0,
      scaleOutWithinConnections: scaleOut.maxAuthenticatedAtOnce <= POOL,
      scaleOutEveryMessageOnce: scaleOut.delivered === scaleOut.messages && scaleOut.duplicates === 0,
    };
  } finally {
    await kv.close();
    await stack.stop();
  }

  const out = resolve(root, values.out);
  mkdirSync(join(out, ".."), { recursive: true });
  writeFileSync(out, JSON.stringify(results, null, 2) + "\n");
  console.log(renderTable(results));
  console.log(`\nwritten to ${values.out}`);
}

export function renderTable(r: Record<string, unknown>): string {
  const x = r as {
    messages: number; node: string; date: string; machine: { cpus: number; model: string };
    rates: Record<"ours" | "rawSmtp" | "rawQueue" | "naive" | "oursGraph" | "rawGraph" | "oursPlain" | "oursTemplates", { messagesPerSecond: number; messages: number }>;
    ratios: { oursVsMinRaw: number; oursVsNaive: number; oursGraphVsRawGraph: number; templatesVsPlain: number };
    counts: { tokenRequests: number; keyVaultRequests: number; smtpConnections: number; smtpAuths: number; messages: number };
    latencyMs: { p50: number; p95: number; p99: number; ratePerSecond: number };
    memory: { rssAfter500Bytes: number; rssAfterNBytes: number; peakRssBytes: number; rssBeforeBytes: number; growthFrom500ToN: number };
    rateCap: { limit: number; windowSeconds: number; shareOfAllowed: number; throttlingReplies: number };
    graph: { requests: number; maxInFlight: number; throttled: number; tokenRequests: number };
    dailyLimit: { limit: number; offered: number; delivered: number; stillQueued: number; poisoned: number };
    targets: Record<string, boolean>;
    diy: Record<string, { diy: { messagesPerSecond: number; messagesPerSecondWithoutStalls: number; stallSeconds: number; messages: number }; ours: { messagesPerSecond: number; messagesPerSecondWithoutStalls: number; stallSeconds: number; messages: number }; oursVsDiy: number }>;
    storageRequestsPerMessage: Record<"oursRateLimitOff" | "oursRateLimitOn" | "diy", { messages: number; total: number; per10000Messages: number; byOperation: Record<string, number> }>;
    latencyAfterIdleMs: { idleSeconds: number; probes: number[]; max: number };
    scaleOut: { workers: number; messages: number; delivered: number; duplicates: number; limit: number; windowSeconds: number; maxConnections: number; shareOfAllowed: number; throttlingReplies: number; maxAuthenticatedAtOnce: number };
  };
  const ops = (row: { byOperation: Record<string, number> }) => Object.entries(row.byOperation).filter(([key]) => key !== "table.batchOperations").map(([key, value]) => `${key} ${value}`).join(", ");
  const mb = (b: number) => `${Math.round(b / 1048576)} MB`;
  const ok = (b: boolean | undefined) => (b ? "met" : "NOT met");
  return [
    `| measure | value | target |`,
    `| --- | --- | --- |`,
    `| ours (worker, Key Vault cert, token, pooled XOAUTH2, ledger) | ${x.rates.ours.messagesPerSecond} msg/s over ${x.rates.ours.messages} | ≥ 0.8 × min(raw): ${x.ratios.oursVsMinRaw} × (${ok(x.targets["oursAtLeast80PercentOfMinRaw"])}) |`,
    `| raw SMTP (nodemailer, pool ${3}) | ${x.rates.rawSmtp.messagesPerSecond} msg/s | |`,
    `| raw queue (receive + delete) | ${x.rates.rawQueue.messagesPerSecond} msg/s | |`,
    ...Object.entries(x.diy).map(([size, row]) => `| diy (receive, pooled nodemailer, cached token, delete; no ledger, no limits) vs ours at ${size} | diy ${row.diy.messagesPerSecondWithoutStalls}, ours ${row.ours.messagesPerSecondWithoutStalls} msg/s without Azurite's GC pauses (${row.diy.stallSeconds} s, ${row.ours.stallSeconds} s); with them ${row.diy.messagesPerSecond}, ${row.ours.messagesPerSecond} | ours ≥ 0.8 × diy: ${row.oursVsDiy} × (${ok(row.oursVsDiy >= 0.8)}) |`),
    `| naive through the queue (receive, token + transport per message, delete; 3 at once) | ${x.rates.naive.messagesPerSecond} msg/s over ${x.rates.naive.messages} | ours ≥ 10×: ${x.ratios.oursVsNaive}× (${ok(x.targets["tenTimesNaive"])}) |`,
    `| storage requests per message, ours, rate limit off | ${x.storageRequestsPerMessage.oursRateLimitOff.total} (${x.storageRequestsPerMessage.oursRateLimitOff.per10000Messages} per 10,000): ${ops(x.storageRequestsPerMessage.oursRateLimitOff)} | |`,
    `| storage requests per message, ours, rate limit on (${x.rateCap.limit} per ${x.rateCap.windowSeconds} s) | ${x.storageRequestsPerMessage.oursRateLimitOn.total} (${x.storageRequestsPerMessage.oursRateLimitOn.per10000Messages} per 10,000): ${ops(x.storageRequestsPerMessage.oursRateLimitOn)} | |`,
    `| storage requests per message, diy | ${x.storageRequestsPerMessage.diy.total} (${x.storageRequestsPerMessage.diy.per10000Messages} per 10,000): ${ops(x.storageRequestsPerMessage.diy)} | |`,
    `| token requests per ${x.counts.messages} messages | ${x.counts.tokenRequests} | 1 (${ok(x.targets["oneTokenRequest"])}) |`,
    `| Key Vault reads (certificate + key) | ${x.counts.keyVaultRequests} | ≤ 2 (${ok(x.targets["atMostTwoKeyVaultReads"])}) |`,
    `| SMTP connections / AUTHs | ${x.counts.smtpConnections} / ${x.counts.smtpAuths} | |`,
    `| latency enqueue → 250 at ${x.latencyMs.ratePerSecond} msg/s (p50 / p95 / p99) | ${x.latencyMs.p50} / ${x.latencyMs.p95} / ${x.latencyMs.p99} ms | p95 ≤ 500 ms (${ok(x.targets["latencyP95Within500ms"])}) |`,
    `| latency of the first message after ${x.latencyAfterIdleMs.idleSeconds} s idle | ${x.latencyAfterIdleMs.probes.join(" / ")} ms | ≤ 2,500 ms (${ok(x.targets["latencyAfterIdleWithin2500ms"])}) |`,
    `| worker RSS before → after ${x.counts.messages} (peak) | ${mb(x.memory.rssBeforeBytes)} → ${mb(x.memory.rssAfterNBytes)} (${mb(x.memory.peakRssBytes)}) | |`,
    `| RSS after ${x.messages} vs after 500 | ${mb(x.memory.rssAfterNBytes)} vs ${mb(x.memory.rssAfter500Bytes)} (${Math.round(x.memory.growthFrom500ToN * 100)} %) | within 20 % (${ok(x.targets["rssGrowthWithin20Percent"])}) |`,
    `| rate cap ${x.rateCap.limit} per ${x.rateCap.windowSeconds} s: share of allowed rate | ${Math.round(x.rateCap.shareOfAllowed * 1000) / 10} % | ≥ 95 % (${ok(x.targets["rateCapAtLeast95Percent"])}) |`,
    `| throttling replies (432) caused | ${x.rateCap.throttlingReplies} | 0 (${ok(x.targets["noThrottlingReplies"])}) |`,
    `| scale-out: ${x.scaleOut.workers} workers, one mailbox, ${x.scaleOut.limit} per ${x.scaleOut.windowSeconds} s: share of allowed rate | ${Math.round(x.scaleOut.shareOfAllowed * 1000) / 10} % (${x.scaleOut.delivered} of ${x.scaleOut.messages} delivered, ${x.scaleOut.duplicates} twice) | ≥ 95 % (${ok(x.targets["scaleOutAtLeast95Percent"])}) |`,
    `| scale-out: throttling replies / most authenticated SMTP connections at once | ${x.scaleOut.throttlingReplies} / ${x.scaleOut.maxAuthenticatedAtOnce} | 0 / ≤ ${x.scaleOut.maxConnections} (${ok(x.targets["scaleOutNoThrottling"] && x.targets["scaleOutWithinConnections"])}) |`,
    `| ours over Graph (worker, Key Vault cert, token, sendMail, ledger) | ${x.rates.oursGraph.messagesPerSecond} msg/s over ${x.rates.oursGraph.messages} | ≥ 0.8 × raw Graph: ${x.ratios.oursGraphVsRawGraph} × (${ok(x.targets["graphAtLeast80PercentOfRaw"])}) |`,
    `| raw Graph (keep-alive HTTPS, ${GRAPH_IN_FLIGHT} in flight, one token) | ${x.rates.rawGraph.messagesPerSecond} msg/s over ${x.rates.rawGraph.messages} | |`,
    `| Graph requests / most in flight / 429s / token requests (ours) | ${x.graph.requests} / ${x.graph.maxInFlight} / ${x.graph.throttled} / ${x.graph.tokenRequests} | ≤ ${GRAPH_IN_FLIGHT} in flight, no 429 (${ok(x.targets["graphWithinMailboxConcurrency"])}) |`,
    `| daily recipient limit ${x.dailyLimit.limit}, ${x.dailyLimit.offered} offered (Graph): delivered / still queued / poisoned | ${x.dailyLimit.delivered} / ${x.dailyLimit.stillQueued} / ${x.dailyLimit.poisoned} | ${x.dailyLimit.limit} / ${x.dailyLimit.offered - x.dailyLimit.limit} / 0 (${ok(x.targets["dailyLimitHolds"])}) |`,
    `| ours, HTML + text written out (SMTP) | ${x.rates.oursPlain.messagesPerSecond} msg/s over ${x.rates.oursPlain.messages} | |`,
    `| ours, the same rendered from a template | ${x.rates.oursTemplates.messagesPerSecond} msg/s over ${x.rates.oursTemplates.messages} | ≥ 0.9 × written out: ${x.ratios.templatesVsPlain} × (${ok(x.targets["templatesWithin10Percent"])}) |`,
    ``,
    `${x.date.slice(0, 10)}, Node ${x.node}, ${x.machine.cpus} × ${x.machine.model}`,
  ].join("\n");
}

await main();
process.exit(0);
