// What the benchmark's runs share (bench/run.ts and the modules it calls, and their tests): the
// worker as a separate process, filling a queue, and the SMTP sink seen through what is measured.
import { spawn } from "node:child_process";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { QueueClient } from "@azure/storage-queue";
import type { LocalStack } from "../cli/local/localStack.js";
import type { SmtpFaultAction, SmtpSinkOptions } from "../cli/local/smtpSink.js";
import { encodeQueueText } from "../shared/queue/mailQueue.js";

export const root = fileURLToPath(new URL("..", import.meta.url));
// `queue-mailer` from the TypeScript sources through tsx (absolute paths: any cwd). Not through the
// bin, which runs dist/ whenever it exists: whatever was compiled last, since nothing here builds.
export const cli = ["--import", import.meta.resolve("tsx"), join(root, "cli", "main.ts")];
/** The hand-written contenders (bench/diy.ts --mode diy|naive), run like the worker. */
export const diyCommand = (mode: "diy" | "naive") => ["--import", import.meta.resolve("tsx"), join(root, "bench", "diy.ts"), "--mode", mode];

export function messageJson(i: number, extra: Record<string, unknown> = {}): string {
  return JSON.stringify({ id: `bench-${i}-${Math.random().toString(36).slice(2)}`, to: `user${i}@example.test`, subject: `Receipt ${i}`, text: `Thank you for order ${i}.\nTotal: 42.00`, ...extra });
}

export async function fill(queue: QueueClient, count: number, make: (i: number) => string = messageJson): Promise<void> {
  await queue.clearMessages();
  for (let start = 0; start < count; start += 64) {
    await Promise.all(Array.from({ length: Math.min(64, count - start) }, (_, k) => queue.sendMessage(encodeQueueText(make(start + k)))));
  }
}

export interface WorkerRun {
  exitCode: number | null;
  startedAt: number;
  stoppedAt: number;
  memoryAtStart: { rssBytes: number; peakRssBytes: number };
  memoryAtStop: { rssBytes: number; peakRssBytes: number };
  sent: number;
  waited: number;
  /** Messages the ledger recognised as sent already (acknowledged without sending). */
  duplicates: number;
  retried: number;
  poisoned: number;
}

/** After `until`, how long a worker gets to finish its sends in flight before it is killed. */
const KILL_AFTER_MS = 15_000;

/**
 * `queue-mailer worker` as users run it, in its own process; its JSON log lines are read back.
 * `command`: another contender that logs the same worker.started / worker.stopped lines (bench/diy.ts).
 */
export function runWorker(env: Record<string, string>, args: string[], until?: Promise<unknown>, command: string[] = [...cli, "worker"]): Promise<WorkerRun> {
  const child = spawn(process.execPath, [...command, ...args], { env: { PATH: process.env["PATH"] ?? "", ...env }, stdio: ["ignore", "ignore", "pipe"] });
  let buffer = "";
  const run: Partial<WorkerRun> = {};
  // The last other lines (warnings, a crash's stack): what a run that never stopped cleanly said.
  const recent: string[] = [];
  child.stderr.on("data", (chunk: Buffer) => {
    buffer += chunk.toString();
    const lines = buffer.split("\n");
    buffer = lines.pop() ?? "";
    for (const line of lines) {
      if (!line.includes('"worker.st')) {
        recent.push(line);
        if (recent.length > 30) recent.shift();
        continue;
      }
      const record = JSON.parse(line) as { event: string; time: string; memory: WorkerRun["memoryAtStart"]; sent?: number; waited?: number; duplicates?: number; retried?: number; poisoned?: number };
      if (record.event === "worker.started") {
        run.startedAt = Date.parse(record.time);
        run.memoryAtStart = record.memory;
      } else if (record.event === "worker.stopped") {
        run.stoppedAt = Date.parse(record.time);
        run.memoryAtStop = record.memory;
        run.sent = record.sent ?? 0;
        run.waited = record.waited ?? 0;
        run.duplicates = record.duplicates ?? 0;
        run.retried = record.retried ?? 0;
        run.poisoned = record.poisoned ?? 0;
      }
    }
  });
  void until?.then(() => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGTERM");
    // A worker stops after the sends in flight; one whose sends hang (a stall) must still end the run.
    const kill = setTimeout(() => child.kill("SIGKILL"), KILL_AFTER_MS);
    child.once("exit", () => clearTimeout(kill));
  });
  return new Promise((resolveRun, reject) =>
    child.on("exit", (code, signal) => {
      if (run.startedAt === undefined || run.memoryAtStop === undefined) {
        reject(new Error(`worker (${env["MAIL_QUEUE"]}, ${env["TRANSPORT"]}) exited (code ${code}, signal ${signal}) without logging worker.started and worker.stopped; its last lines:\n${[...recent, buffer].join("\n")}`));
      } else {
        resolveRun({ ...(run as WorkerRun), exitCode: code });
      }
    }),
  );
}

export interface SinkMessage {
  receivedAt: number;
  messageId: string;
  enqueuedAt?: number;
}

/** The sink's rate cap, switched by `sinkOf(…).rateCap()`; `rateCapFault` enforces it. */
export interface CapState {
  current: { limit: number; windowMs: number; accepted: number[] } | undefined;
  throttled: number;
}

/**
 * The local stack's SMTP `fault` for the rate-cap runs: 432 4.3.2 once more than `limit` messages
 * arrived within the window, as Exchange does past 30 a minute. Off while `capState.current` is unset.
 */
export function rateCapFault(capState: CapState): NonNullable<SmtpSinkOptions["fault"]> {
  return ({ phase }): SmtpFaultAction | undefined => {
    const cap = capState.current;
    if (!cap || phase !== "mail") return undefined;
    const now = Date.now();
    cap.accepted = cap.accepted.filter((t) => t > now - cap.windowMs);
    if (cap.accepted.length >= cap.limit) {
      capState.throttled += 1;
      return { reply: 432, message: "4.3.2 STOREDRV.ClientSubmit; sender submission rate limit exceeded" };
    }
    cap.accepted.push(now);
    return undefined;
  };
}

export type BenchSink = ReturnType<typeof sinkOf>;

/**
 * The token-checking SMTP sink of the local stack, seen through what the benchmark needs. It runs in
 * this process, so rawSmtp pays for the server here as well, like ours does.
 */
export function sinkOf(stack: LocalStack, capState: CapState) {
  const messages: SinkMessage[] = [];
  const listeners = new Set<(m: SinkMessage) => void>();
  stack.smtp.onMessage((m) => {
    const enqueuedAt = Number(m.headers["x-enqueued-at"]?.[0]);
    const event: SinkMessage = { receivedAt: m.receivedAt.getTime(), messageId: m.headers["message-id"]?.[0] ?? "", ...(Number.isFinite(enqueuedAt) ? { enqueuedAt } : {}) };
    messages.push(event);
    stack.smtp.messages.length = 0; // keep this process's memory flat over long runs
    for (const listener of [...listeners]) listener(event);
  });
  return {
    port: stack.smtp.port,
    messages,
    onMessage(listener: (m: SinkMessage) => void) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    rateCap(limit: number, windowMs: number) {
      capState.current = { limit, windowMs, accepted: [] };
      capState.throttled = 0;
    },
    rateCapOff() {
      capState.current = undefined;
    },
    stats: () => ({ connections: stack.smtp.stats.connections, auths: stack.smtp.stats.auths, throttled: capState.throttled, maxAuthenticatedAtOnce: stack.smtp.stats.maxAuthenticatedAtOnce }),
    resetStats: () => stack.smtp.resetStats(),
  };
}

/** A pause this long with nothing arriving, in a run that delivers hundreds a second, is a stall. */
export const STALL_MS = 5_000;

/**
 * Pauses with nothing arriving longer than STALL_MS, from sorted arrival times. Azurite's queue
 * service stops answering while it garbage-collects the extents of deleted messages (a mark and
 * sweep every 60 s that blocks its event loop: measured 18 s after 5,000 messages); the
 * throughput rows report their rate with and without these pauses.
 */
export function stallsOf(times: number[]): { stallMs: number; longestGapMs: number } {
  let stallMs = 0;
  let longestGapMs = 0;
  for (let i = 1; i < times.length; i++) {
    const gap = (times[i] ?? 0) - (times[i - 1] ?? 0);
    longestGapMs = Math.max(longestGapMs, gap);
    if (gap > STALL_MS) stallMs += gap;
  }
  return { stallMs, longestGapMs };
}
