// The app registration's own credentials through Microsoft Graph: uploaded certificates
// (keyCredentials) and client secrets (passwordCredentials). A client secret's real expiry lives
// only here. Uses the Azure SDK pipeline so proxies and retries behave as for Key Vault.
import type { TokenCredential } from "@azure/identity";
import { azureCredential } from "../../auth/azureCredential.js";
import { errorFinding, type ExpiryItem } from "../finding.js";
import type { ExpirySource } from "./source.js";

const GRAPH = "https://graph.microsoft.com/v1.0";

interface GraphCredential {
  keyId: string;
  displayName?: string | null;
  endDateTime?: string | null;
}

interface GraphApplication {
  displayName?: string;
  keyCredentials?: GraphCredential[];
  passwordCredentials?: GraphCredential[];
}

export function appRegistrationSource(clientId: string, options: { credential?: TokenCredential } = {}): ExpirySource {
  const source = `app registration ${clientId}`;
  return {
    name: "app-registration",
    async list() {
      const { createPipelineFromOptions, createDefaultHttpClient, createPipelineRequest, bearerTokenAuthenticationPolicy } = await import("@azure/core-rest-pipeline");
      const credential = options.credential ?? (await azureCredential());
      const pipeline = createPipelineFromOptions({});
      pipeline.addPolicy(bearerTokenAuthenticationPolicy({ credential, scopes: "https://graph.microsoft.com/.default" }));
      const url = `${GRAPH}/applications(appId='${encodeURIComponent(clientId)}')?$select=displayName,keyCredentials,passwordCredentials`;
      let status: number;
      let body: string;
      try {
        const response = await pipeline.sendRequest(createDefaultHttpClient(), createPipelineRequest({ url, method: "GET" }));
        status = response.status;
        body = response.bodyAsText ?? "";
      } catch (error) {
        return { items: [], errors: [errorFinding(`app:${clientId}`, "app registration", "app-secret", source, `Microsoft Graph unreachable or token refused: ${(error as Error).message.split("\n")[0]}`, "Check the identity's access to Microsoft Graph.")] };
      }
      if (status === 403 || status === 401) {
        return { items: [], errors: [errorFinding(`app:${clientId}`, "app registration", "app-secret", source, `Microsoft Graph refused to read the app registration (${status})`, "Grant the watch's identity the Microsoft Graph application permission Application.Read.All (with admin consent), or set EXPIRY_CHECK_APP_REGISTRATION=false.")] };
      }
      if (status === 404) {
        return { items: [], errors: [errorFinding(`app:${clientId}`, "app registration", "app-secret", source, `no application with appId ${clientId}`, "Check CLIENT_ID.")] };
      }
      if (status !== 200) {
        return { items: [], errors: [errorFinding(`app:${clientId}`, "app registration", "app-secret", source, `Microsoft Graph answered ${status}`, "Try again later.")] };
      }
      const app = JSON.parse(body) as GraphApplication;
      const toItem = (kind: "app-certificate" | "app-secret") => (c: GraphCredential): ExpiryItem => ({
        key: `app:${clientId}:${c.keyId}`,
        name: `${app.displayName ?? clientId}: ${c.displayName || c.keyId}`,
        kind,
        source,
        enabled: true,
        ...(c.endDateTime ? { expiresOn: new Date(c.endDateTime) } : {}),
      });
      return {
        items: [...(app.keyCredentials ?? []).map(toItem("app-certificate")), ...(app.passwordCredentials ?? []).map(toItem("app-secret"))],
        errors: [],
      };
    },
  };
}
