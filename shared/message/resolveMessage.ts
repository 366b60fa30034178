// Step 2 in full: queue text → a validated message with every byte it will send loaded. Follows a
// claim check to its blob, validates, applies the recipient sandbox, loads attachment blobs and
// enforces MAX_MESSAGE_BYTES. Blobs are read by name from one container only (no URLs: no SSRF).
import type { ContainerClient } from "@azure/storage-blob";
import type { MessagePolicy } from "../config.js";
import { ConfigError, MailerError } from "../errors.js";
import { decodeQueueText } from "../queue/decode.js";
import { statusOf } from "../storage/storageClients.js";
import { asciiDomainOf, canonicalDomain } from "./address.js";
import { parseClaimCheckJson } from "./claimCheckJson.js";
import type { EmailMessage } from "./schema.js";
import { noTemplates, renderMessageJson, type TemplateRenderer } from "./templates.js";
import { MessageError, checkBlobName, validateMessage } from "./validate.js";

export interface ResolvedMessage {
  message: EmailMessage;
  /** The claim-check blob the message came from, to delete once it is sent. */
  claimCheckBlob?: string;
}

function isClaimCheck(json: unknown): json is { claimCheck: unknown } {
  return typeof json === "object" && json !== null && !Array.isArray(json) && Object.keys(json).length === 1 && "claimCheck" in json;
}

async function readBlob(container: ContainerClient, name: string, field: string, maxBytes: number): Promise<Buffer> {
  const blob = container.getBlobClient(name);
  try {
    const properties = await blob.getProperties();
    if ((properties.contentLength ?? 0) > maxBytes) {
      throw new MessageError("MESSAGE_TOO_LARGE", `${field}: blob "${name}" is ${properties.contentLength} bytes; MAX_MESSAGE_BYTES is ${maxBytes}`, field);
    }
    return await blob.downloadToBuffer();
  } catch (error) {
    if (error instanceof MailerError) throw error;
    const status = statusOf(error);
    if (status === 404 && (error as { details?: { errorCode?: string } }).details?.errorCode === "ContainerNotFound") {
      // Our setup, not the message: every blob message would fail the same way.
      throw new MailerError("STORAGE_CONTAINER_NOT_FOUND", `the attachments container "${container.containerName}" does not exist`, { kind: "config", hint: "Create it or set ATTACHMENT_CONTAINER to the container producers upload to.", cause: error });
    }
    if (status === 404) throw new MessageError("MESSAGE_BLOB_NOT_FOUND", `${field}: no blob "${name}" in container "${container.containerName}"`, field);
    if (status === 401 || status === 403) {
      throw new MailerError("STORAGE_ACCESS_DENIED", `reading blob "${name}" from "${container.containerName}" was refused (${status})`, {
        kind: "config",
        hint: "Give the app's identity 'Storage Blob Data Reader' on the storage account (or check the connection string).",
        cause: error,
      });
    }
    throw new MailerError("STORAGE_UNAVAILABLE", `reading blob "${name}" failed (${status ?? "network"}): ${(error as Error).message.split("\n")[0]}`, { kind: "transient", cause: error });
  }
}

function parseJson(text: string, what: string): unknown {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new MessageError("MESSAGE_NOT_JSON", `${what} is not valid JSON: ${(error as Error).message}`);
  }
}

/**
 * ALLOWED_RECIPIENT_DOMAINS in the form recipients are compared in: A-labels, lower case. An
 * entry that is not a domain by the same rules as addresses is our setup's fault, not the
 * message's: a config error (the circuit opens, nothing is poisoned).
 */
function allowedDomainSet(entries: string[]): Set<string> {
  const allowed = new Set<string>();
  const problems: string[] = [];
  for (const entry of entries) {
    const canonical = canonicalDomain(entry);
    if ("reason" in canonical) problems.push(canonical.reason);
    else allowed.add(canonical.ascii);
  }
  if (problems.length > 0) {
    throw new ConfigError([{ setting: "ALLOWED_RECIPIENT_DOMAINS", problem: `${problems.join("; ")}. Give a comma list of domain names, e.g. example.com,münchen.de` }]);
  }
  return allowed;
}

/**
 * Reads and validates the message itself (following a claim check). A function of its own so
 * that the parsed JSON, which holds every attachment as base64, is garbage once the validated
 * message (with decoded attachments) exists.
 */
async function loadMessage(
  text: string,
  defaults: { from: string; id: string },
  policy: MessagePolicy,
  attachments: () => Promise<ContainerClient>,
  templates: TemplateRenderer,
): Promise<ResolvedMessage> {
  const queued = parseJson(decodeQueueText(text), "message");
  // A template is rendered before validation: the rendered subject and bodies meet every rule a
  // producer's own would.
  if (!isClaimCheck(queued)) return { message: validateMessage(await renderMessageJson(queued, templates), defaults) };
  if (typeof queued.claimCheck !== "string") throw new MessageError("MESSAGE_INVALID_TYPE", "claimCheck must be a blob name (string)", "claimCheck");
  const claimCheckBlob = checkBlobName("claimCheck", queued.claimCheck);
  // The blob holds attachments as base64 (4/3 of their size) plus JSON: allow for that here;
  // the exact decoded-size check below still applies. Read into one buffer of the blob's size and
  // never made one string: large attachment content is decoded from its bytes (claimCheckJson.ts).
  const body = await readBlob(await attachments(), claimCheckBlob, "claimCheck", policy.maxMessageBytes * 2 + 64 * 1024);
  let json: unknown;
  try {
    json = parseClaimCheckJson(body);
  } catch (error) {
    throw new MessageError("MESSAGE_NOT_JSON", `claim-check blob "${claimCheckBlob}" is not valid JSON: ${(error as Error).message}`);
  }
  return { message: validateMessage(await renderMessageJson(json, templates), defaults), claimCheckBlob };
}

export async function resolveMessage(
  text: string,
  defaults: { from: string; id: string },
  policy: MessagePolicy,
  attachments: () => Promise<ContainerClient>,
  templates: TemplateRenderer = noTemplates,
): Promise<ResolvedMessage> {
  const { message, claimCheckBlob } = await loadMessage(text, defaults, policy, attachments, templates);

  if (policy.allowedRecipientDomains.length > 0) {
    const allowed = allowedDomainSet(policy.allowedRecipientDomains);
    for (const [field, list] of [["to", message.to], ["cc", message.cc], ["bcc", message.bcc]] as const) {
      // The parsed address is what goes into RCPT TO, so the sandbox judges exactly what is sent.
      const index = list.findIndex((mailbox) => !allowed.has(asciiDomainOf(mailbox.address)));
      const outside = list[index];
      if (outside !== undefined) {
        throw new MessageError("MESSAGE_RECIPIENT_NOT_ALLOWED", `${field}[${index}]: ${JSON.stringify(outside.address)} is outside ALLOWED_RECIPIENT_DOMAINS (${policy.allowedRecipientDomains.join(", ")})`, `${field}[${index}]`);
      }
    }
  }

  let size = Buffer.byteLength(message.subject) + Buffer.byteLength(message.text ?? "") + Buffer.byteLength(message.html ?? "");
  const tooLarge = () => new MessageError("MESSAGE_TOO_LARGE", `message is over MAX_MESSAGE_BYTES (${policy.maxMessageBytes} bytes of bodies and attachments)`);
  for (const [index, attachment] of message.attachments.entries()) {
    if (attachment.blob !== undefined) {
      attachment.content = await readBlob(await attachments(), attachment.blob, `attachments[${index}].blob`, policy.maxMessageBytes - size);
    }
    size += attachment.content?.length ?? 0;
    if (size > policy.maxMessageBytes) throw tooLarge();
  }
  if (size > policy.maxMessageBytes) throw tooLarge();
  return { message, ...(claimCheckBlob === undefined ? {} : { claimCheckBlob }) };
}
