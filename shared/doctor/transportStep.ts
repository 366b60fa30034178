// Step 7: the transport's own `verify()`, the probe the circuit breaker runs too. SMTP: connect,
// STARTTLS (certificate problems named), AUTH XOAUTH2 with the token from step 5, no message.
// Graph: proves Mail.Send for the mailbox without sending. Failures carry the server's reply and
// the fix with the app id, the token's object id and the mailbox filled in.
import type { SendConfig } from "../config.js";
import type { Logger } from "../log.js";
import type { TokenProvider } from "../token/tokenProvider.js";
import { createSmtpTransport } from "../transport/smtpTransport.js";
import type { Transport } from "../transport/transport.js";
import { failed, pass, type Check } from "./check.js";
import type { FixContext } from "./fixes.js";

/**
 * The transport TRANSPORT names, without the cross-instance limits the sender adds (connection
 * slots, Graph concurrency leases): the doctor holds no slot and creates no table.
 */
export async function transportFor(config: SendConfig, tokens: TokenProvider, logger: Logger): Promise<Transport> {
  if (config.transport === "graph") {
    // Loaded only when used: SMTP setups never load the Graph client.
    const { createGraphTransport } = await import("../transport/graphTransport.js");
    return createGraphTransport(config.graph, config.smtp.user, tokens, logger);
  }
  return createSmtpTransport(config.smtp, tokens, logger);
}

export async function transportStep(config: SendConfig, tokens: TokenProvider, logger: Logger, context: FixContext): Promise<Check> {
  let transport: Transport | undefined;
  try {
    transport = await transportFor(config, tokens, logger);
    await transport.verify();
    return pass(
      "transport",
      config.transport === "graph"
        ? `Graph ${config.graph.url}: the token allows Mail.Send as ${config.smtp.user}`
        : `SMTP ${config.smtp.host}:${config.smtp.port}: STARTTLS, AUTH XOAUTH2 as ${config.smtp.user} accepted`,
    );
  } catch (error) {
    return failed("transport", error, context);
  } finally {
    await transport?.close().catch(() => undefined);
  }
}
