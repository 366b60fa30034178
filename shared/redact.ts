// Secrets must never reach a log, an error or a poison record. Two nets:
// 1. shapes: JWTs (tokens, assertions), PEM blocks, bearer values, XOAUTH2 blobs, secret form fields;
// 2. exact values this process knows are secret (client secrets, passwords), registered at load.
const knownSecrets = new Set<string>();

/** Remember a secret value so that it is masked wherever it appears. Short values are ignored. */
export function registerSecret(value: string | undefined): void {
  if (value && value.length >= 8) knownSecrets.add(value);
}

const patterns: Array<[RegExp, string]> = [
  // PEM blocks of any kind (private keys above all).
  [/-----BEGIN [A-Z0-9 ]+-----[\s\S]*?(-----END [A-Z0-9 ]+-----|$)/g, "[redacted PEM]"],
  // JWT / JWS compact form: header.payload.signature, header always starts with "eyJ".
  [/eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*/g, "[redacted JWT]"],
  [/(Bearer\s+)[A-Za-z0-9._~+/=-]+/gi, "$1[redacted]"],
  // base64("user=") starts every XOAUTH2 initial response.
  [/dXNlcj[A-Za-z0-9+/=]{8,}/g, "[redacted XOAUTH2]"],
  [/((?:client_assertion|client_secret|access_token|refresh_token|assertion|password)["']?\s*[=:]\s*["']?)[^&\s"',}]+/gi, "$1[redacted]"],
];

export function redact(text: string): string {
  let out = text;
  for (const secret of knownSecrets) {
    if (out.includes(secret)) out = out.split(secret).join("[redacted]");
  }
  for (const [pattern, replacement] of patterns) out = out.replace(pattern, replacement);
  return out;
}
