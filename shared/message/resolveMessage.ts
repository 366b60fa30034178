// Step 2 in full: queue text → a validated message with every byte it will send loaded. Follows a
// claim check to its blob, validates, applies the recipient sandbox, loads attachment blobs and
// enforces MAX_MESSAGE_BYTES. Blobs are read by name from one container only (no URLs: no SSRF).
import type { ContainerClient } from "@azure/storage-blob";
import addressparser from "nodemailer/lib/addressparser";
import type { MessagePolicy } from "../config.js";
import { MailerError } from "../errors.js";
import { decodeQueueText } from "../queue/decode.js";
import { statusOf } from "../storage/storageClients.js";
import type { EmailMessage } from "./schema.js";
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

function domainOf(address: string): string {
  // The address nodemailer will send to (RCPT TO), parsed exactly as nodemailer parses it.
  const spec = addressparser(address, { flatten: true })[0]?.address ?? "";
  return spec.slice(spec.lastIndexOf("@") + 1).toLowerCase();
}

export async function resolveMessage(
  text: string,
  defaults: { from: string; id: string },
  policy: MessagePolicy,
  attachments: () => Promise<ContainerClient>,
): Promise<ResolvedMessage> {
  let json = parseJson(decodeQueueText(text), "message");
  let claimCheckBlob: string | undefined;
  if (isClaimCheck(json)) {
    if (typeof json.claimCheck !== "string") throw new MessageError("MESSAGE_INVALID_TYPE", "claimCheck must be a blob name (string)", "claimCheck");
    claimCheckBlob = checkBlobName("claimCheck", json.claimCheck);
    // The blob holds attachments as base64 (4/3 of their size) plus JSON: allow for that here;
    // the exact decoded-size check below still applies.
    const body = await readBlob(await attachments(), claimCheckBlob, "claimCheck", policy.maxMessageBytes * 2 + 64 * 1024);
    json = parseJson(body.toString("utf8"), `claim-check blob "${claimCheckBlob}"`);
  }
  const message = validateMessage(json, defaults);

  if (policy.allowedRecipientDomains.length > 0) {
    for (const [field, list] of [["to", message.to], ["cc", message.cc], ["bcc", message.bcc]] as const) {
      const outside = list.find((address) => !policy.allowedRecipientDomains.includes(domainOf(address)));
      if (outside !== undefined) {
        throw new MessageError("MESSAGE_RECIPIENT_NOT_ALLOWED", `${field}: ${JSON.stringify(outside.slice(0, 200))} is outside ALLOWED_RECIPIENT_DOMAINS (${policy.allowedRecipientDomains.join(", ")})`, field);
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
