// One process-wide mailer: settings, the sender (credential, token, SMTP pool) and the queues,
// created on first use and reused by every invocation. The Functions host and the worker both get
// their mailer here, so they share everything but the way they talk to the queue.
import { loadSendConfig, type Env, type SendConfig } from "./config.js";
import type { Logger } from "./log.js";
import { handleQueueMessage, type QueueMessageMeta } from "./queue/handleQueueMessage.js";
import { openMailQueues, writePoisonRecord, type MailQueues } from "./queue/mailQueue.js";
import type { Outcome } from "./queue/outcome.js";
import { createSender, type Sender } from "./send/sendEmail.js";

export interface Mailer {
  config: SendConfig;
  sender: Sender;
  queues(): Promise<MailQueues>;
  /** Decode, validate and send one queue message; poison records are written here. */
  process(text: string, meta: QueueMessageMeta, logger?: Logger): Promise<Outcome>;
  close(): Promise<void>;
}

export function createMailer(config: SendConfig, logger: Logger, sender: Sender = createSender(config, logger)): Mailer {
  let queues: Promise<MailQueues> | undefined;
  const getQueues = () => (queues ??= openMailQueues(config.storage).catch((error: unknown) => {
    queues = undefined;
    throw error;
  }));
  return {
    config,
    sender,
    queues: getQueues,
    async process(text, meta, invocationLogger = logger) {
      const outcome = await handleQueueMessage(text, meta, { sender, mailFrom: config.mailFrom, policy: config.queue, logger: invocationLogger });
      if (outcome.status === "poison") await writePoisonRecord((await getQueues()).poison, outcome.record);
      return outcome;
    },
    close: () => sender.close(),
  };
}

let processMailer: Mailer | undefined;

/** The mailer of this process, for hosts that call handlers without a place to keep state. */
export function processWideMailer(env: Env, logger: Logger): Mailer {
  processMailer ??= createMailer(loadSendConfig(env), logger);
  return processMailer;
}
