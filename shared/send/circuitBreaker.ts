// Configuration failures (AADSTS errors, 535 at AUTH, Key Vault access denied) are not the
// message's fault: retrying each message would burn its attempts and poison good mail. The circuit
// opens on the first one, logs one clear error, and lets only a probe through after a backoff;
// messages wait in the queue until a probe succeeds.
import type { MailerError } from "../errors.js";
import type { Logger } from "../log.js";

export interface CircuitBreaker {
  readonly isOpen: boolean;
  readonly lastError: MailerError | undefined;
  /** Milliseconds until the next probe may run (0 when closed or due). */
  msUntilProbe(): number;
  /** Closed, or open with a probe due (which this call claims). */
  allowAttempt(): boolean;
  open(error: MailerError): void;
  close(): void;
}

export function circuitBreaker(policy: { retryBaseSeconds: number; retryMaxSeconds: number }, logger: Logger, now: () => number = Date.now): CircuitBreaker {
  let openedWith: MailerError | undefined;
  let failures = 0;
  let nextProbeAt = 0;
  let probing = false;
  return {
    get isOpen() {
      return openedWith !== undefined;
    },
    get lastError() {
      return openedWith;
    },
    msUntilProbe() {
      return openedWith === undefined ? 0 : Math.max(0, nextProbeAt - now());
    },
    allowAttempt() {
      if (openedWith === undefined) return true;
      if (probing || now() < nextProbeAt) return false;
      probing = true;
      return true;
    },
    open(error) {
      const wasOpen = openedWith !== undefined;
      openedWith = error;
      probing = false;
      failures += 1;
      const delaySeconds = Math.min(policy.retryMaxSeconds, Math.max(1, policy.retryBaseSeconds) * 2 ** (failures - 1));
      nextProbeAt = now() + delaySeconds * 1000;
      if (!wasOpen) {
        // One clear error per outage, naming the setting or setup step; probes log at debug.
        logger.log("error", "circuit.open", { error: error.toJSON(), nextProbeInSeconds: delaySeconds, note: "sending paused; messages wait in the queue" });
      } else {
        logger.log("debug", "circuit.probe_failed", { code: error.code, nextProbeInSeconds: delaySeconds });
      }
    },
    close() {
      if (openedWith !== undefined) logger.log("info", "circuit.closed", { after: openedWith.code, failures });
      openedWith = undefined;
      failures = 0;
      probing = false;
    },
  };
}
