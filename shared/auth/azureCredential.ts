// One DefaultAzureCredential per process: managed identity in Azure, environment variables or
// `az login` locally. Loaded lazily so that commands that never touch Azure do not pay for it.
import type { TokenCredential } from "@azure/identity";

let credential: Promise<TokenCredential> | undefined;

export function azureCredential(): Promise<TokenCredential> {
  credential ??= import("@azure/identity").then(({ DefaultAzureCredential }) => new DefaultAzureCredential());
  return credential;
}
