// A claim-check blob is JSON whose bulk is base64 attachment content (a 20 MB attachment is a
// 27 MB JSON string). JSON.parse of the blob would hold the blob, its text, and each parsed content
// string at once (three copies of 27 MB) before the attachment is even decoded. Here the blob stays
// one Buffer: string values over LARGE_STRING_BYTES are cut out of the text before JSON.parse and
// left in the Buffer; attachment content is then decoded from those bytes straight into the
// attachment's Buffer, and any other large value is made a string only when it is read.
//
// The cut does not change what the blob means: the scan below finds string tokens exactly as a
// JSON lexer does (a quote outside a string starts one, a backslash escapes the next character, a
// quote ends it) and cuts only strings that are valid JSON strings and not object keys, so the text
// that JSON.parse sees is valid exactly when the blob is.
import { randomUUID } from "node:crypto";

const LARGE_STRING_BYTES = 64 * 1024;
const QUOTE = 0x22;
const BACKSLASH = 0x5c;

// Base64 value of each ASCII code, 255 for codes outside the alphabet.
const base64Values = new Uint8Array(128).fill(255);
[..."ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"].forEach((char, value) => (base64Values[char.charCodeAt(0)] = value));

const isHex = (byte: number | undefined): boolean => byte !== undefined && ((byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x46) || (byte >= 0x61 && byte <= 0x66));

/** A string value of a claim-check blob, still in the blob's bytes (between its quotes). */
export class LargeJsonString {
  constructor(
    private readonly source: Buffer,
    private readonly start: number,
    private readonly end: number,
  ) {}

  /** The value as a string: for a large value that is not attachment content (a long body). */
  toString(): string {
    return JSON.parse(this.source.subarray(this.start - 1, this.end + 1).toString("utf8")) as string;
  }

  /**
   * The value decoded as base64, straight from the JSON bytes (escapes such as \r\n and \/ read as
   * JSON reads them), or undefined when it is not padded base64. Same rules as
   * base64DecodedLength in validate.ts: ASCII whitespace anywhere, = only at the end.
   */
  decodeBase64(): Buffer | undefined {
    const { source, start, end } = this;
    const out = Buffer.allocUnsafe(Math.floor(((end - start) * 3) / 4) + 3);
    let written = 0;
    let quad = 0;
    let data = 0;
    let padding = 0;
    for (let index = start; index < end; index++) {
      let code = source[index] as number;
      if (code === BACKSLASH) {
        const escaped = source[index + 1];
        index += 1;
        if (escaped === 0x6e || escaped === 0x72 || escaped === 0x74 || escaped === 0x66) code = 0x20; // \n \r \t \f: whitespace
        else if (escaped === 0x2f) code = 0x2f; // \/
        else if (escaped === 0x75) {
          code = Number.parseInt(source.subarray(index + 1, index + 5).toString("latin1"), 16);
          index += 4;
        } else return undefined; // \" \\ \b: not base64
      }
      if (code === 0x20 || (code >= 0x09 && code <= 0x0d)) continue;
      if (code === 0x3d) {
        padding += 1;
        continue;
      }
      const value = code < 128 ? (base64Values[code] as number) : 255;
      if (padding > 0 || value === 255) return undefined;
      quad = (quad << 6) | value;
      data += 1;
      if (data % 4 === 0) {
        out[written++] = (quad >> 16) & 0xff;
        out[written++] = (quad >> 8) & 0xff;
        out[written++] = quad & 0xff;
        quad = 0;
      }
    }
    const partial = data % 4;
    if (partial === 1 || padding !== (partial === 0 ? 0 : 4 - partial)) return undefined;
    if (partial === 2) out[written++] = (quad >> 4) & 0xff;
    if (partial === 3) {
      out[written++] = (quad >> 10) & 0xff;
      out[written++] = (quad >> 2) & 0xff;
    }
    const decoded = out.subarray(0, written);
    // Heavily wrapped or escaped text leaves much of the buffer unused: keep an exact copy then.
    return out.length - written > written / 8 ? Buffer.from(decoded) : decoded;
  }
}

interface Cut {
  /** First byte after the opening quote. */
  start: number;
  /** The closing quote. */
  end: number;
}

function largeStrings(body: Buffer): Cut[] {
  const cuts: Cut[] = [];
  let index = 0;
  while (index < body.length) {
    if (body[index] !== QUOTE) {
      index += 1;
      continue;
    }
    const start = index + 1;
    let valid = true;
    let at = start;
    for (; at < body.length; at++) {
      const byte = body[at] as number;
      if (byte === QUOTE) break;
      if (byte === BACKSLASH) {
        const escaped = body[at + 1];
        if (escaped === 0x75) {
          if (![2, 3, 4, 5].every((offset) => isHex(body[at + offset]))) valid = false;
          at += 5;
        } else {
          // " \ / b f n r t
          if (escaped === undefined || ![0x22, 0x5c, 0x2f, 0x62, 0x66, 0x6e, 0x72, 0x74].includes(escaped)) valid = false;
          at += 1;
        }
      } else if (byte < 0x20) {
        valid = false; // a raw control character: JSON.parse must see it and refuse
      }
    }
    if (at >= body.length) break; // unterminated: left for JSON.parse to refuse
    if (valid && at - start > LARGE_STRING_BYTES) {
      let next = at + 1;
      while (body[next] === 0x20 || body[next] === 0x09 || body[next] === 0x0a || body[next] === 0x0d) next += 1;
      if (body[next] !== 0x3a) cuts.push({ start, end: at }); // not a key (followed by ":")
    }
    index = at + 1;
  }
  return cuts;
}

/**
 * JSON.parse of a claim-check blob, except that a string over 64 KiB comes back as a
 * LargeJsonString: at `attachments[i].content` (for validateMessage to decode), and as a plain
 * string anywhere else. Throws what JSON.parse throws for text that is not JSON.
 */
export function parseClaimCheckJson(body: Buffer): unknown {
  const cuts = largeStrings(body);
  if (cuts.length === 0) return JSON.parse(body.toString("utf8"));
  // The marker holds a NUL and a fresh random id: no producer can write one that matches.
  const marker = `\u0000${randomUUID()}:`;
  const pieces: Buffer[] = [];
  let from = 0;
  cuts.forEach((cut, index) => {
    pieces.push(body.subarray(from, cut.start), Buffer.from(JSON.stringify(`${marker}${index}`).slice(1, -1)));
    from = cut.end;
  });
  pieces.push(body.subarray(from));
  const parsed: unknown = JSON.parse(Buffer.concat(pieces).toString("utf8"));

  const restore = (value: unknown, attachmentContent: boolean): unknown => {
    if (typeof value !== "string" || !value.startsWith(marker)) return value;
    const cut = cuts[Number(value.slice(marker.length))] as Cut;
    const large = new LargeJsonString(body, cut.start, cut.end);
    return attachmentContent ? large : large.toString();
  };
  // Iterative, so a deeply nested blob cannot exhaust the stack here either.
  const pending: Array<{ container: Record<string, unknown> | unknown[]; role: "root" | "attachments" | "attachment" | "other" }> = [];
  if (typeof parsed === "object" && parsed !== null) pending.push({ container: parsed as Record<string, unknown>, role: Array.isArray(parsed) ? "other" : "root" });
  else return restore(parsed, false);
  for (let item = pending.pop(); item !== undefined; item = pending.pop()) {
    const { container, role } = item;
    for (const key of Object.keys(container)) {
      const value = (container as Record<string, unknown>)[key];
      const childRole = role === "root" && key === "attachments" && Array.isArray(value) ? "attachments" : role === "attachments" && !Array.isArray(value) ? "attachment" : "other";
      if (typeof value === "object" && value !== null) pending.push({ container: value as Record<string, unknown>, role: childRole });
      else {
        const restored = restore(value, role === "attachment" && key === "content");
        // defineProperty: an own "__proto__" key stays data, as JSON.parse made it.
        if (restored !== value) Object.defineProperty(container, key, { value: restored, writable: true, enumerable: true, configurable: true });
      }
    }
  }
  return parsed;
}
