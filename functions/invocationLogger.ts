// Structured records through the invocation's own logger, so Application Insights ties them to
// the invocation. Every record passes through formatRecord (and so through redact).
import type { InvocationContext } from "@azure/functions";
import { formatRecord, type Logger } from "../shared/log.js";

export function invocationLogger(context: InvocationContext): Logger {
  return {
    log(level, event, fields) {
      const line = formatRecord(level, event, { invocationId: context.invocationId, ...fields });
      if (level === "error") context.error(line);
      else if (level === "warn") context.warn(line);
      else if (level === "debug") context.debug(line);
      else context.log(line);
    },
  };
}
