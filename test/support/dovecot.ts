// A real IMAP server for tests: Debian's Dovecot 2.3 (scripts/ensureDovecot.sh installs it), run as a
// foreground child with its own configuration in a temporary folder, on 127.0.0.1 with implicit TLS
// (imaps, as outlook.office365.com:993) under a certificate the test CA signs. It accepts XOAUTH2 and
// OAUTHBEARER only, and Dovecot's own oauth2 passdb checks every token with the local OAuth server's
// introspection endpoint (cli/local/oauthServer.ts, `introspectionUrl`):
//
// - the OAuth server answers `active` only for a token it issued (signature, issuer, expiry, audience
//   Exchange Online) that holds IMAP.AccessAsApp (app-only, `roles`) or IMAP.AccessAsUser.All
//   (delegated, `scp`), and lists the mailboxes the token may open: the app's mailbox permissions
//   (Exchange's Add-MailboxPermission) or the delegated user's own mailbox;
// - Dovecot 2.3 does not tell the introspection endpoint which user is logging in (the URL is not
//   expanded and the request carries only the token; src/lib-oauth2/oauth2-request.c), and its
//   username check compares one token attribute with the login user, which an app-only token cannot
//   name (it serves many mailboxes). So the username check is neutralised (a constant
//   username_format) and the login user is matched against the listed mailboxes in `pass_attrs`
//   (%{if} with a wildcard match): for a user not in the list it sets the extra field `fail`, which
//   fails the passdb lookup, and the client gets "NO [AUTHENTICATIONFAILED]" as for a bad token. The
//   wildcard match is safe because auth_username_chars admits no `*`, `?` or `,` in a login name.
//
// Password mechanisms (PLAIN, LOGIN) are not offered at all. Mail is Maildir under the temporary
// folder, owned by an unprivileged system user (Dovecot refuses uid 0 for mail). Users are a
// passwd-file userdb: only the mailboxes given exist.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir, userInfo } from "node:os";
import { join } from "node:path";
import { ensureCertificateAuthority, issueCertificate } from "../../cli/local/devCertificates.js";

export interface DovecotOptions {
  /** The OAuth server that checks tokens: its RFC 7662 introspection endpoint. */
  oauth: { introspectionUrl: string };
  /** The mailboxes that exist (login names, e.g. mailer@contoso.test); others are unknown users. */
  users: string[];
  /** The CA that signs the server certificate; clients trust `${caDir}/ca.pem`. Default ".test-ca". */
  caDir?: string;
  /**
   * SASL mechanisms offered. Default both. Exchange Online offers XOAUTH2 only (and imapflow prefers
   * OAUTHBEARER when offered), so ["xoauth2"] makes a client take Exchange's path; Gmail offers both.
   */
  mechanisms?: Array<"xoauth2" | "oauthbearer">;
}

/** One message in a folder, read from the Maildir as Dovecot stored it. */
export interface StoredMessage {
  /** The message as Dovecot stored it (with LF line endings; IMAP FETCH gives CRLF). */
  raw: Buffer;
  /** IMAP system flags from the Maildir file name, e.g. ["\\Seen"]. */
  flags: string[];
}

export interface Dovecot {
  host: "127.0.0.1";
  /** imaps: TLS from the first byte (IMAP_PORT semantics of 993). */
  port: number;
  /** The master process, leader of the process group of all of this server's processes. */
  pid: number;
  /** `secure: true` for imapflow; the CA is also in NODE_EXTRA_CA_CERTS for the tests. */
  tls: { ca: string; servername: string };
  /** Stores a message in `folder` of `user` (created if missing), as a mail delivery would. */
  deliver(user: string, folder: string, rawEml: Buffer | string): Promise<void>;
  /** The messages in a folder, oldest first (empty if the folder does not exist). */
  list(user: string, folder: string): Promise<StoredMessage[]>;
  /** The user's folders as IMAP names ("INBOX", "queue-mailer-processed", "a/b"), sorted. */
  folders(user: string): Promise<string[]>;
  /** Dovecot's log so far (it never holds tokens: no auth_debug_passwords). */
  log(): string;
  stop(): Promise<void>;
}

const DOVECOT_PATHS = ["/usr/sbin/dovecot", "/usr/local/sbin/dovecot"];
const DOVEADM_PATHS = ["/usr/bin/doveadm", "/usr/local/bin/doveadm"];

function findBinary(name: string, known: string[]): string | undefined {
  for (const path of known) if (existsSync(path)) return path;
  for (const dir of (process.env.PATH ?? "").split(":").filter(Boolean)) {
    if (existsSync(join(dir, name))) return join(dir, name);
  }
  return undefined;
}

interface SystemUser {
  name: string;
  uid: number;
  gid: number;
}

function systemUser(name: string): SystemUser | undefined {
  let passwd = "";
  try {
    passwd = readFileSync("/etc/passwd", "utf8");
  } catch {
    return undefined;
  }
  for (const line of passwd.split("\n")) {
    const [user, , uid, gid] = line.split(":");
    if (user === name && uid !== undefined && gid !== undefined) return { name, uid: Number(uid), gid: Number(gid) };
  }
  return undefined;
}

/** Who runs what: as root, Dovecot's own users for its processes and an unprivileged mail owner. */
function accounts(): { internal: string; login: string; mail: SystemUser } | string {
  if (process.getuid?.() !== 0) {
    // Rootless Dovecot: every process runs as the current user.
    const me = userInfo();
    if (me.uid === 0) return "cannot tell the current user";
    return { internal: me.username, login: me.username, mail: { name: me.username, uid: me.uid, gid: me.gid } };
  }
  const internal = systemUser("dovecot");
  const login = systemUser("dovenull");
  if (!internal || !login) return "the dovecot and dovenull system users are missing (the dovecot-core package creates them)";
  const mail = ["mail", "nobody"].map(systemUser).find((u): u is SystemUser => u !== undefined && u.uid !== 0 && u.gid !== 0);
  if (!mail) return "no unprivileged system user (mail, nobody) to own the mail";
  return { internal: internal.name, login: login.name, mail };
}

/** null when Dovecot can run here; otherwise why the IMAP tests are skipped. */
export function dovecotAvailable(): string | null {
  const dovecot = findBinary("dovecot", DOVECOT_PATHS);
  if (!dovecot) return "Dovecot is not installed (scripts/ensureDovecot.sh, run by `npm test`, installs dovecot-imapd with apt-get as root)";
  if (!findBinary("doveadm", DOVEADM_PATHS)) return "doveadm is missing (dovecot-core)";
  if (!existsSync("/usr/lib/dovecot/imap-login") && !existsSync("/usr/libexec/dovecot/imap-login")) return "Dovecot's IMAP server is not installed (package dovecot-imapd)";
  const who = accounts();
  if (typeof who === "string") return who;
  const version = spawnSync(dovecot, ["--version"], { encoding: "utf8" });
  if (version.status !== 0 || !/^2\.3\./.test(version.stdout.trim())) return `Dovecot 2.3 is needed (found ${version.stdout.trim() || "none"})`;
  return null;
}

function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => (typeof address === "object" && address ? resolvePort(address.port) : reject(new Error("no port"))));
    });
  });
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolveConnect) => {
    const socket = connect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolveConnect(true);
    });
    socket.once("error", () => resolveConnect(false));
  });
}

/** Dovecot's passwd-file and Maildir names may not hold these; login names never do (auth_username_chars). */
function assertMailbox(user: string): string {
  if (!/^[a-z0-9.\-_@]+$/i.test(user)) throw new Error(`startDovecot: "${user}" is not a usable login name`);
  return user.toLowerCase();
}

// Every Dovecot still running when the test process exits is killed and its folder removed (a test
// that failed before stop()).
const running = new Map<ChildProcess, string>();
process.once("exit", () => {
  for (const [child, dir] of running) {
    killGroup(child, "SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  }
});

export async function startDovecot(options: DovecotOptions): Promise<Dovecot> {
  const unavailable = dovecotAvailable();
  if (unavailable) throw new Error(`startDovecot: ${unavailable}`);
  const dovecotBin = findBinary("dovecot", DOVECOT_PATHS)!;
  const doveadmBin = findBinary("doveadm", DOVEADM_PATHS)!;
  const who = accounts() as Exclude<ReturnType<typeof accounts>, string>;
  const users = [...new Set(options.users.map(assertMailbox))];
  const mechanisms = [...new Set(options.mechanisms ?? ["xoauth2", "oauthbearer"])];
  if (mechanisms.length === 0 || mechanisms.some((m) => m !== "xoauth2" && m !== "oauthbearer")) throw new Error(`startDovecot: mechanisms must be xoauth2 and/or oauthbearer, got ${mechanisms.join(", ")}`);

  const dir = mkdtempSync(join(tmpdir(), "qm-dovecot-"));
  // Dovecot's unprivileged processes (mail owner, login) must get through to their files and sockets.
  chmodSync(dir, 0o711);
  const mailRoot = join(dir, "mail");
  mkdirSync(mailRoot, { mode: 0o711 });
  const homeOf = (user: string) => join(mailRoot, user);
  for (const user of users) {
    mkdirSync(homeOf(user), { mode: 0o700 });
    chownSync(homeOf(user), who.mail.uid, who.mail.gid);
  }

  const ca = ensureCertificateAuthority(options.caDir ?? ".test-ca");
  const tls = issueCertificate({ commonName: "localhost", hosts: ["localhost", "127.0.0.1"] }, ca);
  writeFileSync(join(dir, "tls-cert.pem"), tls.certificatePem);
  writeFileSync(join(dir, "tls-key.pem"), tls.privateKeyPem, { mode: 0o600 });

  writeFileSync(join(dir, "users"), users.map((user) => `${user}::${who.mail.uid}:${who.mail.gid}::${homeOf(user)}::\n`).join(""));
  chmodSync(join(dir, "users"), 0o644);

  // passdb oauth2 (Dovecot's db-oauth2.c): POST token=… to the introspection endpoint; `active` must be
  // "true", `scope` must hold one of the IMAP permissions, then pass_attrs decides the mailbox.
  writeFileSync(
    join(dir, "dovecot-oauth2.conf.ext"),
    [
      `introspection_mode = post`,
      `introspection_url = ${options.oauth.introspectionUrl}`,
      `timeout_msecs = 10000`,
      `active_attribute = active`,
      `active_value = true`,
      `scope = IMAP.AccessAsApp IMAP.AccessAsUser.All`,
      // Required by Dovecot; made constant (both sides expand to "mailbox") because an app-only token
      // names no mailbox. The real check is the next line.
      `username_attribute = client_id`,
      `username_format = mailbox`,
      // The login user (%Lu) must be one of `mailboxes` (",a@x,b@y,"); otherwise the extra field
      // `fail` fails the passdb lookup: "NO [AUTHENTICATIONFAILED]", as for any refused token.
      `pass_attrs = passdb_import=%{if;%{oauth2:mailboxes};*;*,%Lu,*;mailbox_permission=granted;fail=mailbox_not_granted}`,
      ``,
    ].join("\n"),
  );

  const logPath = join(dir, "dovecot.log");
  const configPath = join(dir, "dovecot.conf");
  const writeConfig = (port: number) =>
    writeFileSync(
      configPath,
      [
        `# queue-mailer test IMAP server (test/support/dovecot.ts)`,
        `base_dir = ${dir}/run`,
        `state_dir = ${dir}/state`,
        `instance_name = qm-dovecot-${port}`,
        `protocols = imap`,
        `listen = 127.0.0.1`,
        `log_path = ${logPath}`,
        `info_log_path = ${logPath}`,
        `auth_verbose = yes`,
        `default_internal_user = ${who.internal}`,
        `default_login_user = ${who.login}`,
        `first_valid_uid = ${who.mail.uid}`,
        `first_valid_gid = ${who.mail.gid}`,
        `ssl = required`,
        `ssl_cert = <${dir}/tls-cert.pem`,
        `ssl_key = <${dir}/tls-key.pem`,
        `ssl_min_protocol = TLSv1.2`,
        `disable_plaintext_auth = yes`,
        `auth_mechanisms = ${mechanisms.join(" ")}`,
        `auth_username_chars = abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@`,
        `auth_cache_size = 0`,
        // Refusals are answered at once: no 2 s failure delay, and no growing per-IP penalty (anvil's
        // auth-penalty listener is off), so tests of refused logins stay fast.
        `auth_failure_delay = 0`,
        `service anvil {`,
        `  unix_listener anvil-auth-penalty {`,
        `    mode = 0`,
        `  }`,
        `}`,
        `mail_location = maildir:~/Maildir`,
        `namespace inbox {`,
        `  inbox = yes`,
        `  separator = /`,
        `}`,
        `passdb {`,
        `  driver = oauth2`,
        `  mechanisms = ${mechanisms.join(" ")}`,
        `  args = ${dir}/dovecot-oauth2.conf.ext`,
        `}`,
        `userdb {`,
        `  driver = passwd-file`,
        `  args = ${dir}/users`,
        `}`,
        `service imap-login {`,
        `  inet_listener imap {`,
        `    port = 0`,
        `  }`,
        `  inet_listener imaps {`,
        `    address = 127.0.0.1`,
        `    port = ${port}`,
        `    ssl = yes`,
        `  }`,
        `}`,
        `service pop3-login {`,
        `  inet_listener pop3 {`,
        `    port = 0`,
        `  }`,
        `  inet_listener pop3s {`,
        `    port = 0`,
        `  }`,
        `}`,
        `service submission-login {`,
        `  inet_listener submission {`,
        `    port = 0`,
        `  }`,
        `}`,
        `service lmtp {`,
        `  unix_listener lmtp {`,
        `    mode = 0600`,
        `  }`,
        `}`,
        `protocol imap {`,
        `  mail_max_userip_connections = 100`,
        `}`,
        ``,
      ].join("\n"),
    );

  const log = () => (existsSync(logPath) ? readFileSync(logPath, "utf8") : "");
  let child: ChildProcess | undefined;
  let port = 0;
  let stderr = "";
  for (let attempt = 1; ; attempt++) {
    port = await freePort();
    writeConfig(port);
    stderr = "";
    const started = spawn(dovecotBin, ["-F", "-c", configPath], { stdio: ["ignore", "ignore", "pipe"], detached: true });
    started.stderr!.on("data", (chunk: Buffer) => (stderr += chunk.toString("utf8")));
    // A server a test forgot to stop must not keep the test process alive (the exit hook kills it).
    started.unref();
    (started.stderr as unknown as { unref?: () => void }).unref?.();
    let exited: string | undefined;
    started.once("exit", (code, signal) => {
      exited = `exited with ${code ?? signal}`;
    });
    running.set(started, dir);
    const deadline = Date.now() + 15_000;
    let up = false;
    while (!exited && Date.now() < deadline) {
      if (await canConnect(port)) {
        up = true;
        break;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    if (up) {
      child = started;
      break;
    }
    killGroup(started, "SIGKILL");
    running.delete(started);
    const why = `${exited ?? "did not listen within 15 s"}\n${stderr}${log().split("\n").slice(-20).join("\n")}`;
    // Another process may have taken the free port in between: try another one.
    if (attempt < 3 && /Address already in use/.test(why)) continue;
    rmSync(dir, { recursive: true, force: true });
    throw new Error(`startDovecot: dovecot ${why}`);
  }

  const doveadm = (args: string[], input?: Buffer): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    new Promise((resolveRun, reject) => {
      const run = spawn(doveadmBin, ["-c", configPath, ...args], { stdio: ["pipe", "pipe", "pipe"] });
      let out = "";
      let err = "";
      run.stdout.on("data", (chunk: Buffer) => (out += chunk.toString("utf8")));
      run.stderr.on("data", (chunk: Buffer) => (err += chunk.toString("utf8")));
      run.once("error", reject);
      run.once("close", (code) => resolveRun({ code, stdout: out, stderr: err }));
      run.stdin.end(input ?? Buffer.alloc(0));
    });

  const knownUser = (user: string): string => {
    const name = assertMailbox(user);
    if (!users.includes(name)) throw new Error(`dovecot: ${user} is not one of this server's users (${users.join(", ")})`);
    return name;
  };
  /** Maildir++ (separator "/" in IMAP, "." on disk): INBOX is the Maildir itself, "a/b" is ".a.b". */
  const folderDir = (user: string, folder: string) => {
    const maildir = join(homeOf(user), "Maildir");
    return folder.toUpperCase() === "INBOX" ? maildir : join(maildir, `.${folder.split("/").join(".")}`);
  };
  const FLAG_LETTERS: Record<string, string> = { D: "\\Draft", F: "\\Flagged", R: "\\Answered", S: "\\Seen", T: "\\Deleted" };

  let stopped = false;
  return {
    host: "127.0.0.1",
    port,
    pid: child!.pid!,
    tls: { ca: ca.certificatePem, servername: "localhost" },
    async deliver(user, folder, rawEml) {
      const name = knownUser(user);
      if (folder.toUpperCase() !== "INBOX") {
        const created = await doveadm(["mailbox", "create", "-u", name, folder]);
        if (created.code !== 0 && !/exists/i.test(created.stderr)) throw new Error(`doveadm mailbox create ${folder} failed (${created.code}): ${created.stderr.trim()}`);
      }
      const saved = await doveadm(["save", "-u", name, "-m", folder], Buffer.isBuffer(rawEml) ? rawEml : Buffer.from(rawEml, "utf8"));
      if (saved.code !== 0) throw new Error(`doveadm save to ${folder} failed (${saved.code}): ${saved.stderr.trim()}`);
    },
    async list(user, folder) {
      const base = folderDir(knownUser(user), folder);
      const files: Array<{ name: string; path: string }> = [];
      for (const sub of ["new", "cur"]) {
        const path = join(base, sub);
        if (!existsSync(path)) continue;
        for (const name of readdirSync(path)) files.push({ name, path: join(path, name) });
      }
      // Maildir names start with the delivery time in seconds, then a unique part; Dovecot's carry
      // microseconds (".M<usec>") so that the order within a second holds too.
      const key = (name: string) => {
        const [seconds = "0", unique = ""] = name.split(".");
        const micro = /M(\d+)/.exec(unique)?.[1] ?? "0";
        return Number(seconds) * 1e6 + Number(micro);
      };
      files.sort((a, b) => key(a.name) - key(b.name) || a.name.localeCompare(b.name));
      return files.map(({ name, path }) => {
        const info = name.includes(":2,") ? name.slice(name.indexOf(":2,") + 3) : "";
        return { raw: readFileSync(path), flags: [...info].map((letter) => FLAG_LETTERS[letter]).filter((f): f is string => f !== undefined) };
      });
    },
    async folders(user) {
      const listed = await doveadm(["mailbox", "list", "-u", knownUser(user)]);
      if (listed.code !== 0) throw new Error(`doveadm mailbox list failed (${listed.code}): ${listed.stderr.trim()}`);
      return listed.stdout.split("\n").map((line) => line.trim()).filter(Boolean).sort();
    },
    log,
    async stop() {
      if (stopped) return;
      stopped = true;
      if (child && child.exitCode === null && child.signalCode === null) {
        const exited = new Promise<void>((resolveExit) => child!.once("exit", () => resolveExit()));
        killGroup(child, "SIGTERM");
        const timer = setTimeout(() => killGroup(child!, "SIGKILL"), 5_000);
        await exited;
        clearTimeout(timer);
      }
      // The master is gone; its children (auth, imap, …) may take a moment after it.
      if (child?.pid) killGroup(child, "SIGKILL");
      running.delete(child!);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function killGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  try {
    if (child.pid) process.kill(-child.pid, signal);
  } catch {
    // already gone
  }
}

