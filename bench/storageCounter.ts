// A counting reverse proxy in front of Azurite: what a run costs on Azure Storage, where every
// request is a billed transaction. One loopback port per service forwards to Azurite's port for it,
// unchanged (method, path, headers, streamed bodies), and counts each request as
// `${service}.${operation}`. Give a worker `connectionString` as AzureWebJobsStorage and all its
// storage traffic passes through here.
//
// Forwarding unchanged is safe for SharedKey: the signature covers the method, the canonical headers
// and /account/path, not host:port, and Azurite takes the account from the path when the host is an
// IP address; so the Host header stays as the client sent it (127.0.0.1:<proxy port>).
import { Agent, createServer, request, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { AZURITE_ACCOUNT, AZURITE_KEY } from "../cli/local/azurite.js";
import { listenLoopback } from "../cli/local/listenLoopback.js";

export type StorageService = "blob" | "queue" | "table";
type Ports = Record<StorageService, number>;

export interface StorageCounter {
  /** Azurite's development account, with the proxy's ports as the endpoints. */
  connectionString: string;
  ports: Ports;
  /**
   * Requests by `${service}.${operation}` since the start or the last reset. One extra key is not a
   * request: `table.batchOperations`, the operations inside the `table.batch` requests.
   */
  counts(): Record<string, number>;
  /** Requests counted (every key of counts() but `table.batchOperations`). */
  total(): number;
  /** Answers that were not 2xx, by the same keys: still billed, and a sign of contention or misuse. */
  failures(): Record<string, number>;
  reset(): void;
  close(): Promise<void>;
}

/** Headers that describe one connection, not the request: each hop sets its own. */
const HOP_BY_HOP = new Set(["connection", "keep-alive", "proxy-connection", "upgrade", "te", "trailer"]);

function forwardable(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  const out: IncomingHttpHeaders = {};
  for (const [name, value] of Object.entries(headers)) if (value !== undefined && !HOP_BY_HOP.has(name)) out[name] = value;
  return out;
}

/** Path and query of a request, the account segment dropped: `/queue/messages`, `{ popreceipt: … }`. */
function parse(rawUrl: string): { segments: string[]; query: URLSearchParams } {
  const url = new URL(rawUrl, "http://proxy");
  let path: string;
  try {
    path = decodeURIComponent(url.pathname);
  } catch {
    path = url.pathname;
  }
  const segments = path.split("/").filter((s) => s !== "");
  if (segments[0] === AZURITE_ACCOUNT) segments.shift();
  // Lower-case names: the SDKs send `numofmessages`, `popreceipt`, `comp`, but the REST API ignores case.
  const query = new URLSearchParams();
  for (const [k, v] of url.searchParams) query.append(k.toLowerCase(), v);
  return { segments, query };
}

function classifyQueue(method: string, segments: string[], query: URLSearchParams): string {
  const comp = query.get("comp");
  if (segments.length === 0) return comp === "list" ? "listQueues" : "other";
  if (segments.length === 1) {
    if (comp === "metadata") return method === "GET" || method === "HEAD" ? "getProperties" : "setMetadata";
    if (comp === null && method === "PUT") return "createQueue";
    if (comp === null && method === "DELETE") return "deleteQueue";
    return "other";
  }
  if (segments[1] !== "messages") return "other";
  if (segments.length === 2) {
    if (method === "GET") return query.get("peekonly")?.toLowerCase() === "true" ? "peek" : "receive";
    if (method === "POST") return "put";
    if (method === "DELETE") return "clear";
    return "other";
  }
  if (method === "DELETE") return "delete";
  if (method === "PUT") return "update";
  return "other";
}

// `ledger(PartitionKey='p',RowKey='r')`: one entity; `ledger()` or `ledger`: the table.
const ENTITY = /^([^()]+)\(\s*PartitionKey\s*=\s*'.*'\s*,\s*RowKey\s*=\s*'.*'\s*\)$/s;
const TABLE = /^([^()]+)(\(\s*\))?$/;

/** `method` is the effective one: MERGE may come as POST with X-HTTP-Method. */
function classifyTable(method: string, segments: string[], headers: IncomingHttpHeaders): string {
  const [first, ...rest] = segments;
  if (first === undefined || rest.length > 0) return "other";
  if (first === "$batch") return method === "POST" ? "batch" : "other";
  if (first === "Tables" || first.startsWith("Tables(")) {
    if (first === "Tables" && method === "POST") return "createTable";
    if (method === "GET") return "listTables";
    if (method === "DELETE") return "deleteTable";
    return "other";
  }
  const conditional = headers["if-match"] !== undefined;
  if (ENTITY.test(first)) {
    switch (method) {
      case "GET":
        return "pointRead";
      // Without If-Match the REST API inserts when the row is missing (Insert Or Replace/Merge);
      // with it, the row must exist (and match the ETag unless it is *).
      case "PUT":
        return conditional ? "update" : "insertOrReplace";
      case "PATCH":
      case "MERGE":
        return conditional ? "merge" : "insertOrMerge";
      case "DELETE":
        return "delete";
      default:
        return "other";
    }
  }
  if (TABLE.test(first)) {
    if (method === "POST") return "insert";
    if (method === "GET") return "query";
  }
  return "other";
}

function classifyBlob(method: string, segments: string[], query: URLSearchParams): string {
  const comp = query.get("comp");
  if (comp === "lease") return "lease";
  if (comp === "list") return "list";
  if (segments.length === 1 && query.get("restype") === "container" && comp === null) {
    if (method === "PUT") return "createContainer";
    if (method === "GET" || method === "HEAD") return "containerProperties";
    return "other";
  }
  if (segments.length >= 2) {
    if ((method === "GET" || method === "HEAD") && comp === null) return "get";
    if (method === "PUT" && (comp === null || comp === "block" || comp === "blocklist")) return "put";
    if (method === "DELETE" && comp === null) return "delete";
  }
  return "other";
}

export function classify(service: StorageService, method: string, rawUrl: string, headers: IncomingHttpHeaders): string {
  const { segments, query } = parse(rawUrl);
  const override = headers["x-http-method"];
  const effective = (typeof override === "string" && method === "POST" ? override : method).toUpperCase();
  switch (service) {
    case "queue":
      return classifyQueue(effective, segments, query);
    case "table":
      return classifyTable(effective, segments, headers);
    case "blob":
      return classifyBlob(effective, segments, query);
  }
}

/** The request lines inside a $batch body (each changeset part is one HTTP request). */
export function countBatchOperations(body: string): number {
  return body.match(/^(?:GET|POST|PUT|PATCH|MERGE|DELETE) \S+ HTTP\/1\.1\r?$/gm)?.length ?? 0;
}

const MAX_BATCH_BODY = 4 * 1024 * 1024; // the service's own limit for a batch

export async function startStorageCounter(azurite: Ports): Promise<StorageCounter> {
  let counts = new Map<string, number>();
  let failures = new Map<string, number>();
  const bump = (map: Map<string, number>, key: string, by = 1) => map.set(key, (map.get(key) ?? 0) + by);
  // Keep-alive to Azurite: a new TCP connection per request would cost more than the forwarding.
  // Node honours Azurite's `Keep-Alive: timeout=5` hint and drops idle sockets before Azurite does.
  const upstream = new Agent({ keepAlive: true, maxFreeSockets: 256 });
  const servers: Server[] = [];

  const handler = (service: StorageService) => (req: IncomingMessage, res: ServerResponse) => {
    const method = req.method ?? "GET";
    const url = req.url ?? "/";
    const key = `${service}.${classify(service, method, url, req.headers)}`;
    bump(counts, key);
    if (key === "table.batch") {
      // A copy of the body, beside the forwarding, to count the operations it carries.
      const chunks: Buffer[] = [];
      let size = 0;
      req.on("data", (chunk: Buffer) => {
        if (size < MAX_BATCH_BODY) chunks.push(chunk);
        size += chunk.length;
      });
      const before = counts;
      req.once("end", () => {
        if (counts === before) bump(counts, "table.batchOperations", countBatchOperations(Buffer.concat(chunks).toString("latin1")));
      });
    }
    const forward = request(
      { host: "127.0.0.1", port: azurite[service], method, path: url, headers: forwardable(req.headers), agent: upstream },
      (answer) => {
        const status = answer.statusCode ?? 502;
        if (status < 200 || status >= 300) bump(failures, key);
        res.writeHead(status, answer.statusMessage, forwardable(answer.headers));
        answer.pipe(res);
        answer.once("error", () => res.destroy());
      },
    );
    forward.once("error", (error) => {
      // An idle socket Azurite closed as it was reused, or Azurite gone: 503 tells the SDK to retry
      // (what it does on a reset too); mid-answer, only a broken connection says it.
      bump(failures, key);
      if (!res.headersSent) {
        res.writeHead(503, { "content-type": "text/plain" });
        res.end(`storage counter: ${error.message}`);
      } else {
        res.destroy(error);
      }
    });
    req.pipe(forward);
    req.once("error", () => forward.destroy());
    res.once("close", () => {
      if (!res.writableFinished) forward.destroy();
    });
  };

  const listen = async (service: StorageService) => {
    const server = createServer(handler(service));
    // Longer than the SDK clients keep idle sockets, so that the client, not this side, closes them.
    server.keepAliveTimeout = 65_000;
    servers.push(server);
    return (await listenLoopback(server, {})).port;
  };
  try {
    const ports: Ports = { blob: await listen("blob"), queue: await listen("queue"), table: await listen("table") };
    const base = "http://127.0.0.1";
    const connectionString =
      `DefaultEndpointsProtocol=http;AccountName=${AZURITE_ACCOUNT};AccountKey=${AZURITE_KEY};` +
      `BlobEndpoint=${base}:${ports.blob}/${AZURITE_ACCOUNT};QueueEndpoint=${base}:${ports.queue}/${AZURITE_ACCOUNT};TableEndpoint=${base}:${ports.table}/${AZURITE_ACCOUNT};`;
    return {
      connectionString,
      ports,
      counts: () => Object.fromEntries([...counts].sort(([a], [b]) => a.localeCompare(b))),
      total: () => [...counts].reduce((sum, [k, n]) => (k === "table.batchOperations" ? sum : sum + n), 0),
      failures: () => Object.fromEntries([...failures].sort(([a], [b]) => a.localeCompare(b))),
      reset() {
        counts = new Map();
        failures = new Map();
      },
      async close() {
        await Promise.all(
          servers.map(
            (server) =>
              new Promise<void>((resolve) => {
                server.close(() => resolve());
                server.closeAllConnections();
              }),
          ),
        );
        upstream.destroy();
      },
    };
  } catch (error) {
    for (const server of servers) server.close();
    upstream.destroy();
    throw error;
  }
}
