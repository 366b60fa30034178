// Delivery status (issue 14): every outcome is one row in the `deliveryevents` table under the
// message id and, with EVENTS_QUEUE set, one JSON event on that queue; `queue-mailer status ID`
// shows the history newest last. Sent, retried and poisoned messages through the real worker, the
// real queue and SMTP server.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { before, describe, it } from "node:test";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import { loadStorageConfig } from "../shared/config.js";
import type { DeliveryEvent } from "../shared/events/deliveryEvents.js";
import { deliveryEventRecorder, readDeliveryEvents } from "../shared/events/deliveryEvents.js";
import { encodeQueueText, openMailQueues } from "../shared/queue/mailQueue.js";
import { messageIdFor } from "../shared/transport/mailOptions.js";
import { spawnCli } from "./support/cli.js";
import { capturingLogger, drain, useLocalStack } from "./support/harness.js";

const EVENTS_QUEUE = "delivery-events";
let refused = 0;

describe("delivery events and `queue-mailer status`", () => {
  // The first offer of retry@ is refused with a 4xx: one retry, then sent.
  const local = useLocalStack("qm-events-", { fault: ({ phase, address }) => (phase === "rcpt" && address === "retry@example.test" && refused++ === 0 ? { reply: 451, message: "4.3.0 Temporary server error, try again later" } : undefined) });
  const env = () => ({ ...local.stack.env, MAIL_QUEUE: "events-mail", EVENTS_QUEUE, RETRY_BASE_SECONDS: "0" });
  let summary: Awaited<ReturnType<typeof drain>>;
  let queued: DeliveryEvent[] = [];

  before(async () => {
    const { queue } = await openMailQueues(loadStorageConfig(env()));
    await queue.sendMessage(encodeQueueText(JSON.stringify({ id: "ev-sent", to: "sent@example.test", subject: "Sent", text: "x" })));
    await queue.sendMessage(encodeQueueText(JSON.stringify({ id: "ev-retry", to: "retry@example.test", subject: "Retried", text: "x" })));
    // Not one address: poisoned; its id is still found for `status`.
    await queue.sendMessage(encodeQueueText(JSON.stringify({ id: "ev-poison", to: "not an address", subject: "Poisoned", text: "x" })));
    summary = await drain(env(), capturingLogger());
    // Every event put on EVENTS_QUEUE (drain closes the mailer, which waits for events in flight).
    const { queue: events } = await openMailQueues({ ...loadStorageConfig(env()), queueName: EVENTS_QUEUE, poisonQueueName: `${EVENTS_QUEUE}-poison` }, { create: false });
    for (;;) {
      const batch = (await events.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 60 })).receivedMessageItems;
      if (batch.length === 0) break;
      queued.push(...batch.map((m) => JSON.parse(Buffer.from(m.messageText, "base64").toString("utf8")) as DeliveryEvent));
    }
    queued = queued.sort((a, b) => a.at.localeCompare(b.at));
  });

  it("the worker's outcomes: one sent, one retried then sent, one poisoned", () => {
    assert.deepEqual({ sent: summary.sent, retried: summary.retried, poisoned: summary.poisoned }, { sent: 2, retried: 1, poisoned: 1 });
  });

  it("EVENTS_QUEUE gets exactly one event per outcome", () => {
    const byId = (id: string) => queued.filter((e) => e.id === id).map((e) => e.event);
    assert.equal(queued.length, 4, JSON.stringify(queued));
    assert.deepEqual(byId("ev-sent"), ["sent"]);
    assert.deepEqual(byId("ev-retry"), ["retry", "sent"]);
    assert.deepEqual(byId("ev-poison"), ["poisoned"]);
    for (const event of queued) assert.deepEqual([event.type, event.version], ["queue-mailer.delivery", 1]);
    const sent = queued.find((e) => e.id === "ev-sent");
    assert.equal(sent?.messageId, messageIdFor("ev-sent", LOCAL_MAILBOX));
    assert.match(sent?.response ?? "", /^250/);
  });

  it("the deliveryevents table holds the same history under each id", async () => {
    const storage = loadStorageConfig(env());
    const retry = await readDeliveryEvents(storage, "ev-retry");
    assert.deepEqual(retry.map((e) => [e.event, e.attempt]), [["retry", 1], ["sent", 2]]);
    assert.match(retry[0]?.code ?? "", /^SMTP_/);
    const poisoned = await readDeliveryEvents(storage, "ev-poison");
    assert.deepEqual(poisoned.map((e) => [e.event, e.code]), [["poisoned", "MESSAGE_INVALID_ADDRESS"]]);
  });

  it("`queue-mailer status ID` shows sent, retried and poisoned histories, newest last", { timeout: 30_000 }, async () => {
    const retried = await spawnCli(["status", "ev-retry"], { env: env() });
    assert.equal(retried.status, 0, retried.stderr);
    const lines = retried.stdout.split("\n").filter((l) => /attempt \d/.test(l));
    assert.equal(lines.length, 2, retried.stdout);
    assert.match(lines[0] ?? "", /attempt 1\s+retry\s+SMTP_/);
    assert.match(lines[1] ?? "", new RegExp(`attempt 2\\s+sent\\s+${messageIdFor("ev-retry", LOCAL_MAILBOX).replace(/[.*+?^${}()|[\]\\]/g, "\\$&")} 250`));

    const poisoned = await spawnCli(["status", "ev-poison", "--json"], { env: env() });
    assert.equal(poisoned.status, 0, poisoned.stderr);
    const json = JSON.parse(poisoned.stdout) as { id: string; events: DeliveryEvent[] };
    assert.equal(json.id, "ev-poison");
    assert.deepEqual(json.events.map((e) => [e.event, e.code]), [["poisoned", "MESSAGE_INVALID_ADDRESS"]]);

    const sent = await spawnCli(["status", "ev-sent", "--json"], { env: env() });
    assert.deepEqual((JSON.parse(sent.stdout) as { events: DeliveryEvent[] }).events.map((e) => e.event), ["sent"]);

    const unknown = await spawnCli(["status", "never-enqueued"], { env: env() });
    assert.equal(unknown.status, 1, "an id nothing is known about");
    assert.match(unknown.stdout, /No delivery events/);
  });

  it("a lost event never blocks or fails: record() returns at once, the loss is logged", { timeout: 20_000 }, async () => {
    // A storage endpoint that refuses every request (403 is not retried by the SDK).
    const refusing = createServer((request, response) => {
      request.resume();
      response.writeHead(403, { "content-type": "application/json" }).end(JSON.stringify({ "odata.error": { code: "AuthorizationFailure", message: { value: "refused" } } }));
    });
    await new Promise<void>((resolve) => refusing.listen(0, "127.0.0.1", resolve));
    try {
      const port = (refusing.address() as AddressInfo).port;
      const key = /AccountKey=([^;]+)/.exec(local.stack.env["AzureWebJobsStorage"] ?? "")?.[1] ?? "";
      const connectionString = `DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=${key};TableEndpoint=http://127.0.0.1:${port}/devstoreaccount1;QueueEndpoint=http://127.0.0.1:${port}/devstoreaccount1;BlobEndpoint=http://127.0.0.1:${port}/devstoreaccount1`;
      const logger = capturingLogger();
      const recorder = deliveryEventRecorder({ ...loadStorageConfig(env()), connectionString, eventsQueueName: EVENTS_QUEUE }, logger);
      const started = Date.now();
      recorder.record({ type: "queue-mailer.delivery", version: 1, id: "ev-lost", event: "sent", at: new Date().toISOString(), attempt: 1, queueMessageId: "q", messageId: "<m@x>", response: "250 OK" });
      assert.ok(Date.now() - started < 50, "record() does not wait for storage");
      await recorder.settled();
      const lost = logger.lines.map((l) => JSON.parse(l) as { event: string; id?: string; target?: string }).filter((r) => r.event === "events.write_failed");
      assert.deepEqual(lost.map((r) => [r.id, r.target]).sort(), [["ev-lost", "queue"], ["ev-lost", "table"]]);
    } finally {
      refusing.close();
    }
  });
});
