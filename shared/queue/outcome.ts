// What became of one queue message. The pipeline returns an Outcome and never throws for the
// message's own fault; only the queue adapters (Functions host, worker) turn it into behaviour.
import type { MailerError } from "../errors.js";

export interface PoisonRecord {
  reason: { code: string; message: string; response?: string };
  attempts: number;
  failedAt: string;
  /** The queue text exactly as received. */
  original: string;
}

/**
 * Every outcome carries the message's id (its idempotency key): the one the producer gave, or the
 * queue message id when it gave none or the message could not be read.
 */
export type Outcome =
  /** Accepted by the server now, or earlier (`duplicate`: the ledger shows it was sent). */
  /** `suppressed`: recipients left out because they are on the suppression list (the rest got it). */
  | { status: "sent"; id: string; messageId: string; response: string; duplicate: boolean; suppressed?: string[] }
  | { status: "poison"; id: string; record: PoisonRecord; error: MailerError }
  | { status: "retry"; id: string; afterSeconds: number; error: MailerError }
  /**
   * Our setup is broken (circuit open): the message waits without using up its attempts. With
   * `freshCopy`, it is close to its last attempt and must continue as a new queue message (a new
   * dequeue count) instead of being retried in place.
   */
  | { status: "wait"; id: string; afterSeconds: number; error: MailerError; freshCopy: boolean };

export function poisonRecord(error: MailerError, attempts: number, original: string, now = new Date()): PoisonRecord {
  return {
    reason: { code: error.code, message: error.message, ...(error.response === undefined ? {} : { response: error.response }) },
    attempts,
    failedAt: now.toISOString(),
    original,
  };
}

/** The longest a queue message can be hidden: Azure Queue Storage's visibility timeout limit (7 days). */
const MAX_VISIBILITY_SECONDS = 7 * 24 * 60 * 60;

/**
 * Seconds until the next attempt, in whole seconds (what a visibility timeout takes): exponential
 * backoff (`retryBaseSeconds` doubling per attempt) with ±20 % jitter, capped at `retryMaxSeconds`.
 * The server's Retry-After is a floor that wins over `retryMaxSeconds`: a throttled server asking
 * for 120 s must not be hit again after 60. Only the queue's own limit bounds it.
 */
export function retryDelaySeconds(attempt: number, policy: { retryBaseSeconds: number; retryMaxSeconds: number }, retryAfterSeconds?: number): number {
  const exponential = Math.min(policy.retryMaxSeconds, policy.retryBaseSeconds * 2 ** Math.max(0, attempt - 1));
  // Jitter spreads out messages that failed together; it never pushes our own backoff past the cap.
  const backoff = Math.min(policy.retryMaxSeconds, Math.round(exponential * (0.8 + Math.random() * 0.4)));
  // Rounded up: waiting a fraction less than the server asked for would still be too early.
  const serverAsked = retryAfterSeconds !== undefined && Number.isFinite(retryAfterSeconds) && retryAfterSeconds > 0 ? Math.ceil(retryAfterSeconds) : 0;
  return Math.min(MAX_VISIBILITY_SECONDS, Math.max(backoff, serverAsked));
}
