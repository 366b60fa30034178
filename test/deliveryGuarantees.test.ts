// Delivery guarantees, shown by breaking things on purpose: SMTP that drops connections mid-DATA
// and answers 421/432, a token endpoint that fails now and then, a worker killed with SIGKILL in
// the middle of a batch, and a certificate the token endpoint does not know. Counts, not hopes.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { createServer, request, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { describe, it } from "node:test";
import { issueCertificate } from "../cli/local/devCertificates.js";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import type { SmtpFaultAction } from "../cli/local/smtpSink.js";
import { loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { openMailQueues, type MailQueues } from "../shared/queue/mailQueue.js";
import { SEND_LEDGER_TABLE } from "../shared/send/sendLedger.js";
import { openTable } from "../shared/storage/storageClients.js";
import { messageIdFor } from "../shared/transport/smtpTransport.js";
import { cliEntry } from "./support/cli.js";
import { capturingLogger, drain, useLocalStack, within, type CapturedLogger } from "./support/harness.js";

/** Deterministic "random" in [0, 1) from a transaction number. */
const hash = (seq: number) => ((seq * 2654435761) % 4294967296) / 4294967296;

const secretsPattern = /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\.|PRIVATE KEY|dXNlcj/;

async function enqueueMany(queues: MailQueues, count: number, prefix: string): Promise<string[]> {
  const ids: string[] = [];
  for (let start = 0; start < count; start += 50) {
    const batch = await Promise.all(
      Array.from({ length: Math.min(50, count - start) }, (_, k) => enqueueEmail(queues.queue, { id: `${prefix}-${start + k}`, to: `r${start + k}@example.test`, subject: `${prefix} ${start + k}`, text: "x" })),
    );
    ids.push(...batch.map((r) => r.id));
  }
  return ids;
}

function countBy<T>(items: T[]): Map<T, number> {
  const counts = new Map<T, number>();
  for (const item of items) counts.set(item, (counts.get(item) ?? 0) + 1);
  return counts;
}

describe("1,000 messages through faults: every one delivered exactly once", () => {
  const injected = { drop: 0, reply421: 0, reply432: 0, token503: 0 };
  const local = useLocalStack("qm-faults-", {
    // Tokens live 303 s and are refreshed 300 s early: a fresh token request every ~3 s, so
    // the failing token endpoint below is actually met.
    accessTokenTtlSeconds: 303,
    fault: ({ phase, seq }): SmtpFaultAction | undefined => {
      const roll = hash(seq * 2 + (phase === "data" ? 1 : 0));
      if (phase === "mail" && roll < 0.03) {
        injected.reply432 += 1;
        return { reply: 432, message: "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded" };
      }
      if (phase === "data" && roll < 0.04) {
        injected.drop += 1;
        return { drop: true };
      }
      if (phase === "data" && roll < 0.07) {
        injected.reply421 += 1;
        return { reply: 421, message: "4.3.2 Service not available, closing transmission channel" };
      }
      return undefined;
    },
  });

  it("delivers all, none twice, none lost; ledger and server agree", { timeout: 180_000 }, async () => {
    const { stack } = local;
    const env = { ...stack.env, RETRY_BASE_SECONDS: "0", RETRY_MAX_SECONDS: "1", MAX_DEQUEUE_COUNT: "10", WORKER_BATCH_SIZE: "32" };
    const queues = await openMailQueues(loadStorageConfig(env));
    const ids = await enqueueMany(queues, 1000, "fault");
    const tokenFailures = setInterval(() => {
      injected.token503 += 1;
      stack.oauth.failNext(1, 503, { error: "temporarily_unavailable", error_description: "AADSTS50000: service busy", error_codes: [50000] }, { "retry-after": "0" });
    }, 1500);
    const logger = capturingLogger();
    let summary;
    try {
      summary = await within(drain(env, logger), 150_000, "the worker to drain 1,000 messages");
    } finally {
      clearInterval(tokenFailures);
    }

    const delivered = countBy(stack.smtp.messages.map((m) => m.headers["message-id"]?.[0] ?? ""));
    const expected = new Set(ids.map((id) => messageIdFor(id, LOCAL_MAILBOX)));
    assert.equal(delivered.size, 1000, "1,000 distinct messages arrived");
    assert.deepEqual([...delivered.values()].filter((n) => n > 1), [], "none arrived twice");
    assert.ok([...delivered.keys()].every((m) => expected.has(m)));
    assert.deepEqual({ sent: summary.sent, poisoned: summary.poisoned }, { sent: 1000, poisoned: 0 });
    assert.equal((await queues.queue.getProperties()).approximateMessagesCount, 0, "queue empty");

    const ledger = await openTable(loadStorageConfig(env), SEND_LEDGER_TABLE);
    const rows: Array<{ status: string; messageId: string }> = [];
    for await (const row of ledger.listEntities<{ status: string; messageId: string }>()) rows.push(row);
    const ledgerSent = rows.filter((r) => r.status === "sent" && expected.has(r.messageId));
    assert.equal(ledgerSent.length, 1000, "the ledger records each of them as sent");
    assert.deepEqual(new Set(ledgerSent.map((r) => r.messageId)), new Set(delivered.keys()), "ledger and server agree");

    // The faults really happened, and the sender recovered from each kind.
    assert.ok(injected.drop > 10 && injected.reply421 > 10 && injected.reply432 > 10, JSON.stringify(injected));
    assert.ok(summary.retried >= injected.drop + injected.reply421, `retried ${summary.retried}`);
    assert.ok(stack.oauth.stats.tokenRequests > stack.oauth.stats.tokensIssued, "token requests failed along the way");
    const codes = countBy(logger.lines.map((l) => JSON.parse(l) as { event: string; error?: { code: string } }).filter((r) => r.event === "message.retry").map((r) => r.error?.code));
    for (const code of ["SMTP_CONNECTION_FAILED", "SMTP_THROTTLED", "SMTP_TEMPORARY_FAILURE"]) assert.ok((codes.get(code) ?? 0) > 0, `${code} seen: ${JSON.stringify([...codes])}`);
    assert.doesNotMatch(logger.lines.join("\n"), secretsPattern);
    console.log(`# faults: ${JSON.stringify(injected)}, retries ${summary.retried}, token requests ${stack.oauth.stats.tokenRequests} (${stack.oauth.stats.tokensIssued} issued), SMTP connections ${stack.smtp.stats.connections}`);
  });
});

/** An HTTP proxy to the queue service that delays every DELETE (a message acknowledgement). */
async function slowDeleteProxy(target: string): Promise<{ origin: string; close(): Promise<void> }> {
  const server: Server = createServer((req, res) => {
    const forward = () => {
      const upstream = request(new URL(req.url ?? "/", target), { method: req.method, headers: req.headers }, (reply) => {
        res.writeHead(reply.statusCode ?? 502, reply.headers);
        reply.pipe(res);
      });
      upstream.on("error", () => res.destroy());
      req.pipe(upstream);
    };
    if (req.method === "DELETE") setTimeout(forward, 1_500);
    else forward();
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    origin: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () => new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    }),
  };
}

describe("a worker killed with SIGKILL mid-batch", () => {
  const local = useLocalStack("qm-kill-");

  function startWorker(env: Record<string, string>, args: string[]) {
    const [node = process.execPath, ...entry] = cliEntry;
    const child = spawn(node, [...entry, "worker", ...args], { env: { PATH: process.env["PATH"] ?? "", ...env }, stdio: ["ignore", "pipe", "pipe"] });
    const lines: string[] = [];
    let buffer = "";
    child.stderr.on("data", (c: Buffer) => {
      buffer += c.toString();
      const parts = buffer.split("\n");
      buffer = parts.pop() ?? "";
      lines.push(...parts.filter(Boolean));
    });
    const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
    return { child, lines, exited };
  }

  it("delivered + poisoned = enqueued; the only repeats are unknown-outcome sends, with the same Message-ID; sent-but-unacknowledged ones are acknowledged as duplicates", { timeout: 240_000 }, async () => {
    const { stack } = local;
    const env: Record<string, string> = { ...stack.env, LEASE_SECONDS: "5", RETRY_BASE_SECONDS: "1", NODE_EXTRA_CA_CERTS: stack.caPath, WORKER_BATCH_SIZE: "32" };
    const queues = await openMailQueues(loadStorageConfig(env));
    const ids = await enqueueMany(queues, 400, "kill");
    // The first worker reaches the queue through a proxy that holds each delete back for 1.5 s, so
    // that when it dies some sends are done and recorded but not yet acknowledged: exactly what the
    // ledger's duplicate answer is for.
    const slowDeletes = await slowDeleteProxy(new URL(queues.queue.url).origin);
    const first = startWorker({ ...env, AzureWebJobsStorage: (env["AzureWebJobsStorage"] ?? "").replace(/QueueEndpoint=http:\/\/[^/;]+/, `QueueEndpoint=${slowDeletes.origin}`) }, []);
    await within(new Promise<void>((resolve) => {
      const stop = stack.smtp.onMessage(() => {
        if (stack.smtp.messages.length >= 150) {
          stop();
          first.child.kill("SIGKILL");
          resolve();
        }
      });
    }), 90_000, `150 deliveries before the kill (worker said: ${first.lines.slice(-3).join(" | ")})`).finally(() => first.child.kill("SIGKILL"));
    await within(first.exited, 10_000, "the killed worker to exit");
    await slowDeletes.close();
    const atKill = stack.smtp.messages.length;
    // Messages the dead worker held come back when their 5 s lease runs out.
    await new Promise((resolve) => setTimeout(resolve, 6_000));
    const resends: string[] = [];
    const duplicates: string[] = [];
    for (let round = 0; round < 4 && (await queues.queue.getProperties()).approximateMessagesCount! > 0; round++) {
      const second = startWorker(env, ["--drain"]);
      assert.equal(await within(second.exited, 60_000, "the restarted worker to drain").finally(() => second.child.kill("SIGKILL")), 0, second.lines.join("\n"));
      for (const line of second.lines) {
        const record = JSON.parse(line) as { event: string; id?: string };
        if (record.event === "message.resend_unknown_outcome" && record.id) resends.push(record.id);
        if (record.event === "message.duplicate" && record.id) duplicates.push(record.id);
      }
      if ((await queues.queue.getProperties()).approximateMessagesCount! > 0) await new Promise((resolve) => setTimeout(resolve, 5_500));
    }

    const delivered = countBy(stack.smtp.messages.map((m) => m.headers["message-id"]?.[0] ?? ""));
    const poison = (await queues.poison.peekMessages({ numberOfMessages: 32 })).peekedMessageItems.length;
    assert.equal(delivered.size + poison, ids.length, "delivered + poisoned = enqueued");
    assert.equal(poison, 0);
    const repeated = [...delivered].filter(([, n]) => n > 1).map(([messageId]) => messageId);
    const resentMessageIds = new Set(resends.map((id) => messageIdFor(id, LOCAL_MAILBOX)));
    assert.deepEqual(repeated.filter((m) => !resentMessageIds.has(m)), [], "every repeat was a resend of an unknown outcome");
    assert.ok(repeated.length <= 32, `repeats bounded by the batch in flight: ${repeated.length}`);
    // Sends the dead worker finished and recorded but never deleted: the ledger answers "sent".
    assert.ok(duplicates.length >= 1, "the restarted worker acknowledged at least one duplicate");
    for (const id of duplicates) assert.equal(delivered.get(messageIdFor(id, LOCAL_MAILBOX)), 1, `${id}: acknowledged, not sent again`);
    console.log(`# SIGKILL after ${atKill} deliveries: ${delivered.size} delivered, ${repeated.length} repeated (same Message-ID), ${resends.length} unknown-outcome resends, ${duplicates.length} acknowledged as duplicates`);
  });

  it("SIGTERM finishes the sends in flight, leaves the rest in the queue, and loses nothing", { timeout: 120_000 }, async () => {
    const { stack } = local;
    stack.smtp.messages.length = 0;
    const env = { ...stack.env, LEASE_SECONDS: "30", NODE_EXTRA_CA_CERTS: stack.caPath, WORKER_BATCH_SIZE: "16" };
    const queues = await openMailQueues(loadStorageConfig(env));
    await queues.queue.clearMessages();
    const ids = await enqueueMany(queues, 300, "term");
    const worker = startWorker(env, []);
    await within(new Promise<void>((resolve) => {
      const stop = stack.smtp.onMessage(() => {
        if (stack.smtp.messages.length >= 50) {
          stop();
          worker.child.kill("SIGTERM");
          resolve();
        }
      });
    }), 60_000, "50 deliveries before SIGTERM").catch((error: unknown) => {
      worker.child.kill("SIGKILL");
      throw error;
    });
    const began = Date.now();
    assert.equal(await within(worker.exited, 20_000, "the worker to stop after SIGTERM").finally(() => worker.child.kill("SIGKILL")), 0, worker.lines.join("\n"));
    assert.ok(Date.now() - began < 10_000, "stops promptly");
    const deliveredAtStop = stack.smtp.messages.length;
    const stopped = worker.lines.map((l) => JSON.parse(l) as { event: string; sent?: number }).find((r) => r.event === "worker.stopped");
    assert.equal(stopped?.sent, deliveredAtStop, "every send it started was finished and acknowledged");
    // Nothing it took is left hidden under its lease: the rest is visible right away.
    const left = (await queues.queue.peekMessages({ numberOfMessages: 32 })).peekedMessageItems.length;
    assert.ok(left > 0);
    assert.equal((await queues.queue.getProperties()).approximateMessagesCount, ids.length - deliveredAtStop);
    const rest = startWorker(env, ["--drain"]);
    assert.equal(await within(rest.exited, 60_000, "the second worker to drain").finally(() => rest.child.kill("SIGKILL")), 0);
    const delivered = countBy(stack.smtp.messages.map((m) => m.headers["message-id"]?.[0] ?? ""));
    assert.equal(delivered.size, ids.length);
    assert.deepEqual([...delivered.values()].filter((n) => n > 1), [], "nothing sent twice");
  });
});

describe("a misconfigured certificate", () => {
  const local = useLocalStack("qm-misconf-");

  it("poisons nothing, however often the worker runs; fixing it lets the waiting messages go out", { timeout: 120_000 }, async () => {
    const { stack, workDir } = local;
    const certPath = join(workDir, "wrong.pem");
    const stranger = issueCertificate({ commonName: "not registered on the app" });
    writeFileSync(certPath, stranger.certificatePem + stranger.privateKeyPem);
    const env = { ...stack.env, CERT_PATH: certPath, RETRY_BASE_SECONDS: "1", RETRY_MAX_SECONDS: "1", MAX_DEQUEUE_COUNT: "3" };
    const queues = await openMailQueues(loadStorageConfig(env));
    await enqueueMany(queues, 20, "misconf");

    const loggers: CapturedLogger[] = [];
    // More runs than MAX_DEQUEUE_COUNT: the messages must not run out of attempts.
    for (let run = 0; run < 5; run++) {
      const logger = capturingLogger();
      loggers.push(logger);
      const summary = await drain(env, logger);
      assert.equal(summary.circuitOpen?.code, "TOKEN_AADSTS700027", `run ${run}`);
      assert.match(summary.circuitOpen?.hint ?? "", /certificate/);
      assert.equal(summary.poisoned, 0);
      const opened = logger.lines.filter((l) => l.includes('"circuit.open"'));
      assert.equal(opened.length, 1, "one clear error per outage, not one per message");
      await new Promise((resolve) => setTimeout(resolve, 1_100));
    }
    assert.equal((await queues.poison.peekMessages({ numberOfMessages: 32 })).peekedMessageItems.length, 0, "nothing poisoned");
    assert.equal(stack.smtp.messages.length, 0);
    assert.equal((await queues.queue.getProperties()).approximateMessagesCount, 20, "all 20 still waiting");

    // The fix: the registered certificate.
    writeFileSync(certPath, stack.clientCertificate.certificatePem + stack.clientCertificate.privateKeyPem);
    await new Promise((resolve) => setTimeout(resolve, 1_100));
    const logger = capturingLogger();
    loggers.push(logger);
    let sent = 0;
    for (let run = 0; run < 5 && sent < 20; run++) {
      sent += (await drain(env, logger)).sent;
      if (sent < 20) await new Promise((resolve) => setTimeout(resolve, 1_100));
    }
    assert.equal(sent, 20);
    assert.equal(new Set(stack.smtp.messages.map((m) => m.headers["message-id"]?.[0])).size, 20);
    assert.equal((await queues.queue.getProperties()).approximateMessagesCount, 0);
    assert.doesNotMatch(loggers.flatMap((l) => l.lines).join("\n"), secretsPattern);
  });
});
