// Tables and blob containers in the function's storage account, from the same settings as the
// queue: a connection string (Azurite, shared key) or service URIs with the managed identity.
import type { TableClient } from "@azure/data-tables";
import type { ContainerClient } from "@azure/storage-blob";
import type { StorageConfig } from "../config.js";
import { azureCredential } from "../auth/azureCredential.js";

const isLoopback = (connectionString: string) => /(?:127\.0\.0\.1|localhost)|UseDevelopmentStorage=true/i.test(connectionString);

/** A table, created if missing. */
export async function openTable(storage: StorageConfig, name: string): Promise<TableClient> {
  const { TableClient } = await import("@azure/data-tables");
  const client = storage.connectionString
    ? TableClient.fromConnectionString(storage.connectionString, name, { allowInsecureConnection: isLoopback(storage.connectionString) })
    : new TableClient(storage.tableServiceUri ?? "", name, await azureCredential());
  await client.createTable();
  return client;
}

/** A blob container (not created: producers own their attachments container). */
export async function openContainer(storage: StorageConfig, name: string): Promise<ContainerClient> {
  const { BlobServiceClient } = await import("@azure/storage-blob");
  const service = storage.connectionString
    ? BlobServiceClient.fromConnectionString(storage.connectionString)
    : new BlobServiceClient(storage.blobServiceUri ?? "", await azureCredential());
  return service.getContainerClient(name);
}

/** Table keys may not contain / \ # ? or control characters. */
export const tableKey = (value: string): string => encodeURIComponent(value).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`).slice(0, 1000);

export const statusOf = (error: unknown): number | undefined => (error as { statusCode?: number }).statusCode;
