// Step 1 of a message's path. Queue messages arrive as raw JSON (Storage Explorer, `az storage
// message put`) or base64-encoded JSON (the SDKs' and the Functions host's default). Accept both.
const base64Text = /^[A-Za-z0-9+/]+={0,2}$/;

export function decodeQueueText(text: string): string {
  const trimmed = text.trim();
  if (trimmed.startsWith("{") || trimmed.startsWith("[") || !base64Text.test(trimmed) || trimmed.length % 4 !== 0) {
    return text;
  }
  const decoded = Buffer.from(trimmed, "base64").toString("utf8");
  // Only take the decoded form when it is plausibly the JSON we expect; otherwise validation
  // reports on the text as received, which is what the producer can recognise.
  return decoded.trimStart().startsWith("{") ? decoded : text;
}
