// One address field (to, cc, bcc, from, replyTo item) → exactly one mailbox, or the reason it is
// refused. The accepted language is a strict subset of RFC 5322 `mailbox` with RFC 6532 UTF-8:
//
//   mailbox      = addr-spec / [display-name] "<" addr-spec ">"
//   display-name = words (atoms or "quoted strings") separated by spaces
//   addr-spec    = dot-atom "@" domain        (no quoted local part, no comments, no spaces)
//   domain       = host name of two or more LDH labels, or an IDN in canonical form
//
// Why a grammar of our own: nodemailer's addressparser repairs anything into *some* address
// ("a b@x" becomes b@x named "a"), which is how a message reached a recipient nobody wrote. The
// npm parsers were weighed first: email-addresses (RFC 5322, strict on every such case) has had no
// release since 2021 and would need filters on its AST for what we refuse anyway (comments, CFWS
// inside the addr-spec, IP literals, "-x.test" labels), and it returns a quoted local part
// unquoted ("\"a b\"@x" → "a b@x", which cannot go into RCPT TO); smtp-address-parser only parses
// the RFC 5321 addr-spec (no display names) and depends on nearley, unmaintained since 2020. The
// subset below is small enough to read in one sitting, and every refusal says what to write.
//
// The result is what is sent: sendOnce hands nodemailer `{ name, address }`, never the string,
// and `address` is already in the form nodemailer emits (domain lower-cased; A-label/punycode
// when the local part is ASCII, U-label when it is not, since such an address needs SMTPUTF8
// anyway), so RCPT TO equals `address` byte for byte (test/addresses.test.ts checks that).
import { domainToASCII, domainToUnicode } from "node:url";

/** A validated mailbox, exactly as it will be sent. */
export interface Mailbox {
  /** Display name ("" when none): the header shows it quoted or RFC 2047-encoded as needed. */
  name: string;
  /** The addr-spec, used as is for MAIL FROM / RCPT TO and in the header. */
  address: string;
}

export type MailboxParse = { ok: true; mailbox: Mailbox } | { ok: false; reason: string };

// RFC 5322 atext (ASCII part); RFC 6532 adds every non-ASCII character to it.
const asciiAtext = /^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]$/;
// Non-ASCII characters allowed in a local part: letters, marks and digits. RFC 6532 allows any
// UTF-8 there; spaces, symbols, format and bidi characters in an addr-spec only serve spoofing.
const unicodeLocalChar = /^[\p{L}\p{M}\p{N}]$/u;
// Refused anywhere, quoted or not: line and paragraph separators, bidi embedding/override/isolate
// controls, BOM, unpaired surrogates and noncharacters (C0 controls and DEL are refused before
// this, as header injection).
const refusedAnywhere = /[\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff\ufffe\uffff]|\p{Cs}/u;
const ldhLabel = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

type Token =
  | { kind: "atom"; text: string }
  | { kind: "quoted"; value: string }
  | { kind: "space" }
  | { kind: "special"; char: string };

class Refusal extends Error {}

function refuse(reason: string): never {
  throw new Refusal(reason);
}

function tokenize(input: string): Token[] {
  const tokens: Token[] = [];
  let index = 0;
  while (index < input.length) {
    const char = input[index] as string;
    if (char === " ") {
      while (input[index] === " ") index += 1;
      tokens.push({ kind: "space" });
    } else if (char === '"') {
      let value = "";
      index += 1;
      for (;;) {
        const next = input[index];
        if (next === undefined) refuse("a quoted string is not closed");
        index += 1;
        if (next === '"') break;
        if (next === "\\") {
          const escaped = input[index];
          if (escaped === undefined) refuse("a quoted string is not closed");
          value += escaped;
          index += 1;
        } else {
          value += next;
        }
      }
      tokens.push({ kind: "quoted", value });
    } else if (asciiAtext.test(char) || char.charCodeAt(0) >= 0x80) {
      let text = "";
      while (index < input.length && (asciiAtext.test(input[index] as string) || input.charCodeAt(index) >= 0x80)) {
        text += input[index];
        index += 1;
      }
      tokens.push({ kind: "atom", text });
    } else {
      tokens.push({ kind: "special", char });
      index += 1;
    }
  }
  return tokens;
}

/** Why a special character outside quotes makes the string something other than one mailbox. */
function specialReason(char: string): string {
  switch (char) {
    case ",":
      return "holds more than one address (a comma outside quotes); put several recipients in an array, and quote a display name that contains a comma";
    case ":":
    case ";":
      return "group syntax (name: a@x, b@y;) is refused; list the recipients in an array";
    case "(":
    case ")":
      return "comments in parentheses are refused; write Name <a@example.com> instead of a@example.com (Name)";
    case "[":
    case "]":
      return "an IP-literal domain ([192.0.2.1]) is refused; use a domain name";
    case "<":
    case ">":
      return "angle brackets must enclose exactly one address, once, at the end: Name <a@example.com>";
    case "\\":
      return "a backslash is only allowed inside a quoted display name";
    default:
      return `"${char}" is not allowed there; quote the display name if it contains . @ , : ; < > ( ) [ ] \\ or "`;
  }
}

/** A domain as sent: lower-case A-labels (punycode), and the U-label form for SMTPUTF8 addresses. */
export function canonicalDomain(domain: string): { ascii: string; unicode: string } | { reason: string } {
  if (domain === "") return { reason: "has no domain after the @" };
  if (domain.endsWith(".")) return { reason: "a domain ending in a dot is refused" };
  const ascii = domainToASCII(domain);
  if (ascii === "") return { reason: `${JSON.stringify(domain)} is not a valid domain name (IDNA)` };
  const labels = ascii.split(".");
  if (labels.length < 2) return { reason: `${JSON.stringify(domain)} has a single label; a domain needs at least two (a@localhost is refused)` };
  const badLabel = labels.find((label) => !ldhLabel.test(label));
  if (badLabel !== undefined) return { reason: `${JSON.stringify(domain)} has an invalid label ${JSON.stringify(badLabel)}: letters, digits and inner hyphens, 1 to 63 characters` };
  if (ascii.length > 253) return { reason: "the domain is longer than 253 characters" };
  if (/^[0-9]+$/.test(labels.at(-1) ?? "")) return { reason: `${JSON.stringify(domain)} is an IP address, not a domain name; IP addresses are refused` };
  const unicode = domainToUnicode(ascii);
  const written = domain.toLowerCase();
  // IDNA mapping rewrites some input (full-width letters, zero-width characters); accept only a
  // domain that is already what it maps to, so the domain sent is the domain written.
  if (written !== ascii && written !== unicode) {
    const forms = unicode === ascii ? JSON.stringify(ascii) : `${JSON.stringify(unicode)} or ${JSON.stringify(ascii)}`;
    return { reason: `${JSON.stringify(domain)} is not in canonical form; write ${forms}` };
  }
  return { ascii, unicode };
}

function addrSpec(tokens: Token[]): string {
  const at = tokens.findIndex((t) => t.kind === "special" && t.char === "@");
  if (at === -1) refuse("has no @");
  const quoted = tokens.find((t) => t.kind === "quoted");
  if (quoted !== undefined) refuse('a quoted local part ("a b"@example.com) is refused; few mail systems deliver to one, and "ab"@x is the same address as ab@x');
  if (tokens.some((t) => t.kind === "space")) refuse("an address cannot contain spaces; a display name goes before <address>");
  const dotAtom = (part: Token[], what: string): string => {
    let text = "";
    part.forEach((token, index) => {
      const expectAtom = index % 2 === 0;
      if (expectAtom && token.kind === "atom") text += token.text;
      else if (!expectAtom && token.kind === "special" && token.char === ".") text += ".";
      else if (token.kind === "special" && token.char !== ".") refuse(specialReason(token.char));
      else refuse(`the ${what} has an empty part between dots, or starts or ends with a dot`);
    });
    if (part.length % 2 === 0) refuse(part.length === 0 ? `has no ${what}` : `the ${what} ends with a dot`);
    return text;
  };
  const local = dotAtom(tokens.slice(0, at), "local part");
  const rest = tokens.slice(at + 1);
  const domainTokens = rest.filter((t) => !(t.kind === "special" && t.char === "."));
  const secondAt = rest.find((t) => t.kind === "special" && t.char === "@");
  if (secondAt !== undefined) refuse("has more than one @");
  if (rest.at(-1)?.kind === "special" && (rest.at(-1) as { char: string }).char === ".") refuse("a domain ending in a dot is refused");
  if (domainTokens.length === 0) refuse("has no domain after the @");
  const domain = dotAtom(rest, "domain");

  for (const char of local) {
    if (char.charCodeAt(0) >= 0x80 && !unicodeLocalChar.test(char)) refuse(`the local part holds ${JSON.stringify(char)}; non-ASCII local parts may hold letters, marks and digits only`);
  }
  if (local.normalize("NFC") !== local) refuse("the local part is not in Unicode normalisation form C (NFC)");
  if (Buffer.byteLength(local) > 64) refuse(`the local part is ${Buffer.byteLength(local)} bytes; at most 64 (RFC 5321)`);
  const canonical = canonicalDomain(domain);
  if ("reason" in canonical) refuse(canonical.reason);
  const ascii = /^[\x21-\x7e]*$/.test(local);
  // nodemailer keeps the domain of an address with a non-ASCII local part in U-labels (it needs
  // SMTPUTF8 either way) and punycodes the others: return the form it sends.
  const address = `${local}@${ascii ? canonical.ascii : canonical.unicode}`;
  if (Buffer.byteLength(`${local}@${canonical.ascii}`) > 254) refuse("the address is longer than 254 bytes");
  return address;
}

function displayName(tokens: Token[]): string {
  const words: string[] = [];
  let joinToPrevious = false;
  for (const token of tokens) {
    if (token.kind === "space") {
      joinToPrevious = false;
      continue;
    }
    if (token.kind === "special") refuse(specialReason(token.char));
    const word = token.kind === "atom" ? token.text : token.value;
    if (joinToPrevious && words.length > 0) words[words.length - 1] += word;
    else words.push(word);
    joinToPrevious = true;
  }
  const name = words.join(" ").trim();
  if (/=\?[^?]*\?[bq]\?[^?]*\?=/i.test(name)) {
    refuse("the display name holds an RFC 2047 encoded word (=?…?=); write it as plain Unicode, it is encoded for you");
  }
  return name;
}

/**
 * Parses one address field. Surrounding spaces (U+0020) are trimmed; anything else that is not
 * exactly one mailbox of the grammar above is refused with a reason a producer can act on.
 */
export function parseMailbox(text: string): MailboxParse {
  try {
    if (refusedAnywhere.test(text)) refuse("holds an invisible formatting character (bidi control, line separator, BOM or similar)");
    const input = text.replace(/^ +| +$/g, "");
    if (input === "") refuse("is empty");
    const tokens = tokenize(input);
    const isSpecial = (t: Token, char: string) => t.kind === "special" && t.char === char;
    // Literal, comment, group and list shapes first: whatever else is wrong, these say most.
    for (const char of ["[", "]", "(", ")", ":", ";", ","]) {
      if (tokens.some((t) => isSpecial(t, char))) refuse(specialReason(char));
    }
    const opens = tokens.filter((t) => isSpecial(t, "<")).length;
    const closes = tokens.filter((t) => isSpecial(t, ">")).length;
    if (opens === 0 && closes === 0) return { ok: true, mailbox: { name: "", address: addrSpec(tokens) } };
    const open = tokens.findIndex((t) => isSpecial(t, "<"));
    if (opens !== 1 || closes !== 1 || !isSpecial(tokens.at(-1) as Token, ">") || open > tokens.length - 2) refuse(specialReason("<"));
    return { ok: true, mailbox: { name: displayName(tokens.slice(0, open)), address: addrSpec(tokens.slice(open + 1, -1)) } };
  } catch (error) {
    if (error instanceof Refusal) return { ok: false, reason: error.message };
    throw error;
  }
}

/** True when sending to or from this mailbox needs the server's SMTPUTF8 extension (RFC 6531). */
export function needsSmtpUtf8(mailbox: Mailbox): boolean {
  return !/^[\x21-\x7e]*$/.test(mailbox.address);
}

/** The domain of a validated address in A-label form, for comparisons (sandbox, suppression). */
export function asciiDomainOf(address: string): string {
  return domainToASCII(address.slice(address.lastIndexOf("@") + 1));
}
