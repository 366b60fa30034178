// Step 2: the storage the sender uses, reachable with the configured connection string or identity,
// and nothing created: the mail queue and its poison queue, the tables the code opens (the exported
// table-name constants, the same list infra/main.bicep creates) and the attachments container.
// Missing ones are a warning naming what creates them; a refusal names the role it needs.
import type { TokenCredential } from "@azure/identity";
import { azureCredential } from "../auth/azureCredential.js";
import type { StorageConfig } from "../config.js";
import { ALERT_TABLE } from "../expiry/alertLedger.js";
import { CONNECTION_TABLE } from "../send/connectionSlots.js";
import { DAILY_RECIPIENT_TABLE } from "../send/dailyRecipientBudget.js";
import { MAILBOX_PAUSE_TABLE } from "../send/mailboxPause.js";
import { RATE_TABLE } from "../send/rateLimiter.js";
import { SEND_LEDGER_TABLE } from "../send/sendLedger.js";
import { fail, pass, warn, type Check } from "./check.js";
import { identityInResponse } from "./fixes.js";
import { azureIdentity } from "./tokenClaims.js";

export const SENDER_TABLES = [SEND_LEDGER_TABLE, RATE_TABLE, CONNECTION_TABLE, ALERT_TABLE, MAILBOX_PAUSE_TABLE, DAILY_RECIPIENT_TABLE].sort();

type Service = "queue" | "table" | "blob";

/** What one storage item turned out to be. */
type Finding =
  | { what: string; service: Service; state: "present" | "missing" }
  | { what: string; service: Service; state: "denied" | "unreachable" | "unconfigured"; detail: string };

const ROLE: Record<Service, string> = {
  queue: "Storage Queue Data Contributor",
  table: "Storage Table Data Contributor",
  blob: "Storage Blob Data Contributor",
};

const isLoopback = (connectionString: string) => /(?:127\.0\.0\.1|localhost)|UseDevelopmentStorage=true/i.test(connectionString);
/** One attempt, bounded: the doctor reports, it does not wait out an outage. */
const REQUEST_TIMEOUT_MS = 15_000;

function classify(what: string, service: Service, error: unknown): Finding {
  const rest = error as { statusCode?: number; code?: string; message?: string };
  const detail = `${rest.statusCode ?? ""} ${rest.code ?? ""} ${(rest.message ?? String(error)).split("\n")[0]}`.replace(/\s+/g, " ").trim();
  if (rest.statusCode === 401 || rest.statusCode === 403) return { what, service, state: "denied", detail };
  return { what, service, state: "unreachable", detail };
}

export async function storageStep(storage: StorageConfig): Promise<Check> {
  const identityBased = storage.connectionString === undefined;
  let credential: TokenCredential | undefined;
  const tokenCredential = async () => (credential ??= await azureCredential());
  const findings: Finding[] = [];
  const queueNames = [storage.queueName, storage.poisonQueueName];

  // Queues: the same endpoint the trigger and `openMailQueues` use.
  try {
    const { QueueServiceClient } = await import("@azure/storage-queue");
    const options = { retryOptions: { maxTries: 1, tryTimeoutInMs: REQUEST_TIMEOUT_MS } };
    const service = storage.connectionString
      ? QueueServiceClient.fromConnectionString(storage.connectionString, options)
      : new QueueServiceClient(storage.queueServiceUri ?? "", await tokenCredential(), options);
    for (const name of queueNames) {
      try {
        findings.push({ what: `queue ${name}`, service: "queue", state: (await service.getQueueClient(name).exists()) ? "present" : "missing" });
      } catch (error) {
        findings.push(classify(`queue ${name}`, "queue", error));
      }
    }
  } catch (error) {
    for (const name of queueNames) findings.push(classify(`queue ${name}`, "queue", error));
  }

  // Tables: one listing answers for all of them.
  const tableUri = storage.tableServiceUri;
  if (identityBased && !tableUri) {
    for (const name of SENDER_TABLES) findings.push({ what: `table ${name}`, service: "table", state: "unconfigured", detail: "AzureWebJobsStorage__tableServiceUri is not set" });
  } else {
    try {
      const { TableServiceClient } = await import("@azure/data-tables");
      const options = { retryOptions: { maxRetries: 0 } };
      const service = storage.connectionString
        ? TableServiceClient.fromConnectionString(storage.connectionString, { ...options, allowInsecureConnection: isLoopback(storage.connectionString) })
        : new TableServiceClient(tableUri ?? "", await tokenCredential(), options);
      const existing = new Set<string>();
      for await (const table of service.listTables({ abortSignal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) })) if (table.name) existing.add(table.name);
      for (const name of SENDER_TABLES) findings.push({ what: `table ${name}`, service: "table", state: existing.has(name) ? "present" : "missing" });
    } catch (error) {
      for (const name of SENDER_TABLES) findings.push(classify(`table ${name}`, "table", error));
    }
  }

  // The attachments container (claim-check messages).
  const container = `container ${storage.attachmentContainer}`;
  if (identityBased && !storage.blobServiceUri) {
    findings.push({ what: container, service: "blob", state: "unconfigured", detail: "AzureWebJobsStorage__blobServiceUri is not set" });
  } else {
    try {
      const { BlobServiceClient } = await import("@azure/storage-blob");
      const options = { retryOptions: { maxTries: 1, tryTimeoutInMs: REQUEST_TIMEOUT_MS } };
      const service = storage.connectionString
        ? BlobServiceClient.fromConnectionString(storage.connectionString, options)
        : new BlobServiceClient(storage.blobServiceUri ?? "", await tokenCredential(), options);
      findings.push({ what: container, service: "blob", state: (await service.getContainerClient(storage.attachmentContainer).exists()) ? "present" : "missing" });
    } catch (error) {
      findings.push(classify(container, "blob", error));
    }
  }

  const how = identityBased ? "with the app's identity (AzureWebJobsStorage__*ServiceUri)" : "with the AzureWebJobsStorage connection string";
  const broken = findings.filter((f) => f.state !== "present" && f.state !== "missing");
  const missing = findings.filter((f) => f.state === "missing");

  if (broken.length > 0) {
    const first = broken[0]!;
    const lines = broken.map((f) => `${f.what}: ${f.state}${"detail" in f ? ` (${f.detail})` : ""}`);
    if (first.state === "unconfigured") {
      return fail("storage", "CONFIG_INVALID", lines.join("; "), `With identity-based storage the sender reaches tables and blobs through their own service URIs: set AzureWebJobsStorage__tableServiceUri (https://<account>.table.core.windows.net) and AzureWebJobsStorage__blobServiceUri (https://<account>.blob.core.windows.net), as infra/main.bicep does.`);
    }
    if (first.state === "denied") {
      const services = [...new Set(broken.filter((f) => f.state === "denied").map((f) => f.service))];
      const detail = broken.map((f) => ("detail" in f ? f.detail : "")).join(" ");
      if (!identityBased) {
        return fail("storage", "STORAGE_ACCESS_DENIED", lines.join("; "), "The storage account refused the connection string: its account key is wrong or was rotated, or shared-key access is disabled on the account. Copy the current connection string (Storage account > Access keys), or use identity-based access (AzureWebJobsStorage__queueServiceUri etc.).");
      }
      const identity = { ...identityInResponse(detail), ...(await azureIdentity("https://storage.azure.com/.default")) };
      const assignee = identity.objectId ?? "<object id of the app's managed identity>";
      const grants = services.map((s) => `  az role assignment create --role "${ROLE[s]}" --assignee-object-id ${assignee} --assignee-principal-type ${identity.upn ? "User" : "ServicePrincipal"} --scope $(az storage account show --name <account> --query id -o tsv)`);
      return fail("storage", "STORAGE_ACCESS_DENIED", lines.join("; "), `The identity in use (${identity.upn ?? `app id ${identity.appId ?? "<app id>"}`}, object id ${assignee}) lacks ${services.map((s) => `'${ROLE[s]}'`).join(" and ")} on the storage account. Grant it (takes a few minutes to apply):\n${grants.join("\n")}`);
    }
    return fail("storage", "STORAGE_UNAVAILABLE", lines.join("; "), `The storage account did not answer ${how}: check AzureWebJobsStorage (locally: is Azurite running?) or the service URIs, and that this machine may reach the account (its Networking page: public access or this network).`);
  }
  const tables = findings.filter((f) => f.service === "table" && f.state === "present").map((f) => f.what.replace(/^table /, ""));
  const summary = `storage reachable ${how}`;
  if (missing.length > 0) {
    const creators: string[] = [];
    if (missing.some((f) => f.service === "queue")) creators.push("Queues: created by infra/main.bicep, and by the first `queue-mailer enqueue` or `queue-mailer worker` (the Functions host creates the mail queue when its trigger starts).");
    if (missing.some((f) => f.service === "table")) creators.push("Tables: created by infra/main.bicep, and by the sender when it first uses them (the first message sent).");
    if (missing.some((f) => f.service === "blob")) creators.push("Container: created by infra/main.bicep, and by the first `queue-mailer enqueue` of a message that travels as a claim check.");
    return warn("storage", "STORAGE_NOT_FOUND", `${summary}; not there yet: ${missing.map((f) => f.what).join(", ")}`, creators.join("\n"));
  }
  return pass("storage", `${summary}: queues ${queueNames.join(", ")}; tables ${tables.join(", ")}; ${container}`);
}
