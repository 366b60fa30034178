// The benchmark must keep working: run it small and check what it reports (counts and shape, not
// speed: speed is for `npm run bench` on a quiet machine, not for tests).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { it } from "node:test";
import { fileURLToPath } from "node:url";

// A normal small run takes well under a minute here; a run still going after this is hung.
const LIMIT_MS = 4 * 60_000;

it("npm run bench (small): one token, two Key Vault reads, a naive token per message, no throttling, Graph within 4 in flight, daily limit holds, every field", { timeout: LIMIT_MS + 30_000 }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "qm-bench-"));
  const out = join(dir, "latest.json");
  try {
    const root = fileURLToPath(new URL("..", import.meta.url));
    const code = await new Promise<number | null>((resolve, reject) => {
      // detached: its own process group, so that a hung run is killed together with what it
      // started (Azurite, the worker); killing only bench/run.ts would leave those running.
      const child = spawn(process.execPath, ["--import", "tsx", "bench/run.ts", "--messages", "60", "--naive", "6", "--idle-seconds", "3", "--idle-probes", "1", "--scale-out-messages", "41", "--out", out], { cwd: root, stdio: ["ignore", "ignore", "inherit"], detached: true });
      const killAll = () => {
        try {
          if (child.pid !== undefined) process.kill(-child.pid, "SIGKILL");
        } catch {
          // the group is gone already
        }
      };
      const timer = setTimeout(() => {
        killAll();
        reject(new Error(`bench/run.ts did not finish within ${LIMIT_MS / 1000} s; it and everything it started were killed`));
      }, LIMIT_MS);
      // The test's own timeout (a backstop) or a cancelled run aborts t.signal: kill then too.
      t.signal.addEventListener("abort", killAll, { once: true });
      child.on("error", (error) => {
        clearTimeout(timer);
        reject(error);
      });
      child.on("exit", (status) => {
        clearTimeout(timer);
        t.signal.removeEventListener("abort", killAll);
        resolve(status);
      });
    });
    assert.equal(code, 0);
    const r = JSON.parse(readFileSync(out, "utf8"));
    for (const name of ["ours", "rawSmtp", "rawQueue", "naive"]) assert.ok(r.rates[name].messagesPerSecond > 0, name);
    assert.equal(r.rates.ours.messages, 60);
    assert.equal(r.counts.tokenRequests, 1);
    assert.equal(r.counts.keyVaultRequests, 2);
    assert.equal(r.counts.smtpAuths, r.counts.smtpConnections);
    assert.equal(r.rates.naive.tokenRequests, 6, "naive asks for a token per message");
    assert.equal(r.rateCap.throttlingReplies, 0);
    assert.equal(r.latencyMs.messages, 60);
    assert.ok(r.latencyMs.p50 <= r.latencyMs.p95 && r.latencyMs.p95 <= r.latencyMs.p99);
    assert.ok(r.memory.rssAfterNBytes > 0 && r.memory.peakRssBytes >= r.memory.rssAfterNBytes);
    assert.match(r.node, /^v\d+/);
    assert.ok(r.machine.cpus > 0);
    assert.equal(typeof r.targets.oneTokenRequest, "boolean");
    // diy at N through the same queue; storage requests counted by operation; latency after idle;
    // scale-out: every message once, never more connections than the mailbox allows, no 432.
    assert.equal(r.diy["60"].diy.messages, 60);
    assert.equal(r.diy["60"].ours.messages, 60);
    assert.ok(r.diy["60"].oursVsDiy > 0);
    assert.equal(r.storageRequestsPerMessage.oursRateLimitOff.messages, 60);
    assert.ok(r.storageRequestsPerMessage.oursRateLimitOff.byOperation["queue.delete"] >= 1, "a delete per message");
    assert.ok(r.storageRequestsPerMessage.diy.total >= 1 && r.storageRequestsPerMessage.diy.total < r.storageRequestsPerMessage.oursRateLimitOff.total);
    assert.ok(r.storageRequestsPerMessage.oursRateLimitOn.total > r.storageRequestsPerMessage.oursRateLimitOff.total, "the rate limit costs table requests");
    assert.equal(r.latencyAfterIdleMs.probes.length, 1);
    assert.ok(r.latencyAfterIdleMs.max > 0);
    assert.equal(r.scaleOut.delivered, 41);
    assert.equal(r.scaleOut.duplicates, 0);
    assert.equal(r.scaleOut.throttlingReplies, 0);
    assert.ok(r.scaleOut.maxAuthenticatedAtOnce >= 1 && r.scaleOut.maxAuthenticatedAtOnce <= 3, `${r.scaleOut.maxAuthenticatedAtOnce} connections at once`);
    // Templates cost: the same 60 messages written out and rendered, each delivered in full.
    assert.equal(r.rates.oursPlain.messages, 60);
    assert.equal(r.rates.oursTemplates.messages, 60);
    assert.equal(typeof r.targets.templatesWithin10Percent, "boolean");
    // Graph: ours and raw on the same 60 messages (min(N, 2000)), ours within Graph's 4 per mailbox.
    assert.equal(r.rates.oursGraph.messages, 60);
    assert.ok(r.rates.oursGraph.messagesPerSecond > 0, "oursGraph");
    assert.equal(r.rates.rawGraph.messages, 60);
    assert.ok(r.rates.rawGraph.messagesPerSecond > 0, "rawGraph");
    assert.ok(r.ratios.oursGraphVsRawGraph > 0);
    assert.ok(r.graph.requests >= 60, `${r.graph.requests} Graph requests for 60 messages`);
    assert.ok(r.graph.maxInFlight >= 1 && r.graph.maxInFlight <= 4, `most in flight: ${r.graph.maxInFlight}`);
    assert.equal(r.graph.throttled, 0);
    assert.equal(r.graph.tokenRequests, 1);
    assert.equal(typeof r.targets.graphAtLeast80PercentOfRaw, "boolean");
    // The daily recipient limit holds: exactly `limit` sent, the rest waits in the queue, none poisoned.
    assert.ok(r.dailyLimit.offered > r.dailyLimit.limit && r.dailyLimit.limit > 0);
    assert.equal(r.dailyLimit.delivered, r.dailyLimit.limit);
    assert.equal(r.dailyLimit.poisoned, 0);
    assert.equal(r.dailyLimit.stillQueued, r.dailyLimit.offered - r.dailyLimit.limit);
    assert.equal(r.targets.dailyLimitHolds, true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
