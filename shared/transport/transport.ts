// Step 5: a Transport delivers one validated message. SMTP now; Microsoft Graph later is a second
// implementation of the same interface.
import type { EmailMessage } from "../message/schema.js";

export interface SendResult {
  messageId: string;
  /** The server's final reply (e.g. "250 2.0.0 OK ..."). */
  response: string;
  accepted: string[];
  rejected: string[];
}

export interface Transport {
  send(message: EmailMessage): Promise<SendResult>;
  /** Connect and authenticate without sending, to check the setup. */
  verify(): Promise<void>;
  close(): Promise<void>;
}
