// Step 3 onwards: the sender wires credential → token → transport once per process, and sends one
// validated message under the per-mailbox rate limit. Everything is created on first use: no
// network in module scope.
import type { SendConfig } from "../config.js";
import { credentialSourceFor } from "../auth/credentialSource.js";
import type { Logger } from "../log.js";
import type { EmailMessage } from "../message/schema.js";
import { TokenProvider } from "../token/tokenProvider.js";
import { createSmtpTransport } from "../transport/smtpTransport.js";
import type { SendResult, Transport } from "../transport/transport.js";
import { slidingWindowLimiter, type RateLimiter } from "./rateLimiter.js";

export interface Sender {
  sendEmail(message: EmailMessage): Promise<SendResult>;
  readonly tokens: TokenProvider;
  close(): Promise<void>;
}

export function createSender(config: SendConfig, logger: Logger, overrides: { transport?: Transport; rateLimiter?: RateLimiter } = {}): Sender {
  const credential = credentialSourceFor(config.auth, logger);
  const tokens = new TokenProvider({ tokenUrl: config.auth.tokenUrl, clientId: config.auth.clientId, scope: config.auth.scope, credential, logger });
  const transport = overrides.transport ?? createSmtpTransport(config.smtp, tokens, logger);
  const rateLimiter = overrides.rateLimiter ?? slidingWindowLimiter(config.smtp.ratePerMinute);
  return {
    tokens,
    async sendEmail(message) {
      await rateLimiter.acquire();
      return transport.send(message);
    },
    close: () => transport.close(),
  };
}
