// How a confidential client proves itself with a secret (RFC 6749 2.3.1), shared by every method
// that sends one: `post` puts client_id and client_secret in the form (client_secret_post); `basic`
// sends them as HTTP Basic, each form-urlencoded before base64 (client_secret_basic). A server
// registered for one refuses the other with invalid_client.
import type { ClientAuth } from "../config.js";

export function clientSecretAuthentication(clientId: string, secret: string, mode: ClientAuth): { form: Record<string, string>; headers?: Record<string, string> } {
  if (mode === "post") return { form: { client_id: clientId, client_secret: secret } };
  const encode = (value: string) => new URLSearchParams({ v: value }).toString().slice(2);
  return { form: {}, headers: { authorization: `Basic ${Buffer.from(`${encode(clientId)}:${encode(secret)}`).toString("base64")}` } };
}
