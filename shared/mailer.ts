// One process-wide mailer: settings, the sender (credential, token, SMTP pool, ledger), the circuit
// breaker and the storage clients, created on first use and reused by every invocation. The
// Functions host and the worker both get their mailer here, so they share everything but the way
// they talk to the queue.
import type { ContainerClient } from "@azure/storage-blob";
import { loadSendConfig, type Env, type SendConfig } from "./config.js";
import { toMailerError } from "./errors.js";
import { deliveryEventOf, deliveryEventRecorder } from "./events/deliveryEvents.js";
import { lazy } from "./lazy.js";
import type { Logger } from "./log.js";
import { handleQueueMessage, type QueueMessageMeta } from "./queue/handleQueueMessage.js";
import { openMailQueues, writePoisonRecord, type MailQueues } from "./queue/mailQueue.js";
import type { Outcome } from "./queue/outcome.js";
import { fixContextFor } from "./doctor/fixes.js";
import { circuitBreaker, type CircuitBreaker } from "./send/circuitBreaker.js";
import { containerTemplates, directoryTemplates, noTemplates, type TemplateRenderer } from "./message/templates.js";
import { createSender, type Sender } from "./send/sendEmail.js";
import { openContainer } from "./storage/storageClients.js";

export interface Mailer {
  config: SendConfig;
  sender: Sender;
  circuit: CircuitBreaker;
  queues(): Promise<MailQueues>;
  /** Decode, validate and send one queue message; poison records are written here. */
  process(text: string, meta: QueueMessageMeta, logger?: Logger): Promise<Outcome>;
  /** Probe the setup while the circuit is open; closes it on success. */
  probe(): Promise<boolean>;
  close(): Promise<void>;
}

export function createMailer(config: SendConfig, logger: Logger, sender: Sender = createSender(config, logger)): Mailer {
  const getQueues = lazy(() => openMailQueues(config.storage));
  const attachments = lazy<ContainerClient>(() => openContainer(config.storage, config.storage.attachmentContainer));
  // The circuit's one error line carries the same step and fix as `queue-mailer doctor`, with this
  // deployment's ids filled in.
  const circuit = circuitBreaker(config.queue, logger, Date.now, fixContextFor(config));
  const events = deliveryEventRecorder(config.storage, logger);
  const templates = templateRendererFor(config);
  return {
    config,
    sender,
    circuit,
    queues: getQueues,
    async process(text, meta, invocationLogger = logger) {
      const outcome = await handleQueueMessage(text, meta, {
        sender,
        mailFrom: config.mailFrom,
        policy: config.queue,
        messages: config.messages,
        attachments,
        templates,
        circuit,
        logger: invocationLogger,
      });
      if (outcome.status === "poison") await writePoisonRecord((await getQueues()).poison, outcome.record);
      // Every outcome passes here, so this is the one place delivery events are written. Not
      // awaited: an event never delays or fails a send (a lost one is logged).
      events.record(deliveryEventOf(outcome, meta));
      return outcome;
    },
    async probe() {
      try {
        await sender.probe();
        circuit.close();
        return true;
      } catch (error) {
        const failure = toMailerError(error);
        circuit.open(failure.kind === "config" ? failure : circuit.lastError ?? failure);
        return false;
      }
    },
    async close() {
      // Events still being written get a moment to land before the process goes.
      await Promise.race([events.settled(), new Promise((resolve) => setTimeout(resolve, EVENTS_CLOSE_WAIT_MS).unref())]);
      await sender.close();
    },
  };
}

/** TEMPLATE_DIR wins over TEMPLATE_CONTAINER (see config.ts). */
function templateRendererFor(config: SendConfig): TemplateRenderer {
  const source = config.messages.templates ?? {};
  if (source.dir !== undefined) return directoryTemplates(source.dir);
  const container = source.container;
  if (container !== undefined) return containerTemplates(lazy(() => openContainer(config.storage, container)));
  return noTemplates;
}

/** How long close() waits for delivery events in flight. */
const EVENTS_CLOSE_WAIT_MS = 5_000;

let processMailer: Mailer | undefined;

/** The mailer of this process, for hosts that call handlers without a place to keep state. */
export function processWideMailer(env: Env, logger: Logger): Mailer {
  processMailer ??= createMailer(loadSendConfig(env), logger);
  return processMailer;
}
