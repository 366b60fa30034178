// The per-mailbox limits hold across instances because they live in Table storage (Azurite here):
// two limiter/slot objects stand for two Functions instances that share nothing but the account.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { startAzurite, type Azurite } from "../cli/local/azurite.js";
import { loadStorageConfig, type StorageConfig } from "../shared/config.js";
import { CONNECTION_TABLE, tableConnectionSlots } from "../shared/send/connectionSlots.js";
import { tableRateLimiter } from "../shared/send/rateLimiter.js";
import { openTable, tableKey } from "../shared/storage/storageClients.js";

let azurite: Azurite;
let storage: StorageConfig;

before(async () => {
  azurite = await startAzurite();
  storage = loadStorageConfig({ AzureWebJobsStorage: azurite.connectionString });
});
after(() => azurite.stop());

describe("send rate across instances", () => {
  // Every test here waits on leases and windows: a limiter that never grants fails, not hangs.
  it("never lets more than the limit start in any window, whichever instance sends", { timeout: 20_000 }, async () => {
    const windowMs = 1_000; // stretched by 1/60 for clock skew and claim latency
    const instanceA = tableRateLimiter(storage, "rate@contoso.test", 5, { windowMs });
    const instanceB = tableRateLimiter(storage, "rate@contoso.test", 5, { windowMs });
    const starts: number[] = [];
    const began = Date.now();
    await Promise.all(Array.from({ length: 12 }, (_, i) => (i % 2 ? instanceA : instanceB).acquire().then((permit) => {
          starts.push(Date.now());
          permit.release();
        })));
    starts.sort((a, b) => a - b);
    // The nominal window is what the server counts; the margin absorbs claim latency and skew.
    for (const t of starts) {
      const inWindow = starts.filter((s) => s >= t && s < t + windowMs).length;
      assert.ok(inWindow <= 5, `${inWindow} sends started within one window`);
    }
    assert.ok(Date.now() - began >= 2 * windowMs, "12 sends at 5 per window need three windows");
  });

  it("a limit of 0 means no limit", { timeout: 20_000 }, async () => {
    const limiter = tableRateLimiter(storage, "free@contoso.test", 0);
    const began = Date.now();
    await Promise.all(Array.from({ length: 100 }, () => limiter.acquire()));
    assert.ok(Date.now() - began < 1_000);
  });
});

describe("SMTP connections across instances", () => {
  it("holds at most `size` connections at once over two instances", { timeout: 20_000 }, async () => {
    const instanceA = tableConnectionSlots(storage, "conn@contoso.test", 2);
    const instanceB = tableConnectionSlots(storage, "conn@contoso.test", 2);
    let held = 0;
    let peak = 0;
    await Promise.all(
      Array.from({ length: 6 }, async (_, i) => {
        const lease = await (i % 2 ? instanceA : instanceB).acquire();
        held += 1;
        peak = Math.max(peak, held);
        await new Promise((resolve) => setTimeout(resolve, 150));
        held -= 1;
        lease.release();
      }),
    );
    assert.equal(peak, 2);
  });

  it("a crashed instance's slot frees itself when its lease runs out", { timeout: 20_000 }, async () => {
    const table = await openTable(storage, CONNECTION_TABLE);
    // What a crashed holder leaves behind: a lease ending in 800 ms that nobody renews.
    await table.upsertEntity({ partitionKey: tableKey("crash@contoso.test"), rowKey: "slot-0000", at: Date.now() + 800, holder: "dead-instance" }, "Replace");
    const slots = tableConnectionSlots(storage, "crash@contoso.test", 1);
    const began = Date.now();
    const lease = await slots.acquire();
    const waited = Date.now() - began;
    lease.release();
    assert.ok(waited >= 600 && waited < 5_000, `waited ${waited} ms for the dead lease`);
  });
});
