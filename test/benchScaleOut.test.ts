// The benchmark's scale-out run, small: two worker processes on one queue and one mailbox against a
// sink that throttles past the cap. Counts, not speed: every message once, the connection cap held
// across the processes, no throttling, and no stall.
import assert from "node:assert/strict";
import { resolve } from "node:path";
import { describe, it } from "node:test";
import { runScaleOut } from "../bench/scaleOut.js";
import { rateCapFault, sinkOf, type CapState } from "../bench/support.js";
import { useLocalStack } from "./support/harness.js";

describe("bench scaleOut", () => {
  const capState: CapState = { current: undefined, throttled: 0 };
  const local = useLocalStack("qm-scaleout-", { fault: rateCapFault(capState) });

  it("two workers deliver every message once, within the cap and the mailbox's connections", { timeout: 90_000 }, async () => {
    const { stack } = local;
    const sink = sinkOf(stack, capState);
    const result = await runScaleOut({
      // The workers trust the sink's CA the way `npm test` makes this process trust it.
      env: { ...stack.env, NODE_EXTRA_CA_CERTS: resolve(stack.caPath) },
      sink,
      workers: 2,
      messages: 30,
      limit: 10,
      windowSeconds: 2,
      // Fewer than the two pools together could open (2 each): the cap must hold across processes.
      maxConnections: 2,
      // A healthy run takes about 10 s here; past this the workers are stopped and the run fails
      // as timed out, with what each worker said, instead of hanging the suite.
      timeoutMs: 30_000,
    });
    const summary = JSON.stringify(result);
    assert.equal(result.timedOut, false, `the workers did not finish (longest gap between arrivals ${result.longestGapSeconds} s): ${summary}`);
    assert.equal(result.delivered, 30, summary);
    assert.equal(result.duplicates, 0, summary);
    assert.equal(result.undelivered, 0, summary);
    assert.equal(result.throttlingReplies, 0, summary);
    assert.ok(result.maxInAnyWindow <= 10, `${result.maxInAnyWindow} arrived within one window`);
    assert.ok(result.maxAuthenticatedAtOnce >= 1 && result.maxAuthenticatedAtOnce <= 2, `${result.maxAuthenticatedAtOnce} authenticated connections at once`);
    assert.equal(result.perWorker.length, 2);
    const runs = result.perWorker.map((w) => {
      assert.ok(!("error" in w), "error" in w ? w.error : "");
      return w;
    });
    assert.equal(runs.reduce((sum, w) => sum + w.sent, 0), 30, "the workers' own counts add up");
    assert.ok(runs.every((w) => w.exitCode === 0));
    // Three windows' worth at 10 per 2 s: the first and last arrival at least two windows apart.
    assert.equal(result.idealSeconds, 4);
    assert.ok(result.actualSeconds >= 3.9 && result.shareOfAllowed <= 1.03, summary);
  });
});
