// An alert channel delivers one batch of due alerts. Channels are independent: the watch claims,
// delivers and (on failure) releases per channel, so a failing webhook stops nothing else.
import type { ExpiryFinding } from "../finding.js";

export interface Alert {
  finding: ExpiryFinding;
  /** Which alert this is for the item: "threshold-30", "daily-2026-11-22". */
  alertKey: string;
}

export interface AlertChannel {
  readonly name: string;
  deliver(alerts: Alert[]): Promise<void>;
}
