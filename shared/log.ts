// Structured logging through one narrow interface, so that the Functions host (context.log), the
// worker (JSON lines on stderr) and tests (captured arrays) all receive the same records, and every
// record passes through redact() on its way out.
import { redact } from "./redact.js";

export type LogLevel = "debug" | "info" | "warn" | "error";
export type LogFields = Record<string, unknown>;

export interface Logger {
  log(level: LogLevel, event: string, fields?: LogFields): void;
}

/** Serialise a record once, with secrets masked. */
export function formatRecord(level: LogLevel, event: string, fields: LogFields = {}): string {
  return redact(JSON.stringify({ time: new Date().toISOString(), level, event, ...fields }, (_key, value: unknown) =>
    value instanceof Error ? { name: value.name, message: value.message, ...(value as unknown as Record<string, unknown>) } : value,
  ));
}

const order: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export function jsonLineLogger(write: (line: string) => void, minimum: LogLevel = "info"): Logger {
  return {
    log(level, event, fields) {
      if (order[level] >= order[minimum]) write(formatRecord(level, event, fields));
    },
  };
}

export const silentLogger: Logger = { log() {} };
