// Message templates: a message may name a `template` and give `data` instead of subject/text/html.
// A template is a folder `<name>/` in TEMPLATE_DIR or a blob prefix `<name>/` in TEMPLATE_CONTAINER
// with `subject.*`, `html.*` and optional `text.*` (Handlebars). Rendered at send time, before the
// message is validated, so the rendered subject meets every rule a written one does.
//
// Safety: values are HTML-escaped in html (Handlebars' default; only a template author's {{{ }}}
// opts out), and made one line in the subject (a CR or LF in data can never start a header).
// Strict mode makes a variable the template needs but `data` lacks an error (TEMPLATE_DATA_MISSING)
// instead of an empty string. Compiled templates are cached by file version (mtime and size) or
// blob ETag, so an updated template is picked up without a restart (within LISTING_FRESH_MS).
import { readdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import type { ContainerClient } from "@azure/storage-blob";
import Handlebars from "handlebars";
import { compile as compileHtmlToText } from "html-to-text";
import { MailerError } from "../errors.js";
import { statusOf } from "../storage/storageClients.js";
import { templateFields } from "./validate.js";

export type TemplatePart = "subject" | "html" | "text";

export interface RenderedTemplate {
  subject: string;
  html: string;
  text: string;
}

export interface TemplateRenderer {
  /** Where templates come from, for messages and the doctor: "TEMPLATE_DIR (/srv/templates)". */
  readonly where: string;
  render(name: string, data: Record<string, unknown>): Promise<RenderedTemplate>;
}

/** One part's source and its version (changes whenever the content may have). */
interface PartSource {
  file: string;
  version: string;
  read(): Promise<string>;
}

/** The parts of one template as the store has them now. */
type TemplateListing = Partial<Record<TemplatePart, PartSource>>;

const PARTS: TemplatePart[] = ["subject", "html", "text"];
/**
 * A template's files (folder) or blobs (container) are listed at most this often per template: one
 * listing serves a burst of messages, and an update is still picked up within a second.
 */
const LISTING_FRESH_MS = 1_000;
/** Options compiled once: converting with fresh options per message costs more than the rest of a render. */
const htmlToText = compileHtmlToText({ wordwrap: 78 });

function partOf(fileName: string): TemplatePart | undefined {
  const base = fileName.split(".")[0];
  return PARTS.find((part) => part === base && fileName.length > part.length + 1);
}

function notFound(name: string, where: string, detail: string): MailerError {
  return new MailerError("TEMPLATE_NOT_FOUND", `template ${JSON.stringify(name)} ${detail} in ${where}`, {
    kind: "permanent",
    hint: `Add ${name}/subject.hbs and ${name}/html.hbs (optional ${name}/text.hbs) to the templates, or fix the message's template name; then requeue the message.`,
  });
}

// A value in a header must stay one line: control characters (CR, LF and the rest) become spaces.
// eslint-disable-next-line no-control-regex
const headerBreaking = /[\u0000-\u001f\u007f]+/g;
function oneLineValues(value: unknown): unknown {
  if (typeof value === "string") return value.replace(headerBreaking, " ");
  if (Array.isArray(value)) return value.map(oneLineValues);
  if (typeof value === "object" && value !== null) return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, oneLineValues(v)]));
  return value;
}

/** Renders from a listing function (folder or container); compiled parts cached by version. */
function rendererOver(where: string, list: (name: string) => Promise<TemplateListing | undefined>): TemplateRenderer {
  const handlebars = Handlebars.create();
  const compiled = new Map<string, { version: string; template: Handlebars.TemplateDelegate }>();

  async function compiledPart(name: string, part: TemplatePart, source: PartSource): Promise<Handlebars.TemplateDelegate> {
    const key = `${name}/${part}`;
    const cached = compiled.get(key);
    if (cached?.version === source.version) return cached.template;
    const text = await source.read();
    // Only html is HTML: escaping the subject or the text part would show "&amp;" to the reader.
    // (Handlebars compiles on first use: a syntax error surfaces in apply() as TEMPLATE_INVALID.)
    const template = handlebars.compile(text, { strict: true, noEscape: part !== "html" });
    compiled.set(key, { version: source.version, template });
    return template;
  }

  function apply(name: string, part: TemplatePart, template: Handlebars.TemplateDelegate, data: Record<string, unknown>): string {
    try {
      return template(data);
    } catch (error) {
      const message = (error as Error).message;
      const missing = /"([^"]+)" not defined/.exec(message)?.[1];
      if (missing !== undefined) {
        throw new MailerError("TEMPLATE_DATA_MISSING", `template ${JSON.stringify(name)} (${part}) needs ${JSON.stringify(missing)}, which data lacks`, {
          kind: "permanent",
          hint: `Give data.${missing} in the message (or make it optional in the template with {{#if}}).`,
        });
      }
      throw new MailerError("TEMPLATE_INVALID", `template ${JSON.stringify(name)} (${part}) failed to render: ${message.split("\n")[0]}`, { kind: "permanent", hint: "Fix the template, then requeue the message." });
    }
  }

  return {
    where,
    async render(name, data) {
      const listing = await list(name);
      if (listing === undefined) throw notFound(name, where, "does not exist");
      const { subject, html, text } = listing;
      if (subject === undefined || html === undefined) throw notFound(name, where, `has no ${subject === undefined ? "subject" : "html"}.* file`);
      const render = async (part: TemplatePart, source: PartSource, values: Record<string, unknown>) => apply(name, part, await compiledPart(name, part, source), values);
      const renderedSubject = (await render("subject", subject, oneLineValues(data) as Record<string, unknown>)).replace(headerBreaking, " ").trim();
      const renderedHtml = await render("html", html, data);
      // No text part written: the reader's mail client gets one generated from the HTML.
      const renderedText = text === undefined ? htmlToText(renderedHtml) : await render("text", text, data);
      return { subject: renderedSubject, html: renderedHtml, text: renderedText };
    },
  };
}

/** A listing function whose answers are reused for LISTING_FRESH_MS; a failed listing is not kept. */
function freshFor(list: (name: string) => Promise<TemplateListing | undefined>): (name: string) => Promise<TemplateListing | undefined> {
  const listings = new Map<string, { at: number; listing: Promise<TemplateListing | undefined> }>();
  return (name) => {
    const cached = listings.get(name);
    if (cached !== undefined && Date.now() - cached.at < LISTING_FRESH_MS) return cached.listing;
    const listing = list(name);
    listings.set(name, { at: Date.now(), listing });
    listing.catch(() => listings.get(name)?.listing === listing && listings.delete(name));
    return listing;
  };
}

/** Templates in a folder deployed with the app. */
export function directoryTemplates(dir: string): TemplateRenderer {
  return rendererOver(`TEMPLATE_DIR (${dir})`, freshFor(async (name) => {
    let files: string[];
    try {
      files = await readdir(join(dir, name));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT" || (error as NodeJS.ErrnoException).code === "ENOTDIR") return undefined;
      throw error;
    }
    const listing: TemplateListing = {};
    for (const file of files.sort()) {
      const part = partOf(file);
      if (part === undefined || listing[part] !== undefined) continue;
      const path = join(dir, name, file);
      const info = await stat(path);
      listing[part] = { file: `${name}/${file}`, version: `${info.mtimeMs}:${info.size}`, read: () => readFile(path, "utf8") };
    }
    return listing;
  }));
}

/** Templates in a blob container: listed (ETags) at most once a second per template, downloaded when an ETag changes. */
export function containerTemplates(container: () => Promise<ContainerClient>): TemplateRenderer {
  async function listNow(name: string): Promise<TemplateListing | undefined> {
    const client = await container();
    const listing: TemplateListing = {};
    let any = false;
    try {
      for await (const blob of client.listBlobsFlat({ prefix: `${name}/` })) {
        const file = blob.name.slice(name.length + 1);
        if (file.includes("/")) continue;
        any = true;
        const part = partOf(file);
        if (part === undefined || listing[part] !== undefined) continue;
        const etag = blob.properties.etag ?? "";
        listing[part] = {
          file: blob.name,
          version: etag,
          // Only this version: a newer one is read after the next listing shows its ETag.
          read: async () => (await client.getBlobClient(blob.name).downloadToBuffer(undefined, undefined, { conditions: { ifMatch: etag } })).toString("utf8"),
        };
      }
    } catch (error) {
      const status = statusOf(error);
      if (status === 404) throw new MailerError("STORAGE_CONTAINER_NOT_FOUND", `the templates container "${client.containerName}" does not exist`, { kind: "config", hint: "Create it, or set TEMPLATE_CONTAINER to the container holding the templates.", cause: error });
      if (status === 401 || status === 403) throw new MailerError("STORAGE_ACCESS_DENIED", `listing templates in "${client.containerName}" was refused (${status})`, { kind: "config", hint: "Give the app's identity 'Storage Blob Data Reader' on the storage account.", cause: error });
      throw new MailerError("STORAGE_UNAVAILABLE", `listing templates in "${client.containerName}" failed (${status ?? "network"})`, { kind: "transient", cause: error });
    }
    return any ? listing : undefined;
  }

  return rendererOver("TEMPLATE_CONTAINER", freshFor(listNow));
}

/** No TEMPLATE_DIR and no TEMPLATE_CONTAINER: a message naming a template cannot be sent. */
export const noTemplates: TemplateRenderer = {
  where: "no template source",
  render(name) {
    return Promise.reject(new MailerError("TEMPLATE_NOT_FOUND", `template ${JSON.stringify(name)} cannot be found: neither TEMPLATE_DIR nor TEMPLATE_CONTAINER is set`, {
      kind: "permanent",
      hint: "Set TEMPLATE_DIR (a folder deployed with the app) or TEMPLATE_CONTAINER (a blob container), then requeue the message.",
    }));
  },
};

/**
 * A message that names a template, rendered into one that has subject, html and text (template and
 * data removed); any other message as it is. Its `template` and `data` are checked first.
 */
export async function renderMessageJson(json: unknown, renderer: TemplateRenderer): Promise<unknown> {
  if (typeof json !== "object" || json === null || Array.isArray(json) || !("template" in json)) return json;
  const fields = templateFields(json as Record<string, unknown>);
  if (fields === undefined) return json;
  const { template: _template, data: _data, ...rest } = json as Record<string, unknown>;
  const rendered = await renderer.render(fields.name, fields.data);
  return { ...rest, ...rendered };
}
