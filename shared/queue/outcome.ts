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

export type Outcome =
  /** Accepted by the server now, or earlier (`duplicate`: the ledger shows it was sent). */
  | { status: "sent"; id: string; messageId: string; response: string; duplicate: boolean }
  | { status: "poison"; record: PoisonRecord; error: MailerError }
  | { status: "retry"; afterSeconds: number; error: MailerError }
  /**
   * Our setup is broken (circuit open): the message waits without using up its attempts. With
   * `freshCopy`, it is close to its last attempt and must continue as a new queue message (a new
   * dequeue count) instead of being retried in place.
   */
  | { status: "wait"; afterSeconds: number; error: MailerError; freshCopy: boolean };

export function poisonRecord(error: MailerError, attempts: number, original: string, now = new Date()): PoisonRecord {
  return {
    reason: { code: error.code, message: error.message, ...(error.response === undefined ? {} : { response: error.response }) },
    attempts,
    failedAt: now.toISOString(),
    original,
  };
}

/** Exponential backoff with ±20 % jitter, never shorter than what the server asked for. */
export function retryDelaySeconds(attempt: number, policy: { retryBaseSeconds: number; retryMaxSeconds: number }, retryAfterSeconds?: number): number {
  const exponential = Math.min(policy.retryMaxSeconds, policy.retryBaseSeconds * 2 ** Math.max(0, attempt - 1));
  const jittered = Math.round(exponential * (0.8 + Math.random() * 0.4));
  return Math.min(policy.retryMaxSeconds, Math.max(jittered, retryAfterSeconds ?? 0));
}
