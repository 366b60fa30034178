// The suppression list: addresses we no longer send to, in the `suppressions` table, shared by all
// instances. Bounces add to it (a hard bounce at once, soft bounces once SOFT_BOUNCE_LIMIT distinct
// messages soft-bounced within 7 days), operators add and remove by hand, and the sender reads it
// before every send (shared/send/sendEmail.ts).
//
// Layout, so that the sender's check is point reads and a bounce is recorded exactly once:
//   PartitionKey "suppressed", RowKey <address>           one row per suppressed address (list() is one partition)
//   PartitionKey "bounces:<address>", RowKey "e:<hash>"   one row per bounce event, keyed by the bounced
//                                                         Message-ID and status: reading the same report
//                                                         twice finds its row and changes nothing
//   PartitionKey "bounces:<address>", RowKey "cleared"    when an operator last removed the address:
//                                                         soft bounces before it no longer count
// Addresses are keyed lower-case with the domain in A-labels (tableKey escapes / \ # ?).
import { createHash } from "node:crypto";
import { domainToASCII } from "node:url";
import type { TableClient } from "@azure/data-tables";
import type { StorageConfig } from "../config.js";
import { MailerError } from "../errors.js";
import { lazy } from "../lazy.js";
import type { Logger } from "../log.js";
import { openTable, statusOf, tableKey } from "../storage/storageClients.js";
import type { BounceAction, BounceKind, BounceReport } from "./parseBounce.js";

export const SUPPRESSIONS_TABLE = "suppressions";
const SUPPRESSED = "suppressed";
const WINDOW_MS = 7 * 24 * 60 * 60 * 1000;
/** Point reads in flight at once for one lookup (a message may have up to 500 recipients). */
const LOOKUP_CONCURRENCY = 16;

export interface Suppression {
  /** Lower-case, domain in A-labels. */
  address: string;
  source: "bounce" | "manual";
  reason: string;
  /** The bounce's status code (source bounce). */
  status?: string;
  kind?: BounceKind;
  /** When the address was suppressed: the bounce's time, or when it was added by hand. */
  at: string;
  /** The bounced message's Message-ID header and our id for it (source bounce, when known). */
  messageId?: string;
  id?: string;
  /** Soft bounces (distinct messages) in the 7 days that led to it. */
  softBounces?: number;
}

/** One recipient of one bounce report. */
export interface BounceEvent {
  address: string;
  /** Enhanced status code, e.g. "5.1.1". */
  status: string;
  kind: BounceKind;
  action?: BounceAction;
  diagnostic?: string;
  /** The bounced message's Message-ID header: with the status, what makes a report recorded once. */
  messageId: string;
  /** Our message id, when the send ledger knows the Message-ID. */
  id?: string;
  /** When it bounced (the report's date). */
  at: Date;
}

export interface RecordedBounce {
  address: string;
  /** This event was recorded before (the same report read again): nothing changed. */
  duplicate: boolean;
  /** The address is on the list now (by this bounce, or before it). */
  suppressed: boolean;
  /** This bounce put it there. */
  newlySuppressed: boolean;
  /** Soft bounces: distinct messages that soft-bounced in the 7 days up to this one, this one included. */
  softBounces?: number;
}

export interface SuppressionList {
  /** Record one recipient's bounce; idempotent per (address, Message-ID, status). */
  recordBounce(event: BounceEvent): Promise<RecordedBounce>;
  /**
   * The suppressed ones among `addresses`, keyed by normalized address: one point read per distinct
   * address, in parallel. The sender calls this once per message.
   */
  lookup(addresses: readonly string[]): Promise<Map<string, Suppression>>;
  isSuppressed(address: string): Promise<boolean>;
  /** Every suppressed address, sorted by address. */
  list(): Promise<Suppression[]>;
  /** Suppress by hand (replaces an existing entry's reason). */
  add(address: string, reason: string): Promise<Suppression>;
  /** False when the address was not suppressed. Its earlier soft bounces stop counting. */
  remove(address: string): Promise<boolean>;
}

export interface SuppressionListOptions {
  /** SOFT_BOUNCE_LIMIT: distinct messages soft-bounced within 7 days that suppress an address. */
  softBounceLimit?: number;
  now?: () => number;
}

/** The key the list uses for an address: trimmed, without <>, lower-case, domain in A-labels. */
export function normalizeAddress(address: string): string {
  const bare = address.trim().replace(/^<(.*)>$/, "$1").trim().toLowerCase();
  const at = bare.lastIndexOf("@");
  if (at < 0) return bare;
  const domain = bare.slice(at + 1);
  // Our sender writes A-labels; a report may echo either form.
  return `${bare.slice(0, at)}@${domainToASCII(domain) || domain}`;
}

/** The events to record for a parsed report: one per failed or delayed recipient. */
export function bounceEventsOf(report: BounceReport, match: { messageId: string; id?: string }): BounceEvent[] {
  return report.recipients.map((r) => ({
    address: r.address,
    status: r.status,
    kind: r.kind,
    action: r.action,
    ...(r.diagnostic === undefined ? {} : { diagnostic: r.diagnostic }),
    messageId: match.messageId,
    ...(match.id === undefined ? {} : { id: match.id }),
    at: report.reportedAt,
  }));
}

interface SuppressionEntity extends Suppression {
  partitionKey: string;
  rowKey: string;
}

interface EventEntity {
  partitionKey: string;
  rowKey: string;
  address?: string;
  messageId?: string;
  id?: string;
  status?: string;
  kind?: BounceKind;
  action?: string;
  diagnostic?: string;
  at: string;
}

const eventPartition = (address: string) => `bounces:${tableKey(address)}`;
const eventRowKey = (messageId: string, status: string) => `e:${createHash("sha256").update(`${messageId.trim()}\n${status}`).digest("hex").slice(0, 40)}`;

function entryOf(entity: SuppressionEntity): Suppression {
  const { partitionKey: _p, rowKey: _r, etag: _e, timestamp: _t, ...entry } = entity as SuppressionEntity & { etag?: string; timestamp?: string };
  return entry;
}

async function exists(client: TableClient, partitionKey: string, rowKey: string): Promise<boolean> {
  try {
    await client.getEntity(partitionKey, rowKey, { queryOptions: { select: ["PartitionKey"] } });
    return true;
  } catch (error) {
    if (statusOf(error) === 404) return false;
    throw error;
  }
}

/** Create unless present; false when it was there already (409). */
async function createOnce(client: TableClient, entity: { partitionKey: string; rowKey: string }): Promise<boolean> {
  try {
    await client.createEntity(entity);
    return true;
  } catch (error) {
    if (statusOf(error) === 409) return false;
    throw error;
  }
}

export function tableSuppressionList(storage: StorageConfig, logger: Logger, options: SuppressionListOptions = {}): SuppressionList {
  const getTable = lazy(() => openTable(storage, SUPPRESSIONS_TABLE));
  const softBounceLimit = options.softBounceLimit ?? 3;
  const now = options.now ?? Date.now;

  async function read(client: TableClient, address: string): Promise<Suppression | undefined> {
    try {
      return entryOf(await client.getEntity<SuppressionEntity>(SUPPRESSED, tableKey(address)));
    } catch (error) {
      if (statusOf(error) === 404) return undefined;
      throw error;
    }
  }

  /** Distinct messages that soft-bounced in the 7 days up to `at`, after the last removal, plus this one. */
  async function softBouncesUpTo(client: TableClient, address: string, at: Date, messageId: string): Promise<number> {
    const rows: EventEntity[] = [];
    const partition = eventPartition(address).replace(/'/g, "''");
    for await (const row of client.listEntities<EventEntity>({ queryOptions: { filter: `PartitionKey eq '${partition}'` } })) rows.push(row);
    const cleared = rows.find((r) => r.rowKey === "cleared")?.at ?? "";
    const from = new Date(at.getTime() - WINDOW_MS).toISOString();
    const to = at.toISOString();
    const messages = new Set(rows.filter((r) => r.kind === "soft" && r.at > from && r.at <= to && r.at > cleared).map((r) => r.messageId));
    messages.add(messageId.trim());
    return messages.size;
  }

  return {
    async recordBounce(event) {
      const address = normalizeAddress(event.address);
      if (!address.includes("@")) throw new MailerError("BOUNCE_MALFORMED", `bounce for ${JSON.stringify(event.address)}: not an address`, { kind: "permanent" });
      const client = await getTable();
      const partitionKey = eventPartition(address);
      const rowKey = eventRowKey(event.messageId, event.status);
      const at = event.at.toISOString();
      const fields = { recipient: address, status: event.status, kind: event.kind, action: event.action, messageId: event.messageId, id: event.id };
      // The event row is written last, so a crash in between leaves the report to be recorded again
      // in full (the entry is created once either way); it is read first, so a report read twice
      // changes nothing, even after an operator removed the address again.
      if (await exists(client, partitionKey, rowKey)) {
        logger.log("info", "bounce.duplicate", { ...fields, note: "this report was recorded before; nothing changed" });
        return { address, duplicate: true, suppressed: (await read(client, address)) !== undefined, newlySuppressed: false };
      }
      let softBounces: number | undefined;
      let suppress: Pick<Suppression, "reason" | "softBounces"> | undefined;
      if (event.kind === "hard") {
        suppress = { reason: `hard bounce ${event.status}${event.diagnostic ? `: ${event.diagnostic}` : ""}`.slice(0, 1000) };
      } else {
        softBounces = await softBouncesUpTo(client, address, event.at, event.messageId);
        if (softBounces >= softBounceLimit) suppress = { reason: `${softBounces} soft bounces within 7 days (last ${event.status}${event.diagnostic ? `: ${event.diagnostic}` : ""})`.slice(0, 1000), softBounces };
      }
      let newlySuppressed = false;
      if (suppress) {
        const entry: SuppressionEntity = {
          partitionKey: SUPPRESSED,
          rowKey: tableKey(address),
          address,
          source: "bounce",
          ...suppress,
          status: event.status,
          kind: event.kind,
          at,
          messageId: event.messageId,
          ...(event.id === undefined ? {} : { id: event.id }),
        };
        newlySuppressed = await createOnce(client, entry);
      }
      const recorded: EventEntity = {
        partitionKey,
        rowKey,
        address,
        messageId: event.messageId.trim(),
        status: event.status,
        kind: event.kind,
        at,
        ...(event.id === undefined ? {} : { id: event.id }),
        ...(event.action === undefined ? {} : { action: event.action }),
        ...(event.diagnostic === undefined ? {} : { diagnostic: event.diagnostic.slice(0, 1000) }),
      };
      if (!(await createOnce(client, recorded))) {
        // Another instance recorded the same report at the same moment: it logs it.
        logger.log("info", "bounce.duplicate", { ...fields, note: "recorded by another instance at the same time" });
        return { address, duplicate: true, suppressed: (await read(client, address)) !== undefined, newlySuppressed: false };
      }
      const suppressed = newlySuppressed || (suppress !== undefined) || (await read(client, address)) !== undefined;
      logger.log("info", "bounce.recorded", { ...fields, at, diagnostic: event.diagnostic, suppressed, newlySuppressed, ...(softBounces === undefined ? {} : { softBounces, softBounceLimit }) });
      return { address, duplicate: false, suppressed, newlySuppressed, ...(softBounces === undefined ? {} : { softBounces }) };
    },

    async lookup(addresses) {
      const distinct = [...new Set(addresses.map(normalizeAddress))];
      const found = new Map<string, Suppression>();
      if (distinct.length === 0) return found;
      const client = await getTable();
      for (let i = 0; i < distinct.length; i += LOOKUP_CONCURRENCY) {
        const slice = distinct.slice(i, i + LOOKUP_CONCURRENCY);
        const entries = await Promise.all(slice.map((address) => read(client, address)));
        entries.forEach((entry, j) => {
          if (entry !== undefined) found.set(slice[j] ?? entry.address, entry);
        });
      }
      return found;
    },

    async isSuppressed(address) {
      return (await this.lookup([address])).size > 0;
    },

    async list() {
      const client = await getTable();
      const entries: Suppression[] = [];
      for await (const entity of client.listEntities<SuppressionEntity>({ queryOptions: { filter: `PartitionKey eq '${SUPPRESSED}'` } })) entries.push(entryOf(entity));
      return entries.sort((a, b) => a.address.localeCompare(b.address));
    },

    async add(address, reason) {
      const normalized = normalizeAddress(address);
      if (!/^[^\s@]+@[^\s@]+$/.test(normalized)) {
        throw new MailerError("SUPPRESSION_INVALID_ADDRESS", `${JSON.stringify(address)} is not an email address`, { kind: "permanent", hint: "Give one address, e.g. ada@example.com." });
      }
      const entry: Suppression = { address: normalized, source: "manual", reason: reason.slice(0, 1000), at: new Date(now()).toISOString() };
      await (await getTable()).upsertEntity({ partitionKey: SUPPRESSED, rowKey: tableKey(normalized), ...entry }, "Replace");
      logger.log("info", "suppression.added", { recipient: normalized, source: "manual", reason: entry.reason });
      return entry;
    },

    async remove(address) {
      const normalized = normalizeAddress(address);
      const client = await getTable();
      try {
        await client.deleteEntity(SUPPRESSED, tableKey(normalized));
      } catch (error) {
        if (statusOf(error) === 404) return false;
        throw error;
      }
      // Its earlier soft bounces stop counting, so that the next one does not suppress it again at once.
      await client.upsertEntity({ partitionKey: eventPartition(normalized), rowKey: "cleared", at: new Date(now()).toISOString() }, "Replace");
      logger.log("info", "suppression.removed", { recipient: normalized });
      return true;
    },
  };
}

/**
 * The sender's view of the list: the whole list read at most every `refreshMs` and kept in memory,
 * so a message's check costs no storage request. A point read per recipient per message was the
 * largest storage cost of a send after the queue itself (measured in `npm run bench`), and the list
 * changes rarely: by a bounce watch pass (every few minutes) or by hand. A new entry therefore
 * reaches a running sender within `refreshMs` (SUPPRESSION_REFRESH_SECONDS). Writes go straight
 * through to the table. A failed refresh keeps the last snapshot (logged) until the next try; with
 * no snapshot yet, the check fails and the message is retried.
 */
export function suppressionSnapshot(list: SuppressionList, refreshMs: number, logger: Logger, now: () => number = Date.now): SuppressionList {
  let snapshot: { byAddress: Map<string, Suppression>; readAt: number } | undefined;
  let refreshing: Promise<Map<string, Suppression>> | undefined;
  async function current(): Promise<Map<string, Suppression>> {
    if (snapshot && now() - snapshot.readAt < refreshMs) return snapshot.byAddress;
    refreshing ??= list
      .list()
      .then((entries) => {
        snapshot = { byAddress: new Map(entries.map((e) => [e.address, e])), readAt: now() };
        return snapshot.byAddress;
      })
      .catch((error: unknown) => {
        if (!snapshot) throw error;
        logger.log("warn", "suppressions.refresh_failed", { error: (error as Error).message?.split("\n")[0], entries: snapshot.byAddress.size, note: "checking against the last list read; trying again at the next send" });
        return snapshot.byAddress;
      })
      .finally(() => (refreshing = undefined));
    return refreshing;
  }
  return {
    ...list,
    async lookup(addresses) {
      const byAddress = await current();
      const found = new Map<string, Suppression>();
      for (const address of addresses) {
        const key = normalizeAddress(address);
        const entry = byAddress.get(key);
        if (entry !== undefined) found.set(key, entry);
      }
      return found;
    },
    async isSuppressed(address) {
      return (await current()).has(normalizeAddress(address));
    },
  };
}
