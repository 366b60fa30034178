// A browser, as far as sign-in pages need one: it follows redirects itself (fetch with redirect:
// "manual"), keeps cookies (host and path, as RFC 6265 scopes them; oidc-provider's interaction
// cookies are path-scoped), reads the HTML forms of a page and submits them. No script runs: the
// local OAuth server's sign-in and consent pages and oidc-provider's device pages are plain forms.
// Every URL it requested is in `visited`, in order.
import assert from "node:assert/strict";

export interface Page {
  url: string;
  status: number;
  html: string;
}

export interface HtmlForm {
  id?: string;
  /** Absolute. */
  action: string;
  method: "GET" | "POST";
  /** Named inputs with their values (hidden fields included). */
  fields: Record<string, string>;
}

interface Cookie {
  name: string;
  value: string;
  host: string;
  path: string;
}

const decodeEntities = (text: string) =>
  text.replace(/&(#x[0-9a-f]+|#\d+|amp|lt|gt|quot|apos);/gi, (_, entity: string) => {
    const named: Record<string, string> = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'" };
    if (entity.startsWith("#x") || entity.startsWith("#X")) return String.fromCodePoint(parseInt(entity.slice(2), 16));
    if (entity.startsWith("#")) return String.fromCodePoint(Number(entity.slice(1)));
    return named[entity.toLowerCase()] ?? "";
  });

function attributesOf(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const match of text.matchAll(/([\w:.-]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+)))?/g)) {
    out[match[1]!.toLowerCase()] = decodeEntities(match[2] ?? match[3] ?? match[4] ?? "");
  }
  return out;
}

/** The forms of a page, with their named inputs. */
export function formsOf(page: Page): HtmlForm[] {
  const forms: HtmlForm[] = [];
  for (const match of page.html.matchAll(/<form\b([^>]*)>([\s\S]*?)<\/form>/gi)) {
    const attributes = attributesOf(match[1]!);
    const fields: Record<string, string> = {};
    for (const input of match[2]!.matchAll(/<input\b([^>]*?)\/?>/gi)) {
      const a = attributesOf(input[1]!);
      if (a["name"]) fields[a["name"]] = a["value"] ?? "";
    }
    forms.push({
      ...(attributes["id"] ? { id: attributes["id"] } : {}),
      action: new URL(attributes["action"] || page.url, page.url).href,
      method: (attributes["method"] ?? "get").toUpperCase() === "POST" ? "POST" : "GET",
      fields,
    });
  }
  return forms;
}

export class Browser {
  readonly visited: string[] = [];
  private cookies: Cookie[] = [];

  constructor(private readonly options: { maxRedirects?: number; timeoutMs?: number } = {}) {}

  /** GET `url` and follow redirects to the final page. */
  open(url: string): Promise<Page> {
    return this.request(url, "GET");
  }

  /** Fills `values` into the form (by id, or the page's only form) and submits it, following redirects. */
  submit(page: Page, values: Record<string, string> = {}, formId?: string): Promise<Page> {
    const forms = formsOf(page);
    const form = formId === undefined ? forms[0] : forms.find((f) => f.id === formId);
    assert.ok(form && (formId !== undefined || forms.length === 1), `no ${formId === undefined ? "single form" : `form #${formId}`} on ${page.url}:\n${page.html.slice(0, 2000)}`);
    const fields = new URLSearchParams({ ...form.fields, ...values });
    if (form.method === "GET") {
      const target = new URL(form.action);
      for (const [k, v] of fields) target.searchParams.set(k, v);
      return this.request(target.href, "GET");
    }
    return this.request(form.action, "POST", fields);
  }

  private async request(url: string, method: "GET" | "POST", body?: URLSearchParams): Promise<Page> {
    let current = new URL(url);
    let currentMethod = method;
    let currentBody = body;
    for (let hop = 0; hop <= (this.options.maxRedirects ?? 20); hop++) {
      this.visited.push(current.href);
      const response = await fetch(current, {
        method: currentMethod,
        redirect: "manual",
        headers: { ...(this.cookieHeader(current) ? { cookie: this.cookieHeader(current)! } : {}), ...(currentBody ? { "content-type": "application/x-www-form-urlencoded" } : {}), accept: "text/html" },
        ...(currentBody ? { body: currentBody } : {}),
        signal: AbortSignal.timeout(this.options.timeoutMs ?? 10_000),
      });
      this.keepCookies(current, response.headers.getSetCookie());
      const location = response.headers.get("location");
      if (response.status >= 300 && response.status < 400 && location) {
        await response.body?.cancel();
        current = new URL(location, current);
        // 303 (and 301/302 after a POST, as browsers do) continue as GET.
        if (response.status !== 307 && response.status !== 308) {
          currentMethod = "GET";
          currentBody = undefined;
        }
        continue;
      }
      return { url: current.href, status: response.status, html: await response.text() };
    }
    throw new Error(`more than ${this.options.maxRedirects ?? 20} redirects from ${url}`);
  }

  private cookieHeader(url: URL): string | undefined {
    const matching = this.cookies.filter((c) => c.host === url.host && (url.pathname === c.path || url.pathname.startsWith(c.path.endsWith("/") ? c.path : `${c.path}/`)));
    return matching.length === 0 ? undefined : matching.map((c) => `${c.name}=${c.value}`).join("; ");
  }

  private keepCookies(url: URL, setCookies: string[]): void {
    for (const line of setCookies) {
      const [pair = "", ...attributes] = line.split(";").map((p) => p.trim());
      const eq = pair.indexOf("=");
      const name = pair.slice(0, eq);
      const value = pair.slice(eq + 1);
      const attribute = (key: string) => attributes.find((a) => a.toLowerCase().startsWith(`${key}=`))?.slice(key.length + 1);
      const path = attribute("path") ?? url.pathname.replace(/\/[^/]*$/, "") ?? "/";
      const maxAge = attribute("max-age");
      const expires = attribute("expires");
      const expired = (maxAge !== undefined && Number(maxAge) <= 0) || (expires !== undefined && Date.parse(expires) <= Date.now());
      this.cookies = this.cookies.filter((c) => !(c.name === name && c.host === url.host && c.path === path));
      if (!expired) this.cookies.push({ name, value, host: url.host, path: path || "/" });
    }
  }
}
