// Test plumbing shared by the tests: a logger that captures records, a helper that runs the real
// worker over the real queue until it drains, and error assertions that return the MailerError.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before } from "node:test";
import { startLocalStack, type LocalStack, type LocalStackOptions } from "../../cli/local/localStack.js";
import { MailerError } from "../../shared/errors.js";
import { loadSendConfig, type Env } from "../../shared/config.js";
import { jsonLineLogger, type Logger } from "../../shared/log.js";
import { createMailer, type Mailer } from "../../shared/mailer.js";
import { runWorker, type WorkerSummary } from "../../cli/worker.js";

export interface CapturedLogger extends Logger {
  lines: string[];
}

export function capturingLogger(): CapturedLogger {
  const lines: string[] = [];
  return Object.assign(jsonLineLogger((line) => lines.push(line), "debug"), { lines });
}

export async function drain(env: Env, logger: CapturedLogger, mailer: Mailer = createMailer(loadSendConfig(env), logger)): Promise<WorkerSummary & { mailer: Mailer }> {
  try {
    const summary = await runWorker({ mailer, logger, drain: true, maxPollIntervalMs: 200 });
    return { ...summary, mailer };
  } finally {
    await mailer.close();
  }
}

/** Poison queue entries, decoded. */
export async function readPoison(mailer: Mailer): Promise<Array<{ reason: { code: string; message: string; response?: string }; attempts: number; failedAt: string; original: string }>> {
  const { poison } = await mailer.queues();
  const peeked = await poison.peekMessages({ numberOfMessages: 32 });
  return peeked.peekedMessageItems.map((item) => JSON.parse(Buffer.from(item.messageText, "base64").toString("utf8")));
}

/**
 * `promise`, or a failure naming `what` after `ms`: a condition that never comes fails the test with
 * a message instead of hanging the suite.
 */
export async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/** The MailerError a promise rejects with (fails the test if it resolves or rejects otherwise). */
export async function rejectionOf(promise: Promise<unknown>): Promise<MailerError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof MailerError, `expected a MailerError, got ${String(error)}`);
    return error;
  }
  assert.fail("expected a rejection");
}

/** The MailerError a function throws. */
export function thrownBy(fn: () => unknown): MailerError {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof MailerError, `expected a MailerError, got ${String(error)}`);
    return error;
  }
  assert.fail("expected an error");
}

/**
 * A local stack (Azurite, OAuth server, SMTP sink) for one describe block (call it inside the
 * describe, before hooks that use it): started before its
 * tests, stopped and its temp folder removed after them.
 */
export function useLocalStack(prefix: string, options: Omit<LocalStackOptions, "caDir" | "workDir"> = {}): { readonly stack: LocalStack; readonly workDir: string } {
  let stack: LocalStack | undefined;
  let workDir: string | undefined;
  before(async () => {
    workDir = mkdtempSync(join(tmpdir(), prefix));
    stack = await startLocalStack({ caDir: ".test-ca", workDir, ...options });
  });
  after(async () => {
    await stack?.stop();
    if (workDir) rmSync(workDir, { recursive: true, force: true });
  });
  return {
    get stack() {
      assert.ok(stack, "the local stack starts in before()");
      return stack;
    },
    get workDir() {
      assert.ok(workDir, "the local stack starts in before()");
      return workDir;
    },
  };
}
