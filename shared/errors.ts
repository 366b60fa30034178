// One error base for the whole project. Every failure has a stable `code` (tests, poison records,
// logs and the doctor all key on it) and a `kind` that decides what happens to the message:
//   transient  → retry later (network, 4xx SMTP, token endpoint 5xx/429)
//   permanent  → the message itself is at fault: poison it now, retrying cannot help
//   config     → our setup is wrong (credentials, permissions): not the message's fault
//   deferred   → the mailbox may not send now (a server's throttle, the daily recipient budget):
//                neither the message's fault nor our setup's; it waits without using an attempt
import { redact } from "./redact.js";

export type ErrorKind = "transient" | "permanent" | "config" | "deferred";

export interface MailerErrorOptions {
  kind: ErrorKind;
  /** What to do about it, for people. */
  hint?: string;
  /** The server's reply, already redacted. */
  response?: string;
  /** The protocol step that failed (SMTP command, HTTP request). */
  command?: string;
  /** Seconds the server asked us to wait (Retry-After). */
  retryAfterSeconds?: number;
  cause?: unknown;
}

export class MailerError extends Error {
  readonly code: string;
  readonly kind: ErrorKind;
  readonly hint: string | undefined;
  readonly response: string | undefined;
  readonly command: string | undefined;
  readonly retryAfterSeconds: number | undefined;

  constructor(code: string, message: string, options: MailerErrorOptions) {
    super(redact(message), options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "MailerError";
    this.code = code;
    this.kind = options.kind;
    this.hint = options.hint;
    this.response = options.response === undefined ? undefined : redact(options.response);
    this.command = options.command;
    this.retryAfterSeconds = options.retryAfterSeconds;
  }

  /** A plain record safe to log or store (no stack, no cause chain that could hold secrets). */
  toJSON(): { code: string; kind: ErrorKind; message: string; hint?: string; response?: string; command?: string } {
    return {
      code: this.code,
      kind: this.kind,
      message: this.message,
      ...(this.hint === undefined ? {} : { hint: this.hint }),
      ...(this.response === undefined ? {} : { response: this.response }),
      ...(this.command === undefined ? {} : { command: this.command }),
    };
  }
}

/** A setting is missing or invalid. Always names the setting and the fix. */
export class ConfigError extends MailerError {
  readonly settings: string[];
  constructor(problems: Array<{ setting: string; problem: string }>) {
    super(
      "CONFIG_INVALID",
      "Invalid configuration:\n" + problems.map((p) => `  - ${p.setting}: ${p.problem}`).join("\n"),
      { kind: "config" },
    );
    this.settings = problems.map((p) => p.setting);
  }
}

/** Wrap anything thrown into a MailerError so callers deal with one shape. */
export function toMailerError(error: unknown, fallbackCode = "UNEXPECTED"): MailerError {
  if (error instanceof MailerError) return error;
  const message = error instanceof Error ? error.message : String(error);
  return new MailerError(fallbackCode, message, { kind: "transient", cause: error });
}
