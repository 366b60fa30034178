// Step 8 (`--send-test ADDRESS`): one real message through the sender's own path, not via the
// queue: validation, the mailbox's limits (rate, daily recipients, pause, connection slots) and
// the transport, with the send ledger off (a test message is not a message to deduplicate). The
// server's answer is reported as it came, SendAsDenied with the Add-RecipientPermission fix.
import { randomUUID } from "node:crypto";
import type { SendConfig } from "../config.js";
import type { Logger } from "../log.js";
import { validateMessage } from "../message/validate.js";
import { createSender } from "../send/sendEmail.js";
import { failed, pass, type Check } from "./check.js";
import type { FixContext } from "./fixes.js";

export async function sendTestStep(config: SendConfig, address: string, logger: Logger, context: FixContext): Promise<Check> {
  const sender = createSender(config, logger, { ledger: null });
  try {
    const id = `doctor-${randomUUID()}`;
    const message = validateMessage(
      {
        to: address,
        subject: "queue-mailer doctor: test message",
        text: `This message was sent by \`queue-mailer doctor --send-test\` from ${config.smtp.user} at ${new Date().toISOString()} to check the setup. Nothing to do.`,
      },
      { from: config.mailFrom, id },
    );
    const outcome = await sender.send(message, false);
    if (outcome.status !== "sent") return pass("send-test", `already sent as ${outcome.messageId}`);
    const { result } = outcome;
    const refused = result.rejected.length > 0 ? `; refused: ${result.rejected.join(", ")}` : "";
    return pass("send-test", `sent to ${address} from ${config.mailFrom}: ${result.response} (Message-ID ${result.messageId})${refused}`);
  } catch (error) {
    return failed("send-test", error, context);
  } finally {
    await sender.close().catch(() => undefined);
  }
}
