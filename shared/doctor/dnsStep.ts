// Step 9 (`--dns`): what receiving servers will check about the From domain, which decides whether
// our mail lands in the inbox: SPF includes the provider's servers (spf.protection.outlook.com for
// Microsoft 365, _spf.google.com for Google Workspace), the provider's DKIM selectors are published
// (selector1/selector2 for Microsoft, google for Google), and a DMARC policy exists. DNS_SERVERS
// points the lookups at another resolver (tests use one on loopback).
import { Resolver } from "node:dns/promises";
import { domainToASCII } from "node:url";
import type { AuthMethod } from "../config.js";
import { fail, pass, warn, type Check } from "./check.js";

interface Provider {
  name: string;
  spfInclude: string;
  dkimSelectors: string[];
}

const MICROSOFT: Provider = { name: "Microsoft 365", spfInclude: "spf.protection.outlook.com", dkimSelectors: ["selector1", "selector2"] };
const GOOGLE: Provider = { name: "Google Workspace", spfInclude: "_spf.google.com", dkimSelectors: ["google"] };

/** RFC 7208 4.6.4: at most 10 mechanisms that cause DNS lookups; more is a permerror at receivers. */
const SPF_LOOKUP_LIMIT = 10;

export function providerFor(method: AuthMethod): Provider {
  return method === "google-service-account" ? GOOGLE : MICROSOFT;
}

type Lookup = { records: string[] } | { none: true } | { error: string };

function dnsCode(error: unknown): string {
  return (error as NodeJS.ErrnoException).code ?? (error as Error).message;
}

const NOT_THERE = new Set(["ENODATA", "ENOTFOUND"]);

async function txt(resolver: Resolver, name: string): Promise<Lookup> {
  try {
    // A TXT record arrives as character-strings of at most 255 bytes; the record is their concatenation.
    return { records: (await resolver.resolveTxt(name)).map((parts) => parts.join("")) };
  } catch (error) {
    return NOT_THERE.has(dnsCode(error)) ? { none: true } : { error: dnsCode(error) };
  }
}

const isSpf = (record: string) => /^v=spf1(\s|$)/i.test(record.trim());

/** Does the SPF policy at `domain` reach `include`, directly or through includes and redirects? */
async function spfReaches(resolver: Resolver, domain: string, include: string, budget: { lookups: number }, path: string[]): Promise<{ found: string[] | undefined; error?: string }> {
  const lookup = await txt(resolver, domain);
  if ("error" in lookup) return { found: undefined, error: `${domain}: ${lookup.error}` };
  const record = "records" in lookup ? lookup.records.find(isSpf) : undefined;
  if (!record) return { found: undefined };
  for (const term of record.trim().split(/\s+/).slice(1)) {
    const mechanism = term.replace(/^[+\-~?]/, "").toLowerCase();
    if (/^(a|mx|ptr|exists)(:|\/|$)/.test(mechanism)) budget.lookups += 1;
    const target = mechanism.match(/^(?:include:|redirect=)(.+)$/)?.[1];
    if (!target) continue;
    budget.lookups += 1;
    if (target === include.toLowerCase()) return { found: [...path, term] };
    if (budget.lookups > SPF_LOOKUP_LIMIT) return { found: undefined };
    const nested = await spfReaches(resolver, target, include, budget, [...path, term]);
    if (nested.found || nested.error) return nested;
  }
  return { found: undefined };
}

async function spfCheck(resolver: Resolver, domain: string, provider: Provider): Promise<Check> {
  const lookup = await txt(resolver, domain);
  const suggested = `v=spf1 include:${provider.spfInclude} -all`;
  if ("error" in lookup) return warn("dns-spf", "DNS_SPF_LOOKUP_FAILED", `TXT ${domain}: the DNS lookup failed (${lookup.error})`, "Check DNS_SERVERS (or this machine's resolver) and try again.");
  const spf = "records" in lookup ? lookup.records.filter(isSpf) : [];
  if (spf.length === 0) {
    return fail("dns-spf", "DNS_SPF_MISSING", `${domain} publishes no SPF record`, `Publish a TXT record at ${domain}: "${suggested}" (keep any other servers that send for ${domain} in it).`);
  }
  if (spf.length > 1) {
    return fail("dns-spf", "DNS_SPF_MULTIPLE", `${domain} publishes ${spf.length} SPF records, which receivers treat as an error (permerror)`, `Merge them into one TXT record that includes ${provider.spfInclude}, e.g. "${suggested}".`);
  }
  const record = spf[0]!;
  const budget = { lookups: 0 };
  const reached = await spfReaches(resolver, domain, provider.spfInclude, budget, []);
  if (reached.error) return warn("dns-spf", "DNS_SPF_LOOKUP_FAILED", `SPF of ${domain}: "${record}"; a nested lookup failed (${reached.error})`, "Check DNS_SERVERS (or this machine's resolver) and try again.");
  if (!reached.found) {
    const withInclude = /\s[+\-~?]?all\s*$/i.test(record) ? record.replace(/\s([+\-~?]?all)\s*$/i, ` include:${provider.spfInclude} $1`) : `${record} include:${provider.spfInclude}`;
    return fail("dns-spf", "DNS_SPF_PROVIDER_MISSING", `SPF of ${domain} does not include ${provider.spfInclude} (${provider.name}): "${record}"`, `Add include:${provider.spfInclude} to the TXT record at ${domain}: "${withInclude}"`);
  }
  if (budget.lookups > SPF_LOOKUP_LIMIT) {
    return warn("dns-spf", "DNS_SPF_TOO_MANY_LOOKUPS", `SPF of ${domain} needs more than ${SPF_LOOKUP_LIMIT} DNS lookups (receivers answer permerror)`, "Flatten the SPF record: fewer include:, a:, mx: terms.");
  }
  const via = reached.found.length > 1 ? ` (via ${reached.found.slice(0, -1).join(" → ")})` : "";
  return pass("dns-spf", `SPF of ${domain} includes ${provider.spfInclude}${via}: "${record}"`);
}

type SelectorState = { selector: string; state: "published" | "cname-without-key" | "revoked" | "missing"; detail: string } | { selector: string; state: "error"; detail: string };

async function selectorState(resolver: Resolver, domain: string, selector: string): Promise<SelectorState> {
  const name = `${selector}._domainkey.${domain}`;
  const lookup = await txt(resolver, name);
  if ("error" in lookup) return { selector, state: "error", detail: `${name}: ${lookup.error}` };
  if ("records" in lookup) {
    const key = lookup.records.find((r) => /(^|;)\s*p=/i.test(r));
    if (key !== undefined) {
      return /(^|;)\s*p=\s*(;|$)/i.test(key) ? { selector, state: "revoked", detail: `${name}: p= is empty (key revoked)` } : { selector, state: "published", detail: `${name}: key published` };
    }
  }
  // No key: Microsoft's selectors are CNAMEs to keys it hosts, which exist once signing is on.
  try {
    const [target] = await resolver.resolveCname(name);
    if (target) return { selector, state: "cname-without-key", detail: `${name}: CNAME ${target}, which has no key (yet)` };
  } catch {
    // no CNAME either
  }
  return { selector, state: "missing", detail: `${name}: not published` };
}

async function dkimCheck(resolver: Resolver, domain: string, provider: Provider): Promise<Check> {
  const states = await Promise.all(provider.dkimSelectors.map((s) => selectorState(resolver, domain, s)));
  const message = states.map((s) => s.detail).join("; ");
  const errors = states.filter((s) => s.state === "error");
  if (errors.length > 0) return warn("dns-dkim", "DNS_DKIM_LOOKUP_FAILED", message, "Check DNS_SERVERS (or this machine's resolver) and try again.");
  const published = states.filter((s) => s.state === "published");
  const fix = provider === GOOGLE
    ? `Google Admin console > Apps > Google Workspace > Gmail > Authenticate email > ${domain} > Generate new record (selector "google"), publish it as TXT google._domainkey.${domain}, then "Start authentication".`
    : [
        `Publish both selectors as CNAME records and turn DKIM signing on for ${domain}. The targets, in Exchange Online PowerShell:`,
        `  Get-DkimSigningConfig -Identity ${domain} | Format-List Selector1CNAME,Selector2CNAME   (New-DkimSigningConfig -DomainName ${domain} -Enabled $false creates them)`,
        `  selector1._domainkey.${domain} CNAME <Selector1CNAME>`,
        `  selector2._domainkey.${domain} CNAME <Selector2CNAME>`,
        `  Set-DkimSigningConfig -Identity ${domain} -Enabled $true   (or Microsoft Defender portal > Email & collaboration > Policies & rules > Threat policies > Email authentication settings > DKIM)`,
      ].join("\n");
  if (published.length === states.length) return pass("dns-dkim", `DKIM for ${domain}: ${message}`);
  if (published.length > 0) return warn("dns-dkim", "DNS_DKIM_INCOMPLETE", `DKIM for ${domain}: ${message}`, fix);
  return fail("dns-dkim", "DNS_DKIM_MISSING", `no ${provider.name} DKIM key for ${domain}: ${message}`, fix);
}

async function dmarcCheck(resolver: Resolver, domain: string): Promise<Check> {
  const name = `_dmarc.${domain}`;
  const lookup = await txt(resolver, name);
  const suggested = `v=DMARC1; p=none; rua=mailto:dmarc-reports@${domain}`;
  if ("error" in lookup) return warn("dns-dmarc", "DNS_DMARC_LOOKUP_FAILED", `TXT ${name}: the DNS lookup failed (${lookup.error})`, "Check DNS_SERVERS (or this machine's resolver) and try again.");
  const dmarc = "records" in lookup ? lookup.records.filter((r) => /^v=DMARC1\s*(;|$)/i.test(r.trim())) : [];
  if (dmarc.length === 0) {
    return warn("dns-dmarc", "DNS_DMARC_MISSING", `${name} publishes no DMARC policy (Gmail and Yahoo require one from bulk senders)`, `Publish a TXT record at ${name}: "${suggested}"; move to p=quarantine or p=reject once reports show SPF and DKIM passing.`);
  }
  if (dmarc.length > 1) {
    return fail("dns-dmarc", "DNS_DMARC_MULTIPLE", `${name} publishes ${dmarc.length} DMARC records, so receivers ignore DMARC for ${domain}`, `Keep exactly one TXT record at ${name}, e.g. "${suggested}".`);
  }
  const policy = dmarc[0]!.match(/(?:^|;)\s*p=([a-z]+)/i)?.[1] ?? "?";
  return pass("dns-dmarc", `DMARC for ${domain}: p=${policy} ("${dmarc[0]}")`);
}

export async function dnsSteps(fromAddress: string, method: AuthMethod, servers: string[]): Promise<Check[]> {
  const domain = domainToASCII(fromAddress.slice(fromAddress.lastIndexOf("@") + 1).toLowerCase()) || fromAddress.slice(fromAddress.lastIndexOf("@") + 1);
  // Bounded: three tries of two seconds per name, whatever the resolver.
  const resolver = new Resolver({ timeout: 2_000, tries: 3 });
  if (servers.length > 0) resolver.setServers(servers);
  const provider = providerFor(method);
  return Promise.all([spfCheck(resolver, domain, provider), dkimCheck(resolver, domain, provider), dmarcCheck(resolver, domain)]);
}
