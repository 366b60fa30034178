// Configuration failures (AADSTS errors, 535 at AUTH, Key Vault access denied) are not the
// message's fault: retrying each message would burn its attempts and poison good mail. The circuit
// opens on the first one, logs one clear error, and lets only a probe through after a backoff;
// messages wait in the queue until a probe succeeds.
//
// Every probe ends in exactly one of three calls, or the circuit would stay open for good (the
// Functions host has no loop that probes by itself):
//   close()           the attempt reached the mail server: sent, or refused for the message's own
//                     fault (a 550 for a recipient proves the setup works)
//   open(error)       our setup is still broken: back off further
//   probeFailed()     a transient failure (token endpoint 503, network) says nothing about the
//                     setup: back off and probe again
// A probe whose caller vanished (a host timeout, a killed invocation) is given up after
// `PROBE_TIMEOUT_MS` so that the next invocation may probe.
import { adviceFor, type FixContext } from "../doctor/fixes.js";
import type { MailerError } from "../errors.js";
import type { Logger } from "../log.js";

export const PROBE_TIMEOUT_MS = 5 * 60_000;

export interface CircuitBreaker {
  readonly isOpen: boolean;
  readonly lastError: MailerError | undefined;
  /** Milliseconds until the next probe may run (0 when closed or due). */
  msUntilProbe(): number;
  /** Closed, or open with a probe due (which this call claims). */
  allowAttempt(): boolean;
  open(error: MailerError): void;
  /** The probe failed for a transient reason: stay open, back off, probe again. */
  probeFailed(error: MailerError): void;
  close(): void;
}

/**
 * `fixContext`: the ids the `circuit.open` record's fix may fill in (fixContextFor(config) in
 * shared/doctor/fixes.ts); without it the fix names placeholders such as <CLIENT_ID>.
 */
export function circuitBreaker(policy: { retryBaseSeconds: number; retryMaxSeconds: number }, logger: Logger, now: () => number = Date.now, fixContext: FixContext = {}): CircuitBreaker {
  let openedWith: MailerError | undefined;
  let failures = 0;
  let nextProbeAt = 0;
  let probeStartedAt: number | undefined;

  function backOff(): number {
    probeStartedAt = undefined;
    failures += 1;
    const delaySeconds = Math.min(policy.retryMaxSeconds, Math.max(1, policy.retryBaseSeconds) * 2 ** (failures - 1));
    nextProbeAt = now() + delaySeconds * 1000;
    return delaySeconds;
  }

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
      const probing = probeStartedAt !== undefined && now() - probeStartedAt < PROBE_TIMEOUT_MS;
      if (probing || now() < nextProbeAt) return false;
      probeStartedAt = now();
      return true;
    },
    open(error) {
      const wasOpen = openedWith !== undefined;
      openedWith = error;
      const delaySeconds = backOff();
      if (!wasOpen) {
        // One clear error per outage, naming the setup step, its code and its fix exactly as
        // `queue-mailer doctor` would (one table: shared/doctor/fixes.ts); probes log at debug.
        const advice = adviceFor(error, fixContext);
        logger.log("error", "circuit.open", { step: advice.step, code: error.code, fix: advice.fix, error: error.toJSON(), nextProbeInSeconds: delaySeconds, note: "sending paused; messages wait in the queue" });
      } else {
        logger.log("debug", "circuit.probe_failed", { code: error.code, nextProbeInSeconds: delaySeconds });
      }
    },
    probeFailed(error) {
      // Only a probe in progress backs off; a transient failure while closed, or of a send that
      // began before the circuit opened, changes nothing.
      if (openedWith === undefined || probeStartedAt === undefined) return;
      const delaySeconds = backOff();
      logger.log("debug", "circuit.probe_failed", { code: error.code, openedWith: openedWith.code, nextProbeInSeconds: delaySeconds });
    },
    close() {
      if (openedWith !== undefined) logger.log("info", "circuit.closed", { after: openedWith.code, failures });
      openedWith = undefined;
      failures = 0;
      probeStartedAt = undefined;
    },
  };
}
