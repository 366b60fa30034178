// One redeemer of the refresh token at a time, across every instance. Servers that rotate refresh
// tokens (Okta, Auth0, oidc-provider; Microsoft hands out a new one with most redemptions) treat a
// rotated-out token that comes back as stolen and revoke the whole family: two instances redeeming
// the same stored token at once would end all sending. So an instance holds this lease from reading
// the stored token until the token it got back is stored; the others wait and then read that one.
//
// Kept in Table storage, like the per-mailbox limits: the app already has that account and the
// Storage Table Data Contributor role on it in every deployment, and a table row taken with a
// conditional write (shared/storage/slotTable.ts, one slot) is exactly a lease. (A blob lease
// would need a container the app owns, which it does not: producers own the attachments one.)
// The lease runs out by itself if its holder dies; while held it is renewed, for as long as a
// failed store is being retried, so that nobody redeems the stale token meanwhile.
import type { StorageConfig } from "../config.js";
import { MailerError } from "../errors.js";
import { lazy } from "../lazy.js";
import { claimSlot, holdLease, type SlotRow } from "../storage/slotTable.js";
import { openTable, tableKey } from "../storage/storageClients.js";

export const REFRESH_TOKEN_LEASE_TABLE = "refreshtokenlease";

export interface RedeemLease {
  /** Idempotent. */
  release(): void;
}

export interface RedeemLeases {
  /** Waits for the lease; fails (transient) when it stays taken past the wait limit. */
  acquire(): Promise<RedeemLease>;
}

export interface RedeemLeaseOptions {
  /** How long a lease lasts without renewal (default 60 s). */
  leaseMs?: number;
  /** Longest wait for a held lease before giving up for now (default 2 minutes). */
  maxWaitMs?: number;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The lease for the token stored at `where` (its file path or secret URL), in the app's storage account. */
export function tableRedeemLeases(storage: StorageConfig, where: string, options: RedeemLeaseOptions = {}): RedeemLeases {
  const leaseMs = options.leaseMs ?? 60_000;
  const maxWaitMs = options.maxWaitMs ?? 120_000;
  const getTable = lazy(() => openTable(storage, REFRESH_TOKEN_LEASE_TABLE));
  const partition = tableKey(where.toLowerCase());
  return {
    async acquire() {
      let table: Awaited<ReturnType<typeof getTable>>;
      const deadline = Date.now() + maxWaitMs;
      let row: SlotRow;
      try {
        table = await getTable();
        for (;;) {
          const now = Date.now();
          const result = await claimSlot(table, partition, 1, (r) => !r || r.at <= now, (r) => r.at, now + leaseMs);
          if ("claimed" in result) {
            row = result.claimed;
            break;
          }
          if (Date.now() >= deadline) {
            throw new MailerError("REFRESH_TOKEN_BUSY", `another instance has been redeeming the refresh token for more than ${Math.round(maxWaitMs / 1000)} s`, {
              kind: "transient",
              hint: "An instance holds the redeem lease (table refreshtokenlease) while it stores a rotated refresh token; if its store keeps failing, its log says why (refresh_token.store_failed). The message is retried.",
            });
          }
          // Usually freed within a token request's round trip.
          await sleep(Math.max(25, Math.min(250, result.retryAt - Date.now())) + Math.random() * 50);
        }
      } catch (error) {
        if (error instanceof MailerError) throw error;
        throw new MailerError("REFRESH_TOKEN_LEASE_UNAVAILABLE", `the refresh token's redeem lease (table ${REFRESH_TOKEN_LEASE_TABLE}) could not be taken: ${(error as Error).message}`, {
          kind: "transient",
          hint: "The storage account's Table service must be reachable (AzureWebJobsStorage or AzureWebJobsStorage__tableServiceUri, role Storage Table Data Contributor); without the lease no instance redeems, so that none redeems a token another one just rotated.",
          cause: error,
        });
      }
      return holdLease(table, row, leaseMs);
    },
  };
}

/** Only this process (no storage account configured: nothing else redeems). */
export function processRedeemLeases(): RedeemLeases {
  let tail: Promise<void> = Promise.resolve();
  return {
    async acquire() {
      let release!: () => void;
      const next = new Promise<void>((resolve) => (release = resolve));
      const previous = tail;
      tail = tail.then(() => next);
      await previous;
      let released = false;
      return {
        release() {
          if (released) return;
          released = true;
          release();
        },
      };
    },
  };
}
