// What the servers answer, followed through the whole pipeline (queue → worker → handler → sender →
// transport) instead of only through the classifier: SMTP refusals at RCPT and at AUTH from the
// sink, Key Vault throttling, outages and denials from the Key Vault double through the real Azure
// SDK, and a token endpoint's Retry-After. Each scenario gets a fresh mailer (its own circuit
// breaker, token cache and certificate source) and empty queues, and asserts what became of the
// message: delivered once, poisoned once with the reply, or still waiting in the queue.
import assert from "node:assert/strict";
import { after, before, beforeEach, describe, it } from "node:test";
import type { DequeuedMessageItem } from "@azure/storage-queue";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import type { SmtpFault, SmtpFaultAction } from "../cli/local/smtpSink.js";
import { runWorker, type WorkerSummary } from "../cli/worker.js";
import { loadSendConfig, loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { createMailer, type Mailer } from "../shared/mailer.js";
import { openMailQueues, type MailQueues } from "../shared/queue/mailQueue.js";
import type { Outcome } from "../shared/queue/outcome.js";
import { messageIdFor } from "../shared/transport/smtpTransport.js";
import { startKeyVaultDouble, type KeyVaultDouble } from "./support/keyVaultDouble.js";
import { capturingLogger, readPoison, useLocalStack, type CapturedLogger } from "./support/harness.js";

const GOOD = "good@example.test";
const NOT_FOUND = "nobody@example.test";
/** Exchange Online's answer for an address it does not know. */
const RECIPIENT_NOT_FOUND = "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup";
const AUTH_UNSUCCESSFUL = "5.7.3 Authentication unsuccessful";
const AUTH_DISABLED = "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.";
const CERT_NAME = "smtp-sender";

/** Each test sets the sink's behaviour here; beforeEach resets it to a well-behaved server. */
let fault: ((ctx: SmtpFault) => SmtpFaultAction | undefined) | undefined;

interface LogRecord {
  level: string;
  event: string;
  [field: string]: unknown;
}

function events(logger: CapturedLogger, event: string): LogRecord[] {
  return logger.lines.map((line) => JSON.parse(line) as LogRecord).filter((record) => record.event === event);
}

function eventNames(logger: CapturedLogger): string[] {
  return logger.lines.map((line) => (JSON.parse(line) as LogRecord).event);
}

interface Run {
  summary: WorkerSummary;
  outcomes: Outcome[];
  /** The queue's dequeue count of each processed message, in outcome order. */
  dequeueCounts: number[];
}

/**
 * Runs the real worker over the real queue with `mailer`: until it drains, or, with `until`, until
 * the outcomes so far satisfy it (a retried message comes back only after its backoff, which a
 * drain would not wait for). Fails with the outcomes and the last log lines after `timeoutMs`.
 */
async function runWorkerOn(mailer: Mailer, logger: CapturedLogger, options: { until?: (outcomes: Outcome[]) => boolean; timeoutMs?: number } = {}): Promise<Run> {
  const outcomes: Outcome[] = [];
  const dequeueCounts: number[] = [];
  const stop = new AbortController();
  const timeoutMs = options.timeoutMs ?? 20_000;
  const worker = runWorker({
    mailer,
    logger,
    drain: options.until === undefined,
    maxPollIntervalMs: 200,
    signal: stop.signal,
    onOutcome(outcome: Outcome, message: DequeuedMessageItem) {
      outcomes.push(outcome);
      dequeueCounts.push(message.dequeueCount);
      if (options.until?.(outcomes)) stop.abort();
    },
  });
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      stop.abort();
      reject(new Error(`worker did not finish within ${timeoutMs} ms; outcomes so far: ${JSON.stringify(outcomes.map((o) => o.status))}\n${logger.lines.slice(-15).join("\n")}`));
    }, timeoutMs);
  });
  // After a timeout the aborted worker may still be finishing a send; the test has failed by then,
  // so it is not awaited (that could hang too), only kept from becoming an unhandled rejection.
  worker.catch(() => undefined);
  try {
    const summary = await Promise.race([worker, timeout]);
    return { summary, outcomes, dequeueCounts };
  } finally {
    clearTimeout(timer);
  }
}

/** A fresh mailer for one scenario (no circuit state, token or certificate carried over), closed after. */
async function withMailer<T>(env: Record<string, string>, logger: CapturedLogger, use: (mailer: Mailer) => Promise<T>): Promise<T> {
  const mailer = createMailer(loadSendConfig(env), logger);
  try {
    return await use(mailer);
  } finally {
    await mailer.close();
  }
}

function counts(summary: WorkerSummary) {
  return { sent: summary.sent, poisoned: summary.poisoned, retried: summary.retried, waited: summary.waited };
}

describe("server replies through the pipeline", () => {
  const local = useLocalStack("qm-replies-", { fault: (ctx) => fault?.(ctx) });
  let kv: KeyVaultDouble;
  let restoreEnv: (() => void) | undefined;
  let queues: MailQueues;

  /** The local stack's settings with the certificate read from the Key Vault double instead of CERT_PATH. */
  const keyVaultEnv = (): Record<string, string> => ({ ...local.stack.env, CERT_PATH: "", KEY_VAULT_URL: kv.vaultUrl, CERT_NAME });

  before(async () => {
    kv = await startKeyVaultDouble();
    kv.putCertificate(CERT_NAME, { ...local.stack.clientCertificate, contentType: "application/x-pkcs12" });
    // Before any Azure SDK client of this process is built: NO_PROXY is read once per process.
    restoreEnv = kv.applyEnv();
    queues = await openMailQueues(loadStorageConfig(local.stack.env));
  });

  after(async () => {
    restoreEnv?.();
    await kv?.close();
  });

  beforeEach(async () => {
    fault = undefined;
    await Promise.all([queues.queue.clearMessages(), queues.poison.clearMessages()]);
    const { smtp, oauth } = local.stack;
    smtp.messages.length = 0;
    smtp.resetStats();
    oauth.resetStats();
    kv.resetCounts();
  });

  const queueDepth = async () => (await queues.queue.getProperties()).approximateMessagesCount;

  it("RCPT 550 5.1.10 for the only recipient: poisoned once with the reply, nothing delivered, not retried", async () => {
    const offered: string[] = [];
    fault = ({ phase, address }) => {
      if (phase !== "rcpt") return undefined;
      offered.push(address ?? "");
      return address === NOT_FOUND ? { reply: 550, message: RECIPIENT_NOT_FOUND } : undefined;
    };
    await enqueueEmail(queues.queue, { to: NOT_FOUND, subject: "Nobody home", text: "x" });
    const [queued] = (await queues.queue.peekMessages()).peekedMessageItems;
    assert.ok(queued);

    const logger = capturingLogger();
    const { summary, poisonRecords } = await withMailer(local.stack.env, logger, async (mailer) => ({ ...(await runWorkerOn(mailer, logger)), poisonRecords: await readPoison(mailer) }));

    assert.deepEqual(counts(summary), { sent: 0, poisoned: 1, retried: 0, waited: 0 });
    assert.equal(poisonRecords.length, 1, "one poison record");
    const [record] = poisonRecords;
    assert.equal(record?.reason.code, "SMTP_RECIPIENT_REJECTED");
    assert.match(record?.reason.response ?? "", /^550 5\.1\.10 RESOLVER\.ADR\.RecipientNotFound/);
    assert.equal(record?.attempts, 1);
    assert.equal(record?.original, queued.messageText, "the queue text exactly as received");
    assert.deepEqual(offered, [NOT_FOUND], "the recipient was offered once: no retry");
    assert.equal(local.stack.smtp.messages.length, 0, "nothing delivered");
    assert.equal(local.stack.smtp.stats.rejected, 1);
    assert.equal(await queueDepth(), 0, "gone from the mail queue");
    assert.equal(events(logger, "message.poisoned").length, 1);
    assert.equal(events(logger, "message.retry").length, 0);
  });

  it("one of two recipients refused: sent once to the other, the refusal logged with the send", async () => {
    const offered: string[] = [];
    fault = ({ phase, address }) => {
      if (phase !== "rcpt") return undefined;
      offered.push(address ?? "");
      return address === NOT_FOUND ? { reply: 550, message: RECIPIENT_NOT_FOUND } : undefined;
    };
    const { id } = await enqueueEmail(queues.queue, { to: [GOOD, NOT_FOUND], subject: "Half delivered", text: "x" });

    const logger = capturingLogger();
    const { summary, poisonRecords } = await withMailer(local.stack.env, logger, async (mailer) => ({ ...(await runWorkerOn(mailer, logger)), poisonRecords: await readPoison(mailer) }));

    assert.deepEqual(counts(summary), { sent: 1, poisoned: 0, retried: 0, waited: 0 });
    const delivered = local.stack.smtp.messages;
    assert.equal(delivered.length, 1, "delivered once");
    assert.deepEqual(delivered[0]?.rcptTo, [GOOD], "only the accepted recipient is in the envelope");
    assert.equal(delivered[0]?.headers["message-id"]?.[0], messageIdFor(id, LOCAL_MAILBOX));
    assert.deepEqual(offered.sort(), [GOOD, NOT_FOUND].sort(), "each recipient offered once");
    const sent = events(logger, "message.sent");
    assert.equal(sent.length, 1);
    assert.deepEqual(sent[0]?.["rejected"], [NOT_FOUND], "the refused recipient is logged with the send");
    const refused = events(logger, "smtp.recipient_refused");
    assert.equal(refused.length, 1);
    assert.equal(refused[0]?.["recipient"], NOT_FOUND);
    assert.match(String(refused[0]?.["response"]), /^550 5\.1\.10/, "with the server's reply");
    assert.equal(poisonRecords.length, 0);
    assert.equal(await queueDepth(), 0);
  });

  it("535 at AUTH that persists after the one token renewal: circuit opens, nothing poisoned, the message waits", async () => {
    let authAttempts = 0;
    fault = ({ phase }) => {
      if (phase !== "auth") return undefined;
      authAttempts += 1;
      return { reply: 535, message: AUTH_UNSUCCESSFUL };
    };
    await enqueueEmail(queues.queue, { to: GOOD, subject: "Behind a broken login", text: "x" });

    const logger = capturingLogger();
    const { summary, outcomes, poisonRecords } = await withMailer(local.stack.env, logger, async (mailer) => ({ ...(await runWorkerOn(mailer, logger)), poisonRecords: await readPoison(mailer) }));

    assert.equal(summary.circuitOpen?.code, "SMTP_AUTH_REJECTED");
    assert.equal(summary.circuitOpen?.kind, "config");
    assert.match(summary.circuitOpen?.hint ?? "", /SMTP\.SendAsApp/);
    assert.deepEqual(counts(summary), { sent: 0, poisoned: 0, retried: 0, waited: 1 });
    assert.equal(outcomes[0]?.status, "wait");
    const opened = events(logger, "circuit.open");
    assert.equal(opened.length, 1, "one clear error for the outage");
    assert.equal((opened[0]?.["error"] as { code?: string } | undefined)?.code, "SMTP_AUTH_REJECTED");
    // The message's attempt: token, 535, one renewal, 535. The worker's probe then comes within the
    // renewal's coalescing window, so it reuses the renewed token and makes no third request.
    assert.equal(local.stack.oauth.stats.tokenRequests, 2, "one token and exactly one renewal");
    assert.equal(events(logger, "token.renew").length, 1);
    assert.equal(authAttempts, 3, "AUTH with the first token, with the renewed one, and the probe's");
    assert.equal(local.stack.smtp.stats.authFailures, 3);
    assert.equal(poisonRecords.length, 0, "nothing poisoned");
    assert.equal(local.stack.smtp.messages.length, 0);
    assert.equal(await queueDepth(), 1, "the message is still in the queue");
  });

  it("535 5.7.139 at AUTH: SMTP_AUTH_DISABLED (config), circuit opens without a pointless token renewal, nothing poisoned", async () => {
    fault = ({ phase }) => (phase === "auth" ? { reply: 535, message: AUTH_DISABLED } : undefined);
    await enqueueEmail(queues.queue, { to: GOOD, subject: "SMTP AUTH off", text: "x" });

    const logger = capturingLogger();
    const { summary, outcomes, poisonRecords } = await withMailer(local.stack.env, logger, async (mailer) => ({ ...(await runWorkerOn(mailer, logger)), poisonRecords: await readPoison(mailer) }));

    assert.equal(summary.circuitOpen?.code, "SMTP_AUTH_DISABLED");
    assert.equal(summary.circuitOpen?.kind, "config");
    assert.match(summary.circuitOpen?.hint ?? "", /Set-CASMailbox/);
    assert.match(summary.circuitOpen?.response ?? "", /^535 5\.7\.139/);
    assert.deepEqual(counts(summary), { sent: 0, poisoned: 0, retried: 0, waited: 1 });
    const first = outcomes[0];
    assert.equal(first?.status, "wait");
    assert.equal(first?.error.code, "SMTP_AUTH_DISABLED");
    assert.equal(events(logger, "circuit.open").length, 1);
    // A new token cannot switch SMTP AUTH back on: the message's attempt does not renew. Only the
    // worker's probe fetches a fresh token (it always does), hence two token requests in all.
    const names = eventNames(logger);
    assert.ok(names.indexOf("circuit.open") < names.indexOf("token.renew"), `no renewal before the circuit opened: ${names.join(", ")}`);
    assert.equal(local.stack.oauth.stats.tokenRequests, 2, "the message's token and the probe's");
    assert.equal(local.stack.smtp.stats.authFailures, 2, "the message's AUTH and the probe's");
    assert.equal(poisonRecords.length, 0, "nothing poisoned");
    assert.equal(local.stack.smtp.messages.length, 0);
    assert.equal(await queueDepth(), 1, "the message is still in the queue");
  });

  // The Azure SDK retries 429 and 5xx itself (3 retries, so 4 requests) before our code sees the
  // failure; failNext(4, ...) makes that one certificate read fail for good. Retry-After: 0 keeps
  // the SDK's throttling retries immediate. (A 500 without Retry-After takes the SDK's exponential
  // path instead, 7 to 14 s of waiting for the same classification, so it is not repeated here.)
  for (const status of [429, 503]) {
    it(`Key Vault ${status} for the certificate: outcome retry (KEYVAULT_UNAVAILABLE), delivered on the next attempt`, async () => {
      kv.failNext(4, status, undefined, { "Retry-After": "0" });
      const { id } = await enqueueEmail(queues.queue, { to: GOOD, subject: `After vault ${status}`, text: "x" });

      const logger = capturingLogger();
      // One mailer for both attempts: the failed certificate load must not be cached.
      const { summary, outcomes, dequeueCounts, poisonRecords } = await withMailer(keyVaultEnv(), logger, async (mailer) => ({
        ...(await runWorkerOn(mailer, logger, { until: (seen) => seen.some((o) => o.status === "sent"), timeoutMs: 20_000 })),
        poisonRecords: await readPoison(mailer),
      }));

      assert.deepEqual(outcomes.map((o) => o.status), ["retry", "sent"]);
      assert.deepEqual(dequeueCounts, [1, 2], "retried in place by the queue, not as a copy");
      const retry = outcomes[0];
      assert.ok(retry?.status === "retry");
      assert.equal(retry.error.code, "KEYVAULT_UNAVAILABLE");
      assert.equal(retry.error.kind, "transient");
      assert.match(retry.error.message, new RegExp(`\\(${status}\\)`));
      assert.equal(retry.afterSeconds, 1, "RETRY_BASE_SECONDS=1 on the first attempt");
      assert.deepEqual(counts(summary), { sent: 1, poisoned: 0, retried: 1, waited: 0 });
      assert.equal(events(logger, "circuit.open").length, 0, "an unavailable vault is not a broken setup");
      assert.deepEqual(
        { certificateGets: kv.counts.certificateGets, secretGets: kv.counts.secretGets },
        { certificateGets: 5, secretGets: 1 },
        "4 refused certificate reads, then one certificate and one key read",
      );
      assert.equal(local.stack.oauth.stats.tokenRequests, 1, "no token request without a certificate, one after");
      const delivered = local.stack.smtp.messages;
      assert.equal(delivered.length, 1, "delivered once");
      assert.equal(delivered[0]?.headers["message-id"]?.[0], messageIdFor(id, LOCAL_MAILBOX));
      assert.equal(poisonRecords.length, 0);
      assert.equal(await queueDepth(), 0);
    });
  }

  it("Key Vault 403 for the certificate: outcome wait (KEYVAULT_ACCESS_DENIED), circuit open, nothing poisoned; sent once access is back", async () => {
    // The message's attempt and the worker's probe are both refused; the SDK does not retry a 403.
    kv.failNext(2, 403);
    const { id } = await enqueueEmail(queues.queue, { to: GOOD, subject: "Vault says no", text: "x" });

    const logger = capturingLogger();
    const { summary, outcomes, poisonRecords } = await withMailer(keyVaultEnv(), logger, async (mailer) => ({ ...(await runWorkerOn(mailer, logger)), poisonRecords: await readPoison(mailer) }));

    assert.equal(summary.circuitOpen?.code, "KEYVAULT_ACCESS_DENIED");
    assert.match(summary.circuitOpen?.hint ?? "", /Key Vault Certificate User/);
    assert.deepEqual(counts(summary), { sent: 0, poisoned: 0, retried: 0, waited: 1 });
    assert.equal(outcomes[0]?.status, "wait");
    assert.equal(outcomes[0]?.error.code, "KEYVAULT_ACCESS_DENIED");
    assert.equal(events(logger, "circuit.open").length, 1);
    assert.deepEqual({ certificateGets: kv.counts.certificateGets, secretGets: kv.counts.secretGets }, { certificateGets: 2, secretGets: 0 });
    assert.equal(local.stack.oauth.stats.tokenRequests, 0, "no token request without a certificate");
    assert.equal(poisonRecords.length, 0, "nothing poisoned");
    assert.equal(local.stack.smtp.messages.length, 0);
    assert.equal(await queueDepth(), 1, "the message is still in the queue");

    // Access restored (no more injected 403s): the waiting message goes out once its wait is over.
    const later = capturingLogger();
    const recovered = await withMailer(keyVaultEnv(), later, (mailer) => runWorkerOn(mailer, later, { until: (seen) => seen.some((o) => o.status === "sent"), timeoutMs: 15_000 }));
    assert.deepEqual(recovered.outcomes.map((o) => o.status), ["sent"]);
    assert.equal(local.stack.smtp.messages.length, 1);
    assert.equal(local.stack.smtp.messages[0]?.headers["message-id"]?.[0], messageIdFor(id, LOCAL_MAILBOX));
    assert.equal(await queueDepth(), 0);
  });

  it("a token endpoint's Retry-After beyond RETRY_MAX_SECONDS wins: asked for 120 s, the message is hidden 120 s, not 60", async () => {
    local.stack.oauth.failNext(
      1,
      429,
      { error: "temporarily_unavailable", error_description: "AADSTS90033: A transient error has occurred. Please try again.", error_codes: [90033] },
      { "Retry-After": "120" },
    );
    await enqueueEmail(queues.queue, { to: GOOD, subject: "Throttled token", text: "x" });

    const logger = capturingLogger();
    const { summary, outcomes } = await withMailer({ ...local.stack.env, RETRY_MAX_SECONDS: "60" }, logger, (mailer) => runWorkerOn(mailer, logger));

    assert.deepEqual(counts(summary), { sent: 0, poisoned: 0, retried: 1, waited: 0 });
    const retry = outcomes[0];
    assert.ok(retry?.status === "retry");
    assert.equal(retry.error.code, "TOKEN_AADSTS90033");
    assert.equal(retry.error.retryAfterSeconds, 120);
    assert.equal(retry.afterSeconds, 120);
    assert.equal(events(logger, "message.retry")[0]?.["afterSeconds"], 120);
    assert.equal(local.stack.oauth.stats.tokenRequests, 1, "the server is not asked again before its Retry-After");
    // Hidden by the worker for the backoff: still in the queue, not visible.
    assert.equal(await queueDepth(), 1);
    assert.equal((await queues.queue.peekMessages()).peekedMessageItems.length, 0);
    assert.equal(local.stack.smtp.messages.length, 0);
  });
});
