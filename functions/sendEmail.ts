// Azure Functions registration for the mail queue. Thin on purpose: all logic is in shared/.
// host.json sets messageEncoding "none", so the handler sees the text as it was put on the queue
// and decodes raw or base64 JSON itself (see shared/queue/decode.ts).
import { app, type InvocationContext } from "@azure/functions";
import { readSettings } from "../shared/config.js";
import { jsonLineLogger } from "../shared/log.js";
import { processWideMailer } from "../shared/mailer.js";
import { requeueCopy } from "../shared/queue/mailQueue.js";
import { invocationLogger } from "./invocationLogger.js";

const processLogger = jsonLineLogger((line) => console.log(line));

export async function sendEmail(queueEntry: unknown, context: InvocationContext): Promise<void> {
  const mailer = processWideMailer(readSettings(), processLogger);
  // The host hands JSON over as an object when it can parse it; the poison record keeps text.
  const text = typeof queueEntry === "string" ? queueEntry : JSON.stringify(queueEntry);
  const outcome = await mailer.process(
    text,
    { queueMessageId: String(context.triggerMetadata?.["id"] ?? context.invocationId), dequeueCount: Number(context.triggerMetadata?.["dequeueCount"] ?? 1) },
    invocationLogger(context),
  );
  if (outcome.status === "wait" && outcome.freshCopy) {
    // Our setup is broken, not the message: before the host would poison it, continue it as a
    // fresh copy (new dequeue count) and let this one go.
    await requeueCopy((await mailer.queues()).queue, text, outcome.afterSeconds);
    return;
  }
  if (outcome.status === "retry" || outcome.status === "wait") {
    // Throwing is how the host retries: the message becomes visible again after host.json's
    // visibilityTimeout, and its dequeue count grows.
    throw new Error(`${outcome.error.code}: ${outcome.error.message}`);
  }
}

app.storageQueue("sendEmail", {
  queueName: "%MAIL_QUEUE%",
  connection: "AzureWebJobsStorage",
  handler: sendEmail,
});
