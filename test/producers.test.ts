// The producer examples in docs/producers.md (issue 14) build messages our sender accepts: the
// Python example is run (python3, with stand-ins for azure-storage-queue and azure-storage-blob that
// print what would be sent), the C# example's JSON is read from its raw string literals; every
// message, the claim check's blob and the scheduled one included, goes through validateMessage.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { validateMessage } from "../shared/message/validate.js";
import { decodeQueueText } from "../shared/queue/decode.js";

const docs = readFileSync(join(dirname(fileURLToPath(import.meta.url)), "..", "docs", "producers.md"), "utf8");
const codeBlock = (language: string) => {
  const block = new RegExp("```" + language + "\\n([\\s\\S]*?)\\n```").exec(docs)?.[1];
  assert.ok(block, `docs/producers.md has a ${language} example`);
  return block;
};
const DEFAULTS = { from: "sender@example.com", id: "queue-id" };

// Stand-ins with the SDKs' names and signatures, printing one JSON line per call.
const stubs: Record<string, string> = {
  "azure/__init__.py": "",
  "azure/storage/__init__.py": "",
  "azure/storage/queue/__init__.py": `
import json
class TextBase64EncodePolicy:
    pass
class QueueClient:
    @classmethod
    def from_connection_string(cls, conn_str, queue_name, **kwargs):
        assert isinstance(kwargs.get("message_encode_policy"), TextBase64EncodePolicy)
        return cls()
    def send_message(self, content, *, visibility_timeout=None, time_to_live=None, **kwargs):
        print(json.dumps({"queue": content, "visibility_timeout": visibility_timeout, "time_to_live": time_to_live}))
`,
  "azure/storage/blob/__init__.py": `
import json
class BlobClient:
    def __init__(self, name):
        self.name = name
    @classmethod
    def from_connection_string(cls, conn_str, container_name, blob_name, **kwargs):
        return cls(blob_name)
    def upload_blob(self, data, **kwargs):
        print(json.dumps({"blob": self.name, "data": data.decode("utf-8")}))
`,
};

describe("producer examples (docs/producers.md)", () => {
  it("README links to them", () => {
    assert.match(readFileSync(join(dirname(fileURLToPath(import.meta.url)), "..", "README.md"), "utf8"), /\(docs\/producers\.md\)/);
  });

  it("Python: the plain, claim-check and scheduled messages it enqueues pass our validator", { timeout: 20_000 }, (t) => {
    if (spawnSync("python3", ["--version"]).status !== 0) {
      t.skip("python3 is not installed");
      return;
    }
    const dir = mkdtempSync(join(tmpdir(), "qm-producers-"));
    try {
      for (const [path, text] of Object.entries(stubs)) {
        mkdirSync(dirname(join(dir, path)), { recursive: true });
        writeFileSync(join(dir, path), text);
      }
      writeFileSync(join(dir, "example.py"), codeBlock("python"));
      const run = spawnSync("python3", [join(dir, "example.py")], { env: { PATH: process.env["PATH"] ?? "", PYTHONPATH: dir, AzureWebJobsStorage: "UseDevelopmentStorage=true" }, encoding: "utf8", timeout: 15_000 });
      assert.equal(run.status, 0, run.stderr);
      const calls = run.stdout.trim().split("\n").map((line) => JSON.parse(line) as { queue?: string; blob?: string; data?: string; visibility_timeout?: number | null; time_to_live?: number | null });
      const blobs = new Map(calls.filter((c) => c.blob !== undefined).map((c) => [c.blob, c.data ?? ""]));
      const sent = calls.filter((c) => c.queue !== undefined);
      assert.equal(sent.length, 3, run.stdout);
      const messages = sent.map((call) => {
        const json = JSON.parse(decodeQueueText(call.queue ?? "")) as Record<string, unknown>;
        if (typeof json["claimCheck"] === "string") {
          assert.deepEqual(Object.keys(json), ["claimCheck"], "a claim check holds only the blob name");
          const blob = blobs.get(json["claimCheck"]);
          assert.ok(blob !== undefined, "the blob was uploaded first");
          return { call, message: validateMessage(JSON.parse(blob), DEFAULTS), claimCheck: true };
        }
        return { call, message: validateMessage(json, DEFAULTS), claimCheck: false };
      });
      assert.deepEqual(messages.map((m) => m.claimCheck), [false, true, false]);
      assert.equal(messages[1]?.message.attachments[0]?.content?.toString(), "month,total\n11,42\n");
      const scheduled = messages[2];
      assert.ok(scheduled?.message.sendAt && scheduled.message.expiresAt, "sendAt and expiresAt parsed");
      const hiddenFor = scheduled.call.visibility_timeout ?? 0;
      const untilSendAt = (scheduled.message.sendAt.getTime() - Date.now()) / 1000;
      assert.ok(Math.abs(hiddenFor - untilSendAt) < 5, `visibility ${hiddenFor} s, sendAt in ${untilSendAt} s`);
      assert.equal(scheduled.call.time_to_live, -1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("C#: the JSON it builds passes our validator", () => {
    const code = codeBlock("csharp");
    const literals = [...code.matchAll(/"""\n([\s\S]*?)\n"""/g)].map((m) => JSON.parse(m[1] ?? "") as Record<string, unknown>);
    assert.equal(literals.length, 3, "plain, claim-check body, scheduled");
    for (const json of literals.slice(0, 2)) validateMessage(json, DEFAULTS);
    assert.equal(validateMessage(literals[1], DEFAULTS).attachments[0]?.content?.toString(), "month,total\n11,42\n");
    // The scheduled one gets its times as DateTimeOffset.ToString("O") writes them.
    const sendAt = new Date(Date.now() + 3_600_000);
    const roundTrip = (d: Date) => d.toISOString().replace(/\.(\d{3})Z$/, ".$10000+00:00");
    assert.match(code, /reminder\["sendAt"\] = sendAt\.ToString\("O"\)/);
    const scheduled = validateMessage({ ...literals[2], sendAt: roundTrip(sendAt), expiresAt: roundTrip(new Date(sendAt.getTime() + 1_800_000)) }, DEFAULTS);
    assert.equal(scheduled.sendAt?.getTime(), sendAt.getTime());
    assert.match(code, /SendMessageAsync\(JsonSerializer\.Serialize\(new \{ claimCheck = blobName \}\)\)/);
    assert.match(code, /visibilityTimeout: hidden < TimeSpan\.FromDays\(7\)/);
  });
});
