// A small authoritative DNS server on loopback (UDP), for `queue-mailer doctor --dns` in tests and
// local runs: it answers TXT and CNAME records it is given, so SPF, DKIM and DMARC setups can be
// reproduced without touching real DNS. Packets are encoded and decoded by dns-packet (the codec
// behind multicast-dns); Node's `dns.promises.Resolver` with `setServers(["127.0.0.1:<port>"])`
// queries it like any DNS server.
//
// What it answers, as an authoritative server would:
//   - the records of the asked type at the name (TXT values longer than 255 bytes are split into
//     255-byte character-strings, as DKIM keys are published);
//   - at a name holding a CNAME, for any other type: the CNAME, followed by the target's records of
//     the asked type when the target is known here (a recursive resolver adds those the same way);
//   - a name that exists with nothing of that type: NOERROR with no answer (NODATA);
//   - a name it does not know: NXDOMAIN.
// `failNext(count, rcode)` makes the next queries fail (SERVFAIL, REFUSED) to reproduce a broken
// resolver. Names are case-insensitive; a trailing dot is ignored.
import { createSocket, type RemoteInfo, type Socket } from "node:dgram";
import type { AddressInfo } from "node:net";
import dnsPacket from "dns-packet";

export interface DnsRecords {
  /** Each item is one TXT record (its character-strings joined). */
  TXT?: string[];
  /** The canonical name this name is an alias of. */
  CNAME?: string;
}

export interface DnsServer {
  host: string;
  port: number;
  /** `host:port`, as DNS_SERVERS and `Resolver#setServers` take it. */
  address: string;
  /** Replaces the records at `name` (undefined removes the name). */
  set(name: string, records: DnsRecords | undefined): void;
  /** Removes every name. */
  clear(): void;
  /** The next `count` queries are answered with this response code instead. */
  failNext(count: number, rcode: "SERVFAIL" | "REFUSED"): void;
  /** Every question asked, in order: lower-case name, type. */
  queries: Array<{ name: string; type: string }>;
  close(): Promise<void>;
}

const RCODE = { NOERROR: 0, SERVFAIL: 2, NXDOMAIN: 3, REFUSED: 5 } as const;
const TTL_SECONDS = 60;

const canonical = (name: string) => name.toLowerCase().replace(/\.$/, "");

/** A TXT value as DNS carries it: character-strings of at most 255 bytes each (RFC 1035 3.3.14). */
function characterStrings(value: string): Buffer[] {
  const bytes = Buffer.from(value, "utf8");
  const parts: Buffer[] = [];
  for (let offset = 0; offset < bytes.length; offset += 255) parts.push(bytes.subarray(offset, offset + 255));
  return parts.length > 0 ? parts : [Buffer.alloc(0)];
}

export async function startDnsServer(options: { host?: string; port?: number } = {}): Promise<DnsServer> {
  const zone = new Map<string, DnsRecords>();
  const failures: Array<keyof typeof RCODE> = [];
  const queries: DnsServer["queries"] = [];
  const host = options.host ?? "127.0.0.1";
  const socket: Socket = createSocket(host.includes(":") ? "udp6" : "udp4");

  function answersFor(name: string, type: string): { rcode: number; answers: dnsPacket.Answer[] } {
    const records = zone.get(name);
    if (!records) return { rcode: RCODE.NXDOMAIN, answers: [] };
    if (records.CNAME !== undefined && type !== "CNAME") {
      const target = canonical(records.CNAME);
      const alias: dnsPacket.Answer = { type: "CNAME", name, ttl: TTL_SECONDS, class: "IN", data: target };
      // One level is all these tests need; a loop of aliases stops here rather than recursing forever.
      const followed = zone.get(target)?.CNAME === undefined ? answersFor(target, type).answers : [];
      return { rcode: RCODE.NOERROR, answers: [alias, ...followed] };
    }
    if (type === "CNAME" && records.CNAME !== undefined) {
      return { rcode: RCODE.NOERROR, answers: [{ type: "CNAME", name, ttl: TTL_SECONDS, class: "IN", data: canonical(records.CNAME) }] };
    }
    if (type === "TXT" && records.TXT) {
      return { rcode: RCODE.NOERROR, answers: records.TXT.map((value) => ({ type: "TXT", name, ttl: TTL_SECONDS, class: "IN", data: characterStrings(value) })) };
    }
    return { rcode: RCODE.NOERROR, answers: [] };
  }

  socket.on("message", (message: Buffer, remote: RemoteInfo) => {
    let query: dnsPacket.Packet;
    try {
      query = dnsPacket.decode(message);
    } catch {
      return; // not DNS: a real server drops it too
    }
    const question = query.questions?.[0];
    if (!question) return;
    const name = canonical(question.name);
    queries.push({ name, type: question.type });
    const failure = failures.shift();
    const { rcode, answers } = failure ? { rcode: RCODE[failure], answers: [] } : answersFor(name, question.type);
    const recursionDesired = (query.flags ?? 0) & dnsPacket.RECURSION_DESIRED;
    const response = dnsPacket.encode({
      type: "response",
      id: query.id ?? 0,
      // The response code travels in the low four bits of the flags.
      flags: dnsPacket.AUTHORITATIVE_ANSWER | recursionDesired | rcode,
      questions: [question],
      answers,
    });
    socket.send(response, remote.port, remote.address);
  });

  await new Promise<void>((resolve, reject) => {
    socket.once("error", reject);
    socket.bind(options.port ?? 0, host, () => {
      socket.off("error", reject);
      resolve();
    });
  });
  const { port } = socket.address() as AddressInfo;

  return {
    host,
    port,
    address: host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`,
    set(name, records) {
      if (records === undefined) zone.delete(canonical(name));
      else zone.set(canonical(name), records);
    },
    clear() {
      zone.clear();
    },
    failNext(count, rcode) {
      for (let i = 0; i < count; i++) failures.push(rcode);
    },
    queries,
    close() {
      return new Promise<void>((resolve) => socket.close(() => resolve()));
    },
  };
}
