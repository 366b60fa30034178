// The SMTP sink against a real nodemailer client, the way our sender talks to Exchange Online.
// Needs NODE_EXTRA_CA_CERTS=.test-ca/ca.pem (npm test sets it) so the STARTTLS certificate is trusted.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, afterEach, before, describe, test } from "node:test";
import { createTransport } from "nodemailer";
import { ensureCertificateAuthority, issueCertificate } from "../cli/local/devCertificates.js";
import { parseHeaders, startSmtpSink } from "../cli/local/smtpSink.js";
import type { SmtpFaultAction, SmtpSink, SmtpSinkOptions } from "../cli/local/smtpSink.js";

const USER = "mailer@contoso.test";
const TOKEN = "good-token-0123456789";

type SmtpError = Error & { code?: string; responseCode?: number; response?: string };

let sink: SmtpSink;
let tmp: string;
let tlsPair: SmtpSinkOptions["tls"];
let fault: SmtpSinkOptions["fault"];

function transport(overrides: { user?: string; accessToken?: string; ignoreTLS?: boolean; auth?: false } = {}) {
  return createTransport({
    host: sink.host,
    port: sink.port,
    secure: false,
    requireTLS: !overrides.ignoreTLS,
    ignoreTLS: overrides.ignoreTLS ?? false,
    ...(overrides.auth === false
      ? {}
      : { auth: { type: "OAuth2" as const, user: overrides.user ?? USER, accessToken: overrides.accessToken ?? TOKEN } }),
  });
}

async function sendError(promise: Promise<unknown>): Promise<SmtpError> {
  return promise.then(
    () => assert.fail("expected the send to fail"),
    (err: SmtpError) => err,
  );
}

/** Plain-text dialogue: each command's full reply (multi-line replies joined). */
async function plainDialogue(commands: string[]): Promise<string[]> {
  const socket = connect(sink.port, sink.host);
  socket.setEncoding("utf8");
  let buffer = "";
  const replies: string[] = [];
  const nextReply = () =>
    new Promise<string>((resolve, reject) => {
      const check = () => {
        const m = /(?:^|\r\n)\d{3} [^\r\n]*\r\n/.exec(buffer);
        if (!m) return;
        const reply = buffer.slice(0, m.index + m[0].length);
        buffer = buffer.slice(reply.length);
        socket.off("data", onData);
        resolve(reply.trim());
      };
      const onData = (chunk: string) => {
        buffer += chunk;
        check();
      };
      socket.on("data", onData);
      socket.once("error", reject);
      check();
    });
  await nextReply(); // greeting
  for (const command of commands) {
    socket.write(command + "\r\n");
    replies.push(await nextReply());
  }
  socket.destroy();
  return replies;
}

before(async () => {
  const ca = ensureCertificateAuthority(".test-ca");
  const server = issueCertificate({ commonName: "localhost", hosts: ["localhost", "127.0.0.1"] }, ca);
  tlsPair = { key: server.privateKeyPem, cert: server.certificatePem };
  tmp = await mkdtemp(join(tmpdir(), "smtp-sink-"));
  sink = await startSmtpSink({
    tls: tlsPair,
    verifyToken: async (user, token) =>
      user === USER && token === TOKEN ? { ok: true } : { ok: false, reason: "token not recognised" },
    outboxDir: join(tmp, "outbox", "nested"),
    fault: (ctx) => fault?.(ctx),
  });
});

afterEach(() => {
  fault = undefined;
});

after(async () => {
  await sink?.close();
  await rm(tmp, { recursive: true, force: true });
});

describe("parseHeaders", () => {
  test("unfolds continuation lines, lower-cases names, keeps repeats, stops at the body", () => {
    const raw =
      "Received: from a\r\n\tby b\r\nReceived: from c\r\nSubject: a long\r\n  subject\r\nX-Empty:\r\n" +
      "__proto__: x\r\n\r\nBody: not a header\r\n";
    const h = parseHeaders(Buffer.from(raw));
    assert.deepEqual(h.received, ["from a\tby b", "from c"]);
    assert.deepEqual(h.subject, ["a long  subject"]);
    assert.deepEqual(h["x-empty"], [""]);
    assert.deepEqual(Object.getOwnPropertyDescriptor(h, "__proto__")?.value, ["x"]);
    assert.equal(h.body, undefined);
    assert.deepEqual(parseHeaders("A: 1\n\nB: 2"), { a: ["1"] });
  });
});

describe("smtp sink", () => {
  test("accepts an XOAUTH2 message over STARTTLS, parses headers and writes the .eml", async () => {
    sink.resetStats();
    const before = sink.messages.length;
    const received: string[] = [];
    const unsubscribe = sink.onMessage((m) => received.push(m.headers["message-id"]?.[0] ?? ""));
    const subject = "Quarterly report for the operations team ".repeat(3).trim();
    const info = await transport().sendMail({
      from: `"Mailer" <${USER}>`,
      to: "alice@example.com, Bob <bob@example.com>",
      subject,
      text: "hello from the queue",
    });
    unsubscribe();
    assert.match(info.response, /^250 2\.0\.0 OK .*queued as [0-9A-F]{16}$/);

    const [message] = (await sink.waitForMessages(before + 1)).slice(before);
    assert.ok(message);
    assert.equal(message.authUser, USER);
    assert.equal(message.mailFrom, USER);
    assert.deepEqual(message.rcptTo, ["alice@example.com", "bob@example.com"]);
    assert.deepEqual(message.headers.subject, [subject]); // nodemailer folds it; we unfold
    assert.deepEqual(message.headers.from, [`Mailer <${USER}>`]);
    assert.match(message.raw.toString(), /^Subject: .*\r\n[ \t]/m, "the client folded the subject");
    assert.deepEqual(message.headers.to, ["alice@example.com, Bob <bob@example.com>"]);
    assert.deepEqual(message.headers["message-id"], [info.messageId]);
    assert.deepEqual(received, [info.messageId]);
    assert.match(message.raw.toString(), /hello from the queue/);

    assert.ok(message.file && existsSync(message.file), "the .eml exists");
    assert.match(message.file, new RegExp(`[/\\\\]${message.seq}-[^/\\\\<>]+\\.eml$`));
    assert.deepEqual(readFileSync(message.file), message.raw);
    // authenticatedNow is 1 or 0 here, depending on whether the client's QUIT has been seen yet.
    const { authenticatedNow, ...stats } = sink.stats;
    assert.ok(authenticatedNow <= 1);
    assert.deepEqual(
      stats,
      { connections: 1, tlsUpgrades: 1, auths: 1, authFailures: 0, accepted: 1, rejected: 0, maxAuthenticatedAtOnce: 1 },
    );
  });

  test("a bad token gets 535 5.7.3 without echoing the token, and nothing is stored", async () => {
    sink.resetStats();
    const before = sink.messages.length;
    const err = await sendError(
      transport({ accessToken: "bad-token-secret" }).sendMail({ from: USER, to: "a@example.com", text: "x" }),
    );
    assert.equal(err.responseCode, 535);
    assert.match(err.response ?? "", /^535 5\.7\.3 Authentication unsuccessful/);
    assert.doesNotMatch(`${err.message} ${err.response}`, /bad-token-secret/);
    assert.equal(sink.messages.length, before);
    assert.equal(sink.stats.authFailures, 1);
    assert.equal(sink.stats.auths, 0);
  });

  test("no AUTH and no MAIL without TLS; no MAIL without AUTH", async () => {
    const before = sink.messages.length;
    const err = await sendError(transport({ ignoreTLS: true }).sendMail({ from: USER, to: "a@example.com", text: "x" }));
    assert.equal(err.responseCode, 538); // smtp-server's "Must issue a STARTTLS command first"

    const [ehlo, auth, mail] = await plainDialogue([
      "EHLO client.test",
      `AUTH XOAUTH2 ${Buffer.from(`user=${USER}\x01auth=Bearer ${TOKEN}\x01\x01`).toString("base64")}`,
      `MAIL FROM:<${USER}>`,
    ]);
    assert.match(ehlo ?? "", /STARTTLS/);
    assert.match(auth ?? "", /^538 /);
    assert.match(mail ?? "", /^530 5\.7\.57 /);

    // After STARTTLS but before AUTH.
    const noAuth = await sendError(transport({ auth: false }).sendMail({ from: USER, to: "a@example.com", text: "x" }));
    assert.equal(noAuth.responseCode, 530);
    assert.equal(sink.messages.length, before);
  });

  test("MAIL FROM other than the token's user gets 554 5.2.0 SendAsDenied after DATA", async () => {
    const before = sink.messages.length;
    const err = await sendError(
      transport().sendMail({ from: "someone.else@contoso.test", to: "a@example.com", text: "x" }),
    );
    assert.equal(err.responseCode, 554);
    assert.match(err.response ?? "", /^554 5\.2\.0 STOREDRV\.Submission\.Exception:SendAsDeniedException/);
    assert.equal(sink.messages.length, before);

    // Case does not matter, as in Exchange.
    await transport().sendMail({ from: USER.toUpperCase(), to: "a@example.com", text: "x" });
    assert.equal(sink.messages.length, before + 1);
  });

  test("a 432 fault at DATA is a transient failure and the next message goes through", async () => {
    const before = sink.messages.length;
    const seen: { phase: string; seq: number; user: string }[] = [];
    let faults = 0;
    fault = (ctx): SmtpFaultAction | undefined => {
      seen.push({ phase: ctx.phase, seq: ctx.seq, user: ctx.session.user });
      if (ctx.phase === "data" && faults++ === 0) {
        return { reply: 432, message: "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded" };
      }
      return undefined;
    };
    const err = await sendError(transport().sendMail({ from: USER, to: "a@example.com", text: "first" }));
    assert.equal(err.responseCode, 432);
    assert.match(err.response ?? "", /sender thread limit exceeded/);
    assert.equal(sink.messages.length, before);

    await transport().sendMail({ from: USER, to: "a@example.com", text: "second" });
    const last = sink.messages.at(-1);
    assert.equal(sink.messages.length, before + 1);
    assert.match(last?.raw.toString() ?? "", /second/);
    assert.deepEqual(
      seen.map((s) => s.phase),
      ["auth", "mail", "rcpt", "data", "auth", "mail", "rcpt", "data"],
    );
    assert.equal(seen[0]?.user, USER);
    assert.equal(seen[2]?.seq, seen[1]?.seq);
    assert.equal(seen[3]?.seq, seen[1]?.seq);
    assert.equal(last?.seq, seen[5]?.seq);
  });

  test("a storeThenDrop fault at DATA stores the message, then drops the connection before the 250", async () => {
    const before = sink.messages.length;
    fault = (ctx) => (ctx.phase === "data" ? { storeThenDrop: true } : undefined);
    const err = await sendError(transport().sendMail({ from: USER, to: "a@example.com", text: "stored but unanswered" }));
    assert.equal(err.responseCode, undefined, "the client never saw a reply");
    assert.equal(sink.messages.length, before + 1, "the server has it");
    assert.match(sink.messages.at(-1)?.raw.toString() ?? "", /stored but unanswered/);
  });

  test("a delayMs fault at DATA holds the normal reply back", async () => {
    fault = (ctx) => (ctx.phase === "data" ? { delayMs: 400 } : undefined);
    const started = Date.now();
    await transport().sendMail({ from: USER, to: "a@example.com", text: "slow" });
    assert.ok(Date.now() - started >= 400, `answered after ${Date.now() - started} ms`);
  });

  test("faults at RCPT refuse one recipient, at AUTH the login", async () => {
    fault = (ctx) => (ctx.phase === "rcpt" && ctx.address === "gone@example.com" ? { reply: 550, message: "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup" } : undefined);
    const info = await transport().sendMail({ from: USER, to: ["gone@example.com", "here@example.com"], text: "two" });
    assert.deepEqual(info.rejected, ["gone@example.com"]);
    assert.deepEqual(sink.messages.at(-1)?.rcptTo, ["here@example.com"]);

    fault = (ctx) => (ctx.phase === "auth" ? { reply: 535, message: "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant." } : undefined);
    const err = await sendError(transport().sendMail({ from: USER, to: "a@example.com", text: "x" }));
    assert.equal(err.responseCode, 535);
    assert.match(err.response ?? "", /5\.7\.139/);
  });

  test("a 421 fault at MAIL refuses the transaction and closes the connection", async () => {
    const before = sink.messages.length;
    fault = (ctx) => (ctx.phase === "mail" ? { reply: 421, message: "4.3.2 Service not available" } : undefined);
    const err = await sendError(transport().sendMail({ from: USER, to: "a@example.com", text: "x" }));
    assert.equal(err.responseCode, 421);
    assert.equal(sink.messages.length, before);
  });

  test("a drop fault mid-DATA is a connection error, not a success, and nothing is stored", async () => {
    const before = sink.messages.length;
    sink.resetStats();
    fault = (ctx) => (ctx.phase === "data" ? { drop: true } : undefined);
    const err = await sendError(
      transport().sendMail({ from: USER, to: "a@example.com", text: "x".repeat(200_000) }),
    );
    assert.ok(
      ["ECONNECTION", "ESOCKET", "ECONNRESET", "EPIPE"].includes(err.code ?? ""),
      `unexpected error code ${err.code}: ${err.message}`,
    );
    assert.equal(err.responseCode, undefined);
    assert.equal(sink.messages.length, before);
    assert.equal(sink.stats.rejected, 1);
  });

  test("more than 500 recipients: the 501st is refused with 452 4.5.3", async () => {
    const to = Array.from({ length: 501 }, (_, i) => `r${i}@example.com`);
    const info = await transport().sendMail({ from: USER, to, text: "many" });
    assert.deepEqual(info.rejected, ["r500@example.com"]);
    const rejected = info.rejectedErrors?.[0] as SmtpError | undefined;
    assert.equal(rejected?.responseCode, 452);
    assert.match(rejected?.response ?? "", /^452 4\.5\.3 Too many recipients/);
    assert.equal(sink.messages.at(-1)?.rcptTo.length, 500);
  });

  test("counts authenticated connections open at once: 3 pooled clients give 3, and 0 once they close", async () => {
    sink.resetStats();
    // A pooled client keeps its connection open after the send: three of them hold three at once.
    const clients = Array.from({ length: 3 }, () =>
      createTransport({ pool: true, maxConnections: 1, host: sink.host, port: sink.port, secure: false, requireTLS: true, auth: { type: "OAuth2", user: USER, accessToken: TOKEN } }),
    );
    try {
      await Promise.all(clients.map((client, i) => client.sendMail({ from: USER, to: "a@example.com", text: `parallel ${i}` })));
      assert.equal(sink.stats.authenticatedNow, 3);
      assert.equal(sink.stats.maxAuthenticatedAtOnce, 3);
      // resetStats starts the most-at-once from the connections still open.
      sink.resetStats();
      assert.equal(sink.stats.maxAuthenticatedAtOnce, 3);
    } finally {
      for (const client of clients) client.close();
    }
    const deadline = Date.now() + 5_000;
    while (sink.stats.authenticatedNow > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.equal(sink.stats.authenticatedNow, 0);
    assert.equal(sink.stats.maxAuthenticatedAtOnce, 3, "the most at once is kept after they close");
    assert.equal(sink.stats.auths, 0, "counted since the reset");
  });

  test("waitForMessages rejects with a clear error on timeout", async () => {
    await assert.rejects(sink.waitForMessages(sink.messages.length + 1, 50), /timed out after 50 ms waiting for \d+ message/);
  });

  test("close() returns promptly with a pooled client still connected", async () => {
    const own = await startSmtpSink({ tls: tlsPair, verifyToken: async () => ({ ok: true }) });
    const pooled = createTransport({
      pool: true,
      host: own.host,
      port: own.port,
      secure: false,
      requireTLS: true,
      auth: { type: "OAuth2", user: USER, accessToken: TOKEN },
    });
    try {
      await pooled.sendMail({ from: USER, to: "a@example.com", text: "pooled" });
      assert.equal(own.messages.length, 1);
      assert.equal(own.messages[0]?.file, undefined);
      const started = Date.now();
      await own.close();
      assert.ok(Date.now() - started < 1_000, `close took ${Date.now() - started} ms`);
    } finally {
      pooled.close();
    }
  });
});
