// Scale-out: several `queue-mailer worker --drain` processes on one queue and one mailbox, as the
// Functions host runs instances, against a sink that enforces the mailbox's rate cap (432 4.3.2
// past `limit` per window). The per-mailbox promise is that together they stay within the cap and
// within Exchange's connections per mailbox, while still using the rate the cap allows: the rate
// limiter and the connection slots live in Table storage, not in any one process.
import { loadStorageConfig } from "../shared/config.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { CONNECTION_TABLE } from "../shared/send/connectionSlots.js";
import { RATE_TABLE } from "../shared/send/rateLimiter.js";
import { openTable, tableKey } from "../shared/storage/storageClients.js";
import { fill, runWorker, stallsOf, type BenchSink, type WorkerRun } from "./support.js";

export interface ScaleOutOptions {
  /**
   * Settings every worker gets (storage, credentials, SMTP pointed at the sink, the trust for its
   * CA); the queue, the limits and RETRY_BASE_SECONDS here override theirs.
   */
  env: Record<string, string>;
  /** The stack's sink with a rate cap (bench/support.ts sinkOf; the stack's fault is rateCapFault). */
  sink: BenchSink;
  workers?: number;
  messages?: number;
  /** Messages per window, for the workers (SEND_RATE_PER_MINUTE) and the sink alike. */
  limit?: number;
  windowSeconds?: number;
  /** SMTP_MAX_CONNECTIONS: per process, and per mailbox across them (slots in Table storage). */
  maxConnections?: number;
  queue?: string;
  /**
   * Workers still running after this are stopped (SIGTERM, then SIGKILL 15 s later) and the run is
   * reported as timed out; default: 3 × the ideal time + 60 s.
   */
  timeoutMs?: number;
  log?: (line: string) => void;
}

export interface ScaleOutResult {
  workers: number;
  /** Offered. */
  messages: number;
  limit: number;
  windowSeconds: number;
  maxConnections: number;
  /** Distinct Message-IDs that reached the sink. */
  delivered: number;
  /** Arrivals beyond the first of each Message-ID (target 0). */
  duplicates: number;
  /** Offered messages that never arrived: still in the queue, poisoned, or lost. */
  undelivered: number;
  stillQueued: number;
  poisoned: number;
  /** (ceil(messages / limit) − 1) × window: first to last arrival at exactly the allowed rate. */
  idealSeconds: number;
  /** First to last arrival. */
  actualSeconds: number;
  /** ideal / actual (target ≥ 0.95; above 1 means the cap was broken). */
  shareOfAllowed: number;
  /** The most arrivals within any window of `windowSeconds`, seen from the sink (≤ limit). */
  maxInAnyWindow: number;
  /** 432 replies the sink gave (target 0). */
  throttlingReplies: number;
  /** The most authenticated SMTP connections open at once over all workers (target ≤ maxConnections). */
  maxAuthenticatedAtOnce: number;
  smtpConnections: number;
  smtpAuths: number;
  /** The longest time between two consecutive arrivals: a stall shows here (a window is normal). */
  longestGapSeconds: number;
  /** Workers were still running at `timeoutMs` and were stopped. */
  timedOut: boolean;
  /**
   * After a timeout: rate and connection slots the killed workers still held (rows of the mailbox
   * in Table storage), deleted so that later runs on the same mailbox do not wait for their leases.
   */
  clearedSlots: number;
  /**
   * Each worker's own account from its worker.stopped line, or why there is none (killed at the
   * deadline, crashed: its last log lines).
   */
  perWorker: Array<(Pick<WorkerRun, "sent" | "waited" | "duplicates" | "retried" | "poisoned" | "exitCode"> & { seconds: number }) | { error: string }>;
}

const round3 = (x: number) => Math.round(x * 1000) / 1000;

/** Most timestamps (sorted) within any half-open span of `windowMs`. */
function maxWithin(sorted: number[], windowMs: number): number {
  let most = 0;
  for (let start = 0, end = 0; end < sorted.length; end++) {
    while ((sorted[end] ?? 0) - (sorted[start] ?? 0) >= windowMs) start++;
    most = Math.max(most, end - start + 1);
  }
  return most;
}

export async function runScaleOut(options: ScaleOutOptions): Promise<ScaleOutResult> {
  const { sink } = options;
  const workers = options.workers ?? 3;
  const messages = options.messages ?? 100;
  const limit = options.limit ?? 20;
  const windowSeconds = options.windowSeconds ?? 4;
  const maxConnections = options.maxConnections ?? 3;
  const queueName = options.queue ?? "bench-scaleout";
  const log = options.log ?? (() => undefined);
  const idealMs = (Math.ceil(messages / limit) - 1) * windowSeconds * 1000;

  const env: Record<string, string> = {
    ...options.env,
    MAIL_QUEUE: queueName,
    SEND_RATE_PER_MINUTE: String(limit),
    SEND_RATE_WINDOW_SECONDS: String(windowSeconds),
    SMTP_MAX_CONNECTIONS: String(maxConnections),
    // A 432, should one come, is retried after a second rather than the default ten: the run
    // then shows the cost of a throttle instead of waiting it out.
    RETRY_BASE_SECONDS: "1",
  };
  const queues = await openMailQueues(loadStorageConfig(env));
  await fill(queues.queue, messages);
  await queues.poison.clearMessages();

  log(`scaleOut: ${workers} workers, ${messages} messages at ${limit} per ${windowSeconds} s, ${maxConnections} SMTP connections per mailbox…`);
  const before = sink.messages.length;
  sink.rateCap(limit, windowSeconds * 1000);
  // Connections still open from an earlier run stay counted (resetStats keeps them): they would
  // share the mailbox's cap with these workers just the same.
  sink.resetStats();
  let timer: NodeJS.Timeout | undefined;
  let timedOut = false;
  const deadline = new Promise<void>((resolve) => {
    timer = setTimeout(() => {
      timedOut = true;
      log(`scaleOut: workers still running after ${Math.round((options.timeoutMs ?? 3 * idealMs + 60_000) / 1000)} s; stopping them`);
      resolve();
    }, options.timeoutMs ?? 3 * idealMs + 60_000);
  });
  let settled: Array<PromiseSettledResult<WorkerRun>>;
  try {
    // All at once, like instances the host starts together; each drains until the queue looks empty.
    settled = await Promise.allSettled(Array.from({ length: workers }, () => runWorker(env, ["--drain"], deadline)));
  } finally {
    clearTimeout(timer);
    sink.rateCapOff();
  }
  const stats = sink.stats();
  let clearedSlots = 0;
  if (timedOut) {
    // Killed workers never release: their rate slots stay held for minutes and their connection
    // leases for a minute, which would stall whatever runs next on this mailbox.
    const storage = loadStorageConfig(env);
    const partition = tableKey((env["SMTP_USER"] ?? env["MAIL_FROM"] ?? "").toLowerCase());
    for (const name of [RATE_TABLE, CONNECTION_TABLE]) {
      const table = await openTable(storage, name);
      for await (const row of table.listEntities({ queryOptions: { filter: `PartitionKey eq '${partition.replace(/'/g, "''")}'` } })) {
        await table.deleteEntity(row.partitionKey ?? partition, row.rowKey ?? "");
        clearedSlots += 1;
      }
    }
  }

  const arrivals = sink.messages.slice(before);
  const ids = new Set(arrivals.map((m) => m.messageId));
  const times = arrivals.map((m) => m.receivedAt).sort((a, b) => a - b);
  const actualMs = (times.at(-1) ?? 0) - (times[0] ?? 0);
  const { longestGapMs } = stallsOf(times);
  // A queue's count includes hidden messages (a retry's backoff), which a drain leaves behind.
  const stillQueued = (await queues.queue.getProperties()).approximateMessagesCount ?? -1;
  const poisoned = (await queues.poison.getProperties()).approximateMessagesCount ?? -1;
  return {
    workers,
    messages,
    limit,
    windowSeconds,
    maxConnections,
    delivered: ids.size,
    duplicates: arrivals.length - ids.size,
    undelivered: messages - ids.size,
    stillQueued,
    poisoned,
    idealSeconds: idealMs / 1000,
    actualSeconds: actualMs / 1000,
    shareOfAllowed: actualMs > 0 ? round3(idealMs / actualMs) : 0,
    maxInAnyWindow: maxWithin(times, windowSeconds * 1000),
    throttlingReplies: stats.throttled,
    maxAuthenticatedAtOnce: stats.maxAuthenticatedAtOnce,
    smtpConnections: stats.connections,
    smtpAuths: stats.auths,
    longestGapSeconds: longestGapMs / 1000,
    timedOut,
    clearedSlots,
    perWorker: settled.map((s) => {
      if (s.status === "rejected") return { error: (s.reason as Error).message };
      const r = s.value;
      return { sent: r.sent, waited: r.waited, duplicates: r.duplicates, retried: r.retried, poisoned: r.poisoned, exitCode: r.exitCode, seconds: (r.stoppedAt - r.startedAt) / 1000 };
    }),
  };
}
