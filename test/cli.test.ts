// The queue-mailer command as users run it: a separate process, settings from the environment.
// It runs from the TypeScript sources (test/support/cli.ts), and the last describe checks that
// every test keeps doing so.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import type { QueueClient } from "@azure/storage-queue";
import { startAzurite, type Azurite } from "../cli/local/azurite.js";
import { loadStorageConfig } from "../shared/config.js";
import { openMailQueues } from "../shared/queue/mailQueue.js";
import { spawnCli } from "./support/cli.js";

const root = fileURLToPath(new URL("..", import.meta.url));

function run(command: string, args: string[], env: Record<string, string>, cwd: string): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, { cwd, env: { PATH: process.env["PATH"] ?? "", ...env }, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
    child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
    child.on("exit", (status) => resolve({ status, stdout, stderr }));
  });
}

describe("queue-mailer enqueue", () => {
  let azurite: Azurite;
  let queue: QueueClient;
  let cwd: string;
  let env: Record<string, string>;

  before(async () => {
    azurite = await startAzurite();
    env = { AzureWebJobsStorage: azurite.connectionString, MAIL_QUEUE: "cli-test" };
    ({ queue } = await openMailQueues(loadStorageConfig(env)));
    cwd = mkdtempSync(join(tmpdir(), "qm-cli-"));
  });
  after(async () => {
    await azurite.stop();
    rmSync(cwd, { recursive: true, force: true });
  });

  it("validates and enqueues a message built from flags, with storage settings only", async () => {
    const result = await spawnCli(["enqueue", "--to", "ada@example.test", "--to", "grace@example.test", "--subject", "Hello", "--text", "Hi there", "--header", "X-Ticket: 42"], { env, cwd });
    assert.equal(result.status, 0, result.stderr);
    const printed = JSON.parse(result.stdout) as { enqueued: boolean; id: string; queueMessageId: string };
    assert.equal(printed.enqueued, true);
    const { receivedMessageItems } = await queue.receiveMessages({ numberOfMessages: 32 });
    assert.equal(receivedMessageItems.length, 1);
    const message = receivedMessageItems[0];
    assert.ok(message);
    const body = JSON.parse(Buffer.from(message.messageText, "base64").toString("utf8"));
    assert.deepEqual(body, { to: ["ada@example.test", "grace@example.test"], subject: "Hello", text: "Hi there", headers: { "X-Ticket": "42" }, id: printed.id });
    await queue.deleteMessage(message.messageId, message.popReceipt);
  });

  it("enqueues a message from --file", async () => {
    const file = join(cwd, "message.json");
    writeFileSync(file, JSON.stringify({ to: "file@example.test", subject: "From a file", html: "<p>hi</p>", id: "file-1" }));
    const result = await spawnCli(["enqueue", "--file", file], { env, cwd });
    assert.equal(result.status, 0, result.stderr);
    assert.equal(JSON.parse(result.stdout).id, "file-1");
    assert.equal((await queue.getProperties()).approximateMessagesCount, 1);
    await queue.clearMessages();
  });

  it("refuses an invalid message with its code and a non-zero exit; nothing reaches the queue", async () => {
    const injected = await spawnCli(["enqueue", "--to", "a@example.test", "--subject", "Hi\r\nBcc: x@example.test", "--text", "x"], { env, cwd });
    assert.notEqual(injected.status, 0);
    assert.match(injected.stderr, /MESSAGE_HEADER_INJECTION/);
    const noBody = await spawnCli(["enqueue", "--to", "a@example.test", "--subject", "Hi"], { env, cwd });
    assert.notEqual(noBody.status, 0);
    assert.match(noBody.stderr, /MESSAGE_NO_BODY/);
    const badAddress = await spawnCli(["enqueue", "--to", "not-an-address", "--subject", "Hi", "--text", "x"], { env, cwd });
    assert.match(badAddress.stderr, /MESSAGE_INVALID_ADDRESS/);
    assert.equal((await queue.getProperties()).approximateMessagesCount, 0);
  });

  it("names the storage setting when it is missing", async () => {
    const result = await spawnCli(["enqueue", "--to", "a@example.test", "--subject", "s", "--text", "t"], { cwd });
    assert.equal(result.status, 2);
    assert.match(result.stderr, /AzureWebJobsStorage: is not set/);
  });
});

describe("npm run local -- --once", () => {
  it("delivers the samples through the real protocols and leaves .eml files", async () => {
    const dir = mkdtempSync(join(tmpdir(), "qm-local-"));
    try {
      const result = await run(process.execPath, ["--import", "tsx", join(root, "cli/local/runLocal.ts"), "--once", "--dir", dir], {}, root);
      assert.equal(result.status, 0, result.stdout + result.stderr);
      assert.equal((result.stdout.match(/^delivered #/gm) ?? []).length, 3, result.stdout);
      assert.match(result.stdout, /done: 3 of 3 samples delivered/);
      const files = readdirSync(join(dir, "outbox")).filter((f) => f.endsWith(".eml"));
      assert.equal(files.length, 3);
      const receipt = files.map((f) => readFileSync(join(dir, "outbox", f), "utf8")).find((eml) => eml.includes("Subject: Your receipt"));
      assert.ok(receipt, "the receipt sample is in the outbox");
      assert.match(receipt, /filename=receipt\.txt/);
      assert.ok(existsSync(join(dir, "dev-client.pem")), "a dev certificate was generated");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("tests run the CLI from its sources, not from dist/", () => {
  it("the bin runs dist/cli/main.js whenever dist/ exists, stale or not", async () => {
    // Why the rule below exists: `npm test` does not build, so through the bin a test would run
    // whatever was compiled last. Checked on a copy of the bin next to a marker dist/.
    const dir = mkdtempSync(join(tmpdir(), "qm-bin-"));
    try {
      mkdirSync(join(dir, "bin"));
      mkdirSync(join(dir, "dist", "cli"), { recursive: true });
      copyFileSync(join(root, "bin", "queue-mailer.js"), join(dir, "bin", "queue-mailer.js"));
      writeFileSync(join(dir, "package.json"), JSON.stringify({ type: "module" }));
      writeFileSync(join(dir, "dist", "cli", "main.js"), 'console.log("stale build");\n');
      const result = await run(process.execPath, [join(dir, "bin", "queue-mailer.js"), "--help"], {}, dir);
      assert.equal(result.status, 0, result.stderr);
      assert.equal(result.stdout, "stale build\n");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("no test and no benchmark spawns the bin or dist/cli (they use test/support/cli.ts)", () => {
    // A static check because a broken dist/ cannot be staged in a tree other runs share: without
    // it, a test that goes back to the bin passes whenever dist/ is absent or happens to be fresh.
    // Quoted paths only, so comments may still talk about the bin.
    const spawnsBuilt = /["'`][^"'`\n]*(?:bin\/queue-mailer\.js|dist\/cli\/)[^"'`\n]*["'`]|["'`]queue-mailer\.js["'`]/;
    const allowed = new Set([
      "test/cli.test.ts", // the test above copies the bin on purpose
    ]);
    const files = ["test", "bench"].flatMap((dir) => readdirSync(join(root, dir), { recursive: true, encoding: "utf8" }).filter((f) => f.endsWith(".ts")).map((f) => join(dir, f)));
    assert.ok(files.includes("bench/run.ts") && files.includes("test/expiryWatch.test.ts"), "the scan sees the files");
    const offenders = files.filter((f) => !allowed.has(f) && spawnsBuilt.test(readFileSync(join(root, f), "utf8")));
    assert.deepEqual(offenders, [], "run the CLI with spawnCli or cliEntry from test/support/cli.ts (bench/run.ts: cli/main.ts through tsx)");
  });
});
