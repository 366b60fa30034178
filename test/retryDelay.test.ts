// The retry backoff (shared/queue/outcome.ts retryDelaySeconds): doubling per attempt, ±20 %
// jitter, the RETRY_MAX_SECONDS cap on our own backoff, and the server's Retry-After as a floor
// that wins over that cap (bounded only by the queue's 7-day visibility limit). The jitter uses
// Math.random, so the jitter tests draw many samples and assert bounds that hold for every sample,
// plus spread that thousands of uniform draws reach with overwhelming probability.
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { retryDelaySeconds } from "../shared/queue/outcome.js";

/** Azure Queue Storage: a visibility timeout is at most 7 days. Written out, not imported, so the test states the limit itself. */
const SEVEN_DAYS = 604_800;
const SAMPLES = 4_000;

function sample(attempt: number, policy: { retryBaseSeconds: number; retryMaxSeconds: number }, retryAfterSeconds?: number, count = SAMPLES): number[] {
  return Array.from({ length: count }, () => retryDelaySeconds(attempt, policy, retryAfterSeconds));
}

const min = (values: number[]) => values.reduce((a, b) => Math.min(a, b), Infinity);
const max = (values: number[]) => values.reduce((a, b) => Math.max(a, b), -Infinity);
const mean = (values: number[]) => values.reduce((a, b) => a + b, 0) / values.length;

describe("retryDelaySeconds", () => {
  it("doubles per attempt: attempt n centres on base·2^(n-1), within ±20 %, ranges never overlap", () => {
    const policy = { retryBaseSeconds: 10, retryMaxSeconds: 1_000_000 };
    let previousMax = 0;
    for (let attempt = 1; attempt <= 10; attempt++) {
      const nominal = 10 * 2 ** (attempt - 1);
      const delays = sample(attempt, policy, undefined, 1_000);
      assert.ok(min(delays) >= Math.round(nominal * 0.8), `attempt ${attempt}: min ${min(delays)} < 0.8 × ${nominal}`);
      assert.ok(max(delays) <= Math.round(nominal * 1.2), `attempt ${attempt}: max ${max(delays)} > 1.2 × ${nominal}`);
      // The jitter is symmetric: the mean sits at the nominal delay (1,000 uniform draws: well within 3 %).
      assert.ok(Math.abs(mean(delays) / nominal - 1) < 0.03, `attempt ${attempt}: mean ${mean(delays)} is not about ${nominal}`);
      // 1.2 × d < 0.8 × 2d: each attempt waits longer than any sample of the previous one.
      assert.ok(min(delays) > previousMax, `attempt ${attempt} overlaps attempt ${attempt - 1}`);
      previousMax = max(delays);
    }
  });

  it("treats attempt 0 (or less) like the first attempt", () => {
    const policy = { retryBaseSeconds: 100, retryMaxSeconds: 1_000 };
    for (const attempt of [0, -3]) {
      const delays = sample(attempt, policy);
      assert.ok(min(delays) >= 80 && max(delays) <= 120, `attempt ${attempt}: ${min(delays)}..${max(delays)}`);
    }
  });

  it("jitters by ±20 % in whole seconds, and really spreads over that range", () => {
    const delays = sample(1, { retryBaseSeconds: 100, retryMaxSeconds: 1_000 });
    assert.ok(delays.every(Number.isInteger), "whole seconds: a visibility timeout takes an integer");
    assert.ok(min(delays) >= 80, `min ${min(delays)}`);
    assert.ok(max(delays) <= 120, `max ${max(delays)}`);
    // Reaching both ends shows the width is ±20 %, not narrower (P(no draw in the lowest 2 %) ≈ 1e-35).
    assert.ok(min(delays) <= 82, `jitter never went below 82: min ${min(delays)}`);
    assert.ok(max(delays) >= 118, `jitter never went above 118: max ${max(delays)}`);
    assert.ok(new Set(delays).size >= 35, `only ${new Set(delays).size} distinct delays`);
  });

  it("caps the backoff at RETRY_MAX_SECONDS, jitter included", () => {
    const policy = { retryBaseSeconds: 10, retryMaxSeconds: 60 };
    // Attempt 4 is nominally 80 s, attempt 30 astronomically more (2^29 × 10): both hit the cap.
    for (const attempt of [4, 30, 2_000]) {
      const delays = sample(attempt, policy);
      assert.equal(max(delays), 60, `attempt ${attempt}: max ${max(delays)}`);
      // At the cap the jitter still spreads downwards, so failures that happened together do not all come back together.
      assert.ok(min(delays) >= 48 && min(delays) <= 50, `attempt ${attempt}: min ${min(delays)}`);
    }
    // A RETRY_BASE_SECONDS of 0 retries at once.
    assert.deepEqual(new Set(sample(3, { retryBaseSeconds: 0, retryMaxSeconds: 60 })), new Set([0]));
  });

  it("waits at least the server's Retry-After when it asks for more than the backoff", () => {
    const policy = { retryBaseSeconds: 10, retryMaxSeconds: 900 };
    assert.deepEqual(new Set(sample(1, policy, 30)), new Set([30]));
    // A Retry-After shorter than the backoff does not shorten it.
    const delays = sample(3, policy, 5);
    assert.ok(min(delays) >= 32 && max(delays) <= 48, `${min(delays)}..${max(delays)}`);
  });

  it("lets the server's Retry-After win over RETRY_MAX_SECONDS: asked for 120 s, it waits 120 s, not 60", () => {
    const policy = { retryBaseSeconds: 10, retryMaxSeconds: 60 };
    assert.deepEqual(new Set(sample(1, policy, 120)), new Set([120]));
    assert.deepEqual(new Set(sample(9, policy, 3_600)), new Set([3_600]));
  });

  it("bounds everything by the queue's 7-day visibility limit", () => {
    assert.deepEqual(new Set(sample(1, { retryBaseSeconds: 10, retryMaxSeconds: 60 }, 30 * 86_400)), new Set([SEVEN_DAYS]));
    // A RETRY_MAX_SECONDS above the queue's limit cannot produce an invalid visibility timeout either.
    const delays = sample(40, { retryBaseSeconds: 10, retryMaxSeconds: 10_000_000 });
    assert.equal(max(delays), SEVEN_DAYS);
  });

  it("rounds a fractional Retry-After up and ignores one that is not a positive number", () => {
    const policy = { retryBaseSeconds: 1, retryMaxSeconds: 60 };
    // The backoff is round(0.8..1.2) = 1 s; the server asked for 1.5 s: 2 s, never 1.5 (not a valid visibility timeout) or 1 (too early).
    assert.deepEqual(new Set(sample(1, policy, 1.5)), new Set([2]));
    for (const nonsense of [0, -5, Number.NaN, Number.POSITIVE_INFINITY]) {
      assert.deepEqual(new Set(sample(1, policy, nonsense)), new Set([1]), `Retry-After ${nonsense}`);
    }
  });
});
