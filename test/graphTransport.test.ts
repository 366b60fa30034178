// TRANSPORT=graph end to end: queue → worker → certificate assertion → Graph token (aud Graph,
// role Mail.Send, verified by the double against the local OAuth server) → sendMail with the MIME
// nodemailer builds, or a draft plus upload sessions for big messages. Graph's limits and refusals
// are reproduced by the double with Graph's own error bodies. One stack; each test has its own
// queue (its own MAIL_QUEUE) so that each can run alone.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { describe, it } from "node:test";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import { loadSendConfig, loadStorageConfig } from "../shared/config.js";
import { enqueueEmail } from "../shared/enqueueEmail.js";
import { createMailer } from "../shared/mailer.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { openContainer } from "../shared/storage/storageClients.js";
import { messageIdFor } from "../shared/transport/mailOptions.js";
import { capturingLogger, drain, readPoison, useLocalStack, within, type CapturedLogger } from "./support/harness.js";

const secrets = /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+\.|PRIVATE KEY|Bearer [A-Za-z0-9]/;
const events = (logger: CapturedLogger, event: string) => logger.lines.map((l) => JSON.parse(l) as Record<string, unknown> & { event: string }).filter((r) => r.event === event);

describe("TRANSPORT=graph", () => {
  const local = useLocalStack("qm-graph-", { transport: "graph" });
  const graph = () => {
    const double = local.stack.graph;
    assert.ok(double, "the stack runs the Graph double");
    return double;
  };
  const envFor = (queue: string, extra: Record<string, string> = {}) => ({ ...local.stack.env, MAIL_QUEUE: queue, RETRY_BASE_SECONDS: "1", ...extra });
  const queuesFor = (env: Record<string, string>) => openMailQueues(loadStorageConfig(env));
  const delivered = (id: string) => graph().messages.filter((m) => m.messageId === messageIdFor(id, LOCAL_MAILBOX));

  it("sends with sendMail: once, our Message-ID, both alternatives, Bcc, attachments and headers, one token for all", { timeout: 60_000 }, async () => {
    const env = envFor("graph-basic");
    const { queue } = await queuesFor(env);
    const tokenRequestsBefore = local.stack.oauth.stats.tokenRequests;
    const pdf = randomBytes(20_000);
    await enqueueEmail(queue, {
      id: "g-1",
      to: "Ada Lovelace <ada@example.test>",
      cc: "cc@example.test",
      bcc: "hidden@example.test",
      subject: "Receipt",
      text: "Plain alternative",
      html: "<p>HTML alternative</p>",
      headers: { "X-Campaign": "graph-test" },
      attachments: [{ filename: "receipt.pdf", contentType: "application/pdf", content: pdf.toString("base64") }],
    });
    for (let i = 2; i <= 4; i++) await enqueueEmail(queue, { id: `g-${i}`, to: `r${i}@example.test`, subject: `Simple ${i}`, text: "x" });
    const logger = capturingLogger();
    const summary = await drain(env, logger);
    assert.deepEqual({ sent: summary.sent, poisoned: summary.poisoned, retried: summary.retried }, { sent: 4, poisoned: 0, retried: 0 });

    const [first] = delivered("g-1");
    assert.equal(delivered("g-1").length, 1, "delivered once");
    assert.ok(first);
    assert.equal(first.via, "sendMail");
    assert.equal(first.format, "mime");
    assert.deepEqual({ to: first.to, cc: first.cc, bcc: first.bcc }, { to: ["ada@example.test"], cc: ["cc@example.test"], bcc: ["hidden@example.test"] });
    assert.equal(first.text?.trim(), "Plain alternative");
    assert.equal(first.html?.trim(), "<p>HTML alternative</p>");
    assert.deepEqual(first.headers["x-campaign"], ["graph-test"]);
    assert.equal(first.attachments.length, 1);
    assert.equal(first.attachments[0]?.filename, "receipt.pdf");
    assert.ok(first.attachments[0]?.content.equals(pdf), "attachment byte-exact");
    for (const id of ["g-2", "g-3", "g-4"]) assert.equal(delivered(id).length, 1, id);
    assert.equal(local.stack.oauth.stats.tokenRequests - tokenRequestsBefore, 1, "one token for every message");
    assert.equal(local.stack.smtp.messages.length, 0, "nothing went through SMTP");
    assert.doesNotMatch(logger.lines.join("\n"), secrets);
  });

  it("a message over Graph's 4 MB request limit goes as a draft with a 10 MB attachment through an upload session", { timeout: 90_000 }, async () => {
    const env = envFor("graph-large");
    const { queue, poison } = await queuesFor(env);
    const big = randomBytes(10 * 1024 * 1024);
    const small = randomBytes(100_000);
    const storage = loadStorageConfig(env);
    await enqueueEmail({ queue, attachments: await openContainer(storage, storage.attachmentContainer) }, {
      id: "g-large",
      to: "big@example.test",
      subject: "Large",
      text: "see attachments",
      attachments: [
        { filename: "big.bin", contentType: "application/octet-stream", content: big.toString("base64") },
        { filename: "small.bin", contentType: "application/octet-stream", content: small.toString("base64") },
      ],
    });
    graph().resetStats();
    const summary = await drain(env, capturingLogger());
    assert.equal(summary.sent, 1);
    const [message] = delivered("g-large");
    assert.ok(message, "delivered");
    assert.equal(message.via, "uploadSession");
    const byName = new Map(message.attachments.map((a) => [a.filename, a]));
    assert.equal(byName.get("big.bin")?.source, "uploadSession");
    assert.equal(createHash("sha256").update(byName.get("big.bin")?.content ?? Buffer.alloc(0)).digest("hex"), createHash("sha256").update(big).digest("hex"), "10 MB byte-exact");
    assert.equal(byName.get("small.bin")?.source, "attachment");
    assert.ok(byName.get("small.bin")?.content.equals(small));
    const kinds = graph().requests.map((r) => r.kind);
    assert.deepEqual([...new Set(kinds)], ["createDraft", "createUploadSession", "uploadChunk", "addAttachment", "send"].filter((k) => kinds.includes(k as never)));
    assert.ok(kinds.filter((k) => k === "uploadChunk").length >= 3, "chunked");
    assert.ok(!kinds.includes("sendMail"), "never one request over 4 MB");
    assert.equal((await poison.peekMessages()).peekedMessageItems.length, 0);
  });

  it("429 with Retry-After: 2 pauses the mailbox; no request before it elapses; nothing poisoned, nothing lost", { timeout: 60_000 }, async () => {
    // One at a time, so that nothing is already in flight when the 429 arrives.
    const env = envFor("graph-throttle", { MAX_DEQUEUE_COUNT: "2", WORKER_BATCH_SIZE: "1" });
    const { queue, poison } = await queuesFor(env);
    for (let i = 0; i < 3; i++) await enqueueEmail(queue, { id: `t-${i}`, to: `t${i}@example.test`, subject: `Throttled ${i}`, text: "x" });
    graph().resetStats();
    graph().throttle(LOCAL_MAILBOX, { retryAfterSeconds: 2, count: 1 });
    const logger = capturingLogger();
    // Deferred messages are hidden for the Retry-After, so one drain ends early: drain until
    // everything is out (bounded).
    const summaries = [];
    for (let round = 0; round < 10 && [0, 1, 2].some((i) => delivered(`t-${i}`).length === 0); round++) {
      summaries.push(await within(drain(env, logger), 20_000, "a drain of the throttled queue"));
      if ([0, 1, 2].some((i) => delivered(`t-${i}`).length === 0)) await new Promise((resolve) => setTimeout(resolve, 700));
    }
    const summary = { poisoned: summaries.reduce((n, s) => n + s.poisoned, 0), retried: summaries.reduce((n, s) => n + s.retried, 0) };
    for (let i = 0; i < 3; i++) assert.equal(delivered(`t-${i}`).length, 1, `t-${i} delivered once`);
    assert.equal(summary.poisoned, 0);
    assert.equal((await poison.peekMessages()).peekedMessageItems.length, 0, "nothing poisoned");
    const requests = graph().requests.filter((r) => r.kind === "sendMail");
    const throttled = requests.find((r) => r.status === 429);
    assert.ok(throttled, "the 429 happened");
    const after = requests.filter((r) => r.startedAt > throttled.endedAt);
    assert.ok(after.length >= 3, "everything was sent after the pause");
    for (const r of after) assert.ok(r.startedAt >= throttled.endedAt + 1_900, `a request ${Math.round(r.startedAt - throttled.endedAt)} ms after the 429 (Retry-After 2 s)`);
    assert.ok(events(logger, "message.deferred").some((r) => r["code"] === "GRAPH_THROTTLED"), "deferred, not failed");
    assert.equal(summary.retried, 0, "the throttled message used no attempt");
  });

  it("at most GRAPH_MAX_CONCURRENCY requests in flight per mailbox, with two workers at once", { timeout: 90_000 }, async () => {
    const env = envFor("graph-concurrency", { GRAPH_MAX_CONCURRENCY: "4", WORKER_BATCH_SIZE: "16" });
    const { queue } = await queuesFor(env);
    await Promise.all(Array.from({ length: 24 }, (_, i) => enqueueEmail(queue, { id: `c-${i}`, to: `c${i}@example.test`, subject: `Concurrent ${i}`, text: "x" })));
    graph().resetStats();
    graph().setLatency(150);
    try {
      const [a, b] = await within(Promise.all([drain(env, capturingLogger()), drain(env, capturingLogger())]), 60_000, "two workers to drain");
      assert.equal(a.sent + b.sent, 24);
      assert.ok(a.sent > 0 && b.sent > 0, `both workers sent (${a.sent} + ${b.sent})`);
    } finally {
      graph().setLatency(0);
    }
    const peak = graph().maxInFlight[LOCAL_MAILBOX.toLowerCase()] ?? 0;
    assert.ok(peak <= 4, `peak ${peak} requests in flight`);
    assert.ok(peak >= 2, `requests did overlap (peak ${peak})`);
    assert.equal(graph().requests.filter((r) => r.status === 429).length, 0, "Graph never had to throttle");
    for (let i = 0; i < 24; i++) assert.equal(delivered(`c-${i}`).length, 1);
  });

  describe("Graph's refusals, by code", () => {
    async function sendOne(queueName: string, message: Parameters<typeof enqueueEmail>[1], extra: Record<string, string> = {}) {
      const env = envFor(queueName, extra);
      const { queue } = await queuesFor(env);
      await enqueueEmail(queue, message);
      const logger = capturingLogger();
      const mailer = createMailer(loadSendConfig(env), logger);
      const outcomes = [];
      try {
        const received = (await queue.receiveMessages({ numberOfMessages: 1 })).receivedMessageItems[0];
        assert.ok(received);
        outcomes.push(await mailer.process(received.messageText, { queueMessageId: received.messageId, dequeueCount: received.dequeueCount }));
        return { outcome: outcomes[0]!, poison: await readPoison(mailer), logger, circuit: mailer.circuit };
      } finally {
        await mailer.close();
      }
    }

    it("403 ErrorAccessDenied (an application access policy without this mailbox) → config, circuit open, nothing poisoned", async () => {
      graph().restrictTo(["someone-else@contoso.test"]);
      try {
        const { outcome, poison, circuit } = await sendOne("graph-denied", { id: "d-1", to: "a@example.test", subject: "Denied", text: "x" });
        assert.equal(outcome.status, "wait");
        assert.equal(circuit.lastError?.code, "GRAPH_ACCESS_DENIED");
        assert.match(circuit.lastError?.hint ?? "", /Mail\.Send.*Test-ApplicationAccessPolicy/s);
        assert.match(circuit.lastError?.response ?? "", /^403 ErrorAccessDenied/);
        assert.equal(poison.length, 0);
      } finally {
        graph().restrictTo(undefined);
      }
    });

    it("404 MailboxNotEnabledForRESTAPI → config; an unknown user → GRAPH_INVALID_USER, config", async () => {
      graph().setRestEnabled(LOCAL_MAILBOX, false);
      try {
        const { outcome, circuit } = await sendOne("graph-norest", { id: "n-1", to: "a@example.test", subject: "x", text: "x" });
        assert.equal(outcome.status, "wait");
        assert.equal(circuit.lastError?.code, "GRAPH_MAILBOX_NOT_ENABLED");
      } finally {
        graph().setRestEnabled(LOCAL_MAILBOX, true);
      }
      const { outcome, circuit } = await sendOne("graph-nouser", { id: "n-2", from: "ghost@contoso.test", to: "a@example.test", subject: "x", text: "x" }, { SMTP_USER: "ghost@contoso.test" });
      assert.equal(outcome.status, "wait");
      assert.equal(circuit.lastError?.code, "GRAPH_INVALID_USER");
    });

    it("ErrorInvalidRecipients and ErrorSendAsDenied poison the message with Graph's reason", async () => {
      graph().setInvalidRecipients(["nobody@example.test"]);
      try {
        const invalid = await sendOne("graph-badrcpt", { id: "r-1", to: "nobody@example.test", subject: "x", text: "x" });
        assert.equal(invalid.outcome.status, "poison");
        assert.equal(invalid.poison[0]?.reason.code, "GRAPH_INVALID_RECIPIENTS");
        assert.match(invalid.poison[0]?.reason.response ?? "", /^400 ErrorInvalidRecipients/);
      } finally {
        graph().setInvalidRecipients([]);
      }
      const sendAs = await sendOne("graph-sendas", { id: "s-1", from: "ceo@contoso.test", to: "a@example.test", subject: "x", text: "x" });
      assert.equal(sendAs.outcome.status, "poison");
      assert.equal(sendAs.poison[0]?.reason.code, "GRAPH_SEND_AS_DENIED");
      assert.match(sendAs.poison[0]?.reason.response ?? "", /^403 ErrorSendAsDenied/);
    });

    it("413 ErrorMessageSizeExceeded poisons; 401 InvalidAuthenticationToken renews the token once and then opens the circuit", async () => {
      graph().failNext(1, 413, { error: { code: "ErrorMessageSizeExceeded", message: "The message exceeds the maximum supported size." } });
      const size = await sendOne("graph-size", { id: "z-1", to: "a@example.test", subject: "x", text: "x" });
      assert.equal(size.outcome.status, "poison");
      assert.equal(size.poison[0]?.reason.code, "GRAPH_MESSAGE_TOO_LARGE");

      const before = local.stack.oauth.stats.tokenRequests;
      const body = { error: { code: "InvalidAuthenticationToken", message: "Access token validation failure. Invalid audience." } };
      graph().failNext(2, 401, body);
      const rejected = await sendOne("graph-401", { id: "u-1", to: "a@example.test", subject: "x", text: "x" });
      assert.equal(rejected.outcome.status, "wait");
      assert.equal(rejected.circuit.lastError?.code, "GRAPH_AUTH_REJECTED");
      assert.equal(local.stack.oauth.stats.tokenRequests - before, 2, "the first token, then one renewal");

      graph().failNext(1, 401, body);
      const recovered = await sendOne("graph-401-once", { id: "u-2", to: "a@example.test", subject: "x", text: "x" });
      assert.equal(recovered.outcome.status, "sent", "a single 401 is healed by the renewed token");
    });

    it("503 without Retry-After is a transient retry; the probe proves Mail.Send without sending", async () => {
      graph().failNext(1, 503, { error: { code: "ServiceUnavailable", message: "Service Unavailable" } }, {});
      const busy = await sendOne("graph-503", { id: "b-1", to: "a@example.test", subject: "x", text: "x" });
      assert.equal(busy.outcome.status, "retry");
      assert.equal(busy.outcome.status === "retry" ? busy.outcome.error.code : "", "GRAPH_UNAVAILABLE");

      const env = envFor("graph-probe");
      const mailer = createMailer(loadSendConfig(env), capturingLogger());
      try {
        const before = graph().messages.length;
        await mailer.sender.probe();
        assert.equal(graph().messages.length, before, "the probe sent nothing");
        assert.equal(graph().requests.at(-1)?.status, 400, "the empty request was refused after auth");
      } finally {
        await mailer.close();
      }
    });
  });
});
