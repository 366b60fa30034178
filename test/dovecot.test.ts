// The IMAP test server (test/support/dovecot.ts): real Dovecot on 127.0.0.1 over implicit TLS that
// accepts only XOAUTH2/OAUTHBEARER, with every token checked by the local OAuth server as Exchange
// Online would: IMAP.AccessAsApp plus a mailbox permission (app-only), or IMAP.AccessAsUser.All for
// the user's own mailbox (delegated). Tokens come from our own credential code (certificate client
// assertion, password grant) through the TokenProvider.
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect } from "node:tls";
import { after, before, describe, test } from "node:test";
import { ImapFlow } from "imapflow";
import { issueCertificate } from "../cli/local/devCertificates.js";
import { LOCAL_CLIENT_ID, LOCAL_MAILBOX, LOCAL_PUBLIC_CLIENT_ID, LOCAL_SECRET_CLIENT_ID, LOCAL_TENANT_ID } from "../cli/local/localStack.js";
import { IMAP_APP_PERMISSION, IMAP_DELEGATED_PERMISSION, startOAuthServer, type OAuthServer } from "../cli/local/oauthServer.js";
import { credentialSourceFor } from "../shared/auth/credentialSource.js";
import { loadSendConfig } from "../shared/config.js";
import { TokenProvider } from "../shared/token/tokenProvider.js";
import { dovecotAvailable, startDovecot, type Dovecot } from "./support/dovecot.js";
import { capturingLogger } from "./support/harness.js";

const unavailable = dovecotAvailable();
const OTHER_MAILBOX = "other@contoso.test";
const CLIENT_SECRET = "local-secret-for-the-imap-tests";
const PASSWORD = "correct horse battery staple";

/** A login with imapflow (OAUTHBEARER where offered, else XOAUTH2); resolves the connected client or the error. */
async function imapLogin(server: Dovecot, user: string, accessToken: string): Promise<ImapFlow> {
  const client = new ImapFlow({ host: server.host, port: server.port, secure: true, tls: { servername: server.tls.servername }, auth: { user, accessToken }, logger: false });
  client.on("error", () => {});
  await client.connect();
  return client;
}

async function refusedLogin(server: Dovecot, user: string, accessToken: string): Promise<{ authenticationFailed?: boolean; responseText?: string }> {
  try {
    const client = await imapLogin(server, user, accessToken);
    await client.logout();
  } catch (error) {
    return error as { authenticationFailed?: boolean; responseText?: string };
  }
  assert.fail(`the login as ${user} was accepted`);
}

/** A raw IMAP session over TLS, to send exactly the commands a test wants (XOAUTH2, PLAIN, LOGIN). */
async function rawSession(server: Dovecot) {
  const socket = connect({ host: server.host, port: server.port, servername: server.tls.servername });
  const lines: string[] = [];
  let partial = "";
  let ended: Error | undefined;
  let wake: (() => void) | undefined;
  socket.setEncoding("utf8");
  socket.on("data", (chunk: string) => {
    partial += chunk;
    for (let end = partial.indexOf("\r\n"); end >= 0; end = partial.indexOf("\r\n")) {
      lines.push(partial.slice(0, end));
      partial = partial.slice(end + 2);
    }
    wake?.();
  });
  socket.on("error", (error) => {
    ended = error;
    wake?.();
  });
  socket.on("close", () => {
    ended ??= new Error("the server closed the connection");
    wake?.();
  });
  let read = 0;
  const nextLine = async (): Promise<string> => {
    const deadline = Date.now() + 10_000;
    while (read >= lines.length) {
      if (ended) throw ended;
      if (Date.now() > deadline) throw new Error("no answer from the IMAP server within 10 s");
      await new Promise<void>((resolve) => {
        wake = resolve;
        setTimeout(resolve, 200);
      });
    }
    return lines[read++]!;
  };
  const greeting = await nextLine();
  let tags = 0;
  return {
    greeting,
    /** Sends a command and returns its tagged reply; a SASL challenge (XOAUTH2's error JSON) is answered with an empty line. */
    async command(text: string): Promise<{ reply: string; challenge?: string }> {
      const tag = `t${++tags}`;
      socket.write(`${tag} ${text}\r\n`);
      let challenge: string | undefined;
      for (;;) {
        const line = await nextLine();
        if (line.startsWith(`${tag} `)) return { reply: line, ...(challenge === undefined ? {} : { challenge }) };
        if (line.startsWith("+ ")) {
          challenge = Buffer.from(line.slice(2), "base64").toString("utf8");
          socket.write("\r\n");
        }
      }
    },
    close: () => socket.end(),
  };
}

const xoauth2 = (user: string, token: string) => Buffer.from(`user=${user}\x01auth=Bearer ${token}\x01\x01`).toString("base64");

describe("Dovecot IMAP test server with OAuth", { skip: unavailable ?? false }, () => {
  let workDir: string;
  let oauth: OAuthServer;
  let imap: Dovecot;
  let certificateEnv: Record<string, string>;
  /** App-only, certificate client: IMAP.AccessAsApp and a mailbox permission for LOCAL_MAILBOX. */
  let appToken: string;
  const logger = capturingLogger();

  before(async () => {
    workDir = mkdtempSync(join(tmpdir(), "qm-dovecot-test-"));
    const clientCertificate = issueCertificate({ commonName: "queue-mailer imap test client" });
    const certPath = join(workDir, "client.pem");
    writeFileSync(certPath, clientCertificate.privateKeyPem + clientCertificate.certificatePem, { mode: 0o600 });
    oauth = await startOAuthServer({
      clientId: LOCAL_CLIENT_ID,
      tenantId: LOCAL_TENANT_ID,
      certificatePem: clientCertificate.certificatePem,
      clients: [
        { clientId: LOCAL_SECRET_CLIENT_ID, auth: "client_secret_post", secret: CLIENT_SECRET },
        { clientId: LOCAL_PUBLIC_CLIENT_ID, auth: "none" },
      ],
      users: [{ username: LOCAL_MAILBOX, password: PASSWORD }],
      // IMAP.AccessAsApp is consented for the certificate app only; both apps hold a mailbox
      // permission for LOCAL_MAILBOX, so the secret app's refusal is the missing role alone.
      imap: { appClients: [LOCAL_CLIENT_ID], mailboxPermissions: { [LOCAL_CLIENT_ID]: [LOCAL_MAILBOX], [LOCAL_SECRET_CLIENT_ID]: [LOCAL_MAILBOX] } },
    });
    imap = await startDovecot({ oauth, users: [LOCAL_MAILBOX, OTHER_MAILBOX] });
    certificateEnv = {
      AzureWebJobsStorage: "UseDevelopmentStorage=true",
      AUTH_METHOD: "certificate",
      TENANT_ID: LOCAL_TENANT_ID,
      CLIENT_ID: LOCAL_CLIENT_ID,
      TOKEN_URL: oauth.tokenUrl,
      // The app scope of Exchange Online: the same token audience serves SMTP and IMAP.
      TOKEN_SCOPE: oauth.scope,
      CERT_PATH: certPath,
      SMTP_USER: LOCAL_MAILBOX,
    };
    const tokens = new TokenProvider({ credential: credentialSourceFor(loadSendConfig(certificateEnv).auth, logger), logger });
    appToken = (await tokens.getToken()).token;
  });

  after(async () => {
    await imap?.stop();
    await oauth?.close();
    if (workDir) rmSync(workDir, { recursive: true, force: true });
  });

  test("an app-only token with IMAP.AccessAsApp and a mailbox permission reads the mailbox, moves a message", async () => {
    const report = "From: postmaster@contoso.test\r\nTo: mailer@contoso.test\r\nSubject: Undeliverable: hello\r\nMessage-ID: <ndr-1@contoso.test>\r\n\r\nDelivery has failed.\r\n";
    await imap.deliver(LOCAL_MAILBOX, "INBOX", report);
    const client = await imapLogin(imap, LOCAL_MAILBOX, appToken);
    try {
      const lock = await client.getMailboxLock("INBOX");
      try {
        const messages = [];
        for await (const message of client.fetch("1:*", { uid: true, envelope: true, source: true })) messages.push(message);
        assert.equal(messages.length, 1);
        assert.equal(messages[0]!.envelope?.subject, "Undeliverable: hello");
        assert.match(messages[0]!.source!.toString("utf8"), /Delivery has failed\./);
        await client.mailboxCreate("queue-mailer-processed");
        await client.messageMove("1:*", "queue-mailer-processed");
      } finally {
        lock.release();
      }
    } finally {
      await client.logout();
    }
    assert.deepEqual(await imap.folders(LOCAL_MAILBOX), ["INBOX", "queue-mailer-processed"]);
    assert.deepEqual(await imap.list(LOCAL_MAILBOX, "INBOX"), []);
    const moved = await imap.list(LOCAL_MAILBOX, "queue-mailer-processed");
    assert.equal(moved.length, 1);
    assert.match(moved[0]!.raw.toString("utf8"), /Message-ID: <ndr-1@contoso.test>/);
    assert.deepEqual(moved[0]!.flags, [], "imapflow fetches with BODY.PEEK: the message stays unseen");
    const introspection = oauth.stats.introspections.at(-1);
    assert.deepEqual(introspection, { active: true, clientId: LOCAL_CLIENT_ID });
  });

  test("XOAUTH2 (Exchange Online's mechanism) with the same token logs in; the server offers no password mechanism", async () => {
    const session = await rawSession(imap);
    try {
      assert.match(session.greeting, /AUTH=XOAUTH2/);
      assert.match(session.greeting, /LOGINDISABLED/);
      assert.doesNotMatch(session.greeting, /AUTH=PLAIN|AUTH=LOGIN/);
      const { reply } = await session.command(`AUTHENTICATE XOAUTH2 ${xoauth2(LOCAL_MAILBOX, appToken)}`);
      assert.match(reply, /^t1 OK /);
    } finally {
      session.close();
    }
  });

  test("PLAIN, LOGIN and the LOGIN command are refused, also with the mailbox user's real password", async () => {
    const session = await rawSession(imap);
    try {
      const plain = await session.command(`AUTHENTICATE PLAIN ${Buffer.from(`\0${LOCAL_MAILBOX}\0${PASSWORD}`).toString("base64")}`);
      assert.match(plain.reply, /^t1 NO .*Unsupported authentication mechanism/);
      const login = await session.command("AUTHENTICATE LOGIN");
      assert.match(login.reply, /^t2 NO /);
      const command = await session.command(`LOGIN ${LOCAL_MAILBOX} "${PASSWORD}"`);
      assert.match(command.reply, /^t3 NO /);
    } finally {
      session.close();
    }
    // imapflow with a password finds no mechanism it may use.
    const client = new ImapFlow({ host: imap.host, port: imap.port, secure: true, tls: { servername: imap.tls.servername }, auth: { user: LOCAL_MAILBOX, pass: PASSWORD }, logger: false });
    client.on("error", () => {});
    await assert.rejects(client.connect());
  });

  test("an app-only token without IMAP.AccessAsApp is refused (the app has a mailbox permission)", async () => {
    const secretEnv = { ...certificateEnv, AUTH_METHOD: "secret", CLIENT_ID: LOCAL_SECRET_CLIENT_ID, CLIENT_SECRET, CLIENT_AUTH: "post", CERT_PATH: "" };
    const tokens = new TokenProvider({ credential: credentialSourceFor(loadSendConfig(secretEnv).auth, logger), logger });
    const token = (await tokens.getToken()).token;
    const error = await refusedLogin(imap, LOCAL_MAILBOX, token);
    assert.equal(error.authenticationFailed, true);
    const introspection = oauth.stats.introspections.at(-1);
    assert.equal(introspection?.active, false);
    assert.match(introspection?.reason ?? "", new RegExp(`lacks role\\(s\\) ${IMAP_APP_PERMISSION.replace(".", "\\.")}`));
  });

  test("a token for a mailbox the app holds no permission for is refused, until Add-MailboxPermission", async () => {
    const refused = await refusedLogin(imap, OTHER_MAILBOX, appToken);
    assert.equal(refused.authenticationFailed, true);
    assert.deepEqual(oauth.stats.introspections.at(-1), { active: true, clientId: LOCAL_CLIENT_ID }, "the token is good; the mailbox is not granted");

    oauth.addMailboxPermission(LOCAL_CLIENT_ID, OTHER_MAILBOX);
    const client = await imapLogin(imap, OTHER_MAILBOX, appToken);
    await client.logout();

    oauth.removeMailboxPermission(LOCAL_CLIENT_ID, OTHER_MAILBOX);
    assert.equal((await refusedLogin(imap, OTHER_MAILBOX, appToken)).authenticationFailed, true);
    // A mailbox that does not exist on the server at all.
    assert.equal((await refusedLogin(imap, "nobody@contoso.test", appToken)).authenticationFailed, true);
  });

  test("garbage, a forged signature and a token from another issuer are refused", async () => {
    assert.equal((await refusedLogin(imap, LOCAL_MAILBOX, "not-a-token")).authenticationFailed, true);
    assert.equal((await refusedLogin(imap, LOCAL_MAILBOX, `${appToken.slice(0, -8)}AAAAAAAA`)).authenticationFailed, true, "a bad signature");

    const stranger = await startOAuthServer({ clients: [{ clientId: LOCAL_CLIENT_ID, auth: "client_secret_post", secret: CLIENT_SECRET }], imap: { mailboxPermissions: { [LOCAL_CLIENT_ID]: [LOCAL_MAILBOX] } } });
    try {
      const response = await fetch(stranger.tokenUrl, { method: "POST", body: new URLSearchParams({ grant_type: "client_credentials", client_id: LOCAL_CLIENT_ID, client_secret: CLIENT_SECRET, scope: stranger.scope }) });
      const { access_token: strangerToken } = (await response.json()) as { access_token: string };
      assert.equal((await refusedLogin(imap, LOCAL_MAILBOX, strangerToken)).authenticationFailed, true);
      assert.match(oauth.stats.introspections.at(-1)?.reason ?? "", /signature|issuer/);
    } finally {
      await stranger.close();
    }
  });

  test("a delegated token with IMAP.AccessAsUser.All opens the user's own mailbox only", async () => {
    const passwordEnv = { ...certificateEnv, AUTH_METHOD: "password", CLIENT_ID: LOCAL_PUBLIC_CLIENT_ID, MAILBOX_PASSWORD: PASSWORD, TOKEN_SCOPE: `https://outlook.office365.com/${IMAP_DELEGATED_PERMISSION}`, CERT_PATH: "" };
    const tokens = new TokenProvider({ credential: credentialSourceFor(loadSendConfig(passwordEnv).auth, logger), logger });
    const token = (await tokens.getToken()).token;
    const client = await imapLogin(imap, LOCAL_MAILBOX, token);
    await client.logout();
    assert.equal((await refusedLogin(imap, OTHER_MAILBOX, token)).authenticationFailed, true);

    // SMTP.Send alone is not enough for IMAP.
    const smtpEnv = { ...passwordEnv, TOKEN_SCOPE: oauth.delegatedScope };
    const smtpTokens = new TokenProvider({ credential: credentialSourceFor(loadSendConfig(smtpEnv).auth, logger), logger });
    assert.equal((await refusedLogin(imap, LOCAL_MAILBOX, (await smtpTokens.getToken()).token)).authenticationFailed, true);
    assert.match(oauth.stats.introspections.at(-1)?.reason ?? "", /lacks IMAP\.AccessAsUser\.All/);
  });

  test("no token reaches a log", () => {
    const log = imap.log();
    assert.match(log, /Login: user=<mailer@contoso\.test>/);
    for (const secret of [appToken, ...oauth.secretsSeen()]) {
      assert.ok(!log.includes(secret), "Dovecot's log holds a secret");
      assert.ok(!logger.lines.some((line) => line.includes(secret)), "our log holds a secret");
    }
  });
});

describe("Dovecot IMAP test server lifecycle", { skip: unavailable ?? false }, () => {
  test("XOAUTH2 only on request; stop() ends every Dovecot process", async () => {
    const server = await startDovecot({ oauth: { introspectionUrl: "http://127.0.0.1:9/unused" }, users: [LOCAL_MAILBOX], mechanisms: ["xoauth2"] });
    const group = server.pid;
    const session = await rawSession(server);
    assert.match(session.greeting, /AUTH=XOAUTH2\]/, "XOAUTH2 only, as Exchange Online");
    session.close();
    await server.deliver(LOCAL_MAILBOX, "INBOX", "Subject: x\r\n\r\nx\r\n");
    assert.ok(processesInGroup(group).length >= 2, "master and its children run");
    await server.stop();
    assert.deepEqual(processesInGroup(group), []);
    await assert.rejects(rawSession(server));
  });
});

/** Processes whose process group is `pgid` (Linux /proc). */
function processesInGroup(pgid: number): number[] {
  const found: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      // After the command: state, ppid, pgrp.
      if (Number(fields[2]) === pgid && fields[0] !== "Z") found.push(Number(entry));
    } catch {
      // exited meanwhile
    }
  }
  return found;
}
