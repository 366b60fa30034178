// The Microsoft Graph mail double through plain fetch (undici), the way a Graph sender talks to it,
// with real tokens from the local OAuth server (oidc-provider) for Graph and for Exchange SMTP, both
// from one local stack started with transport "graph" (whose env is checked too).
// Needs NODE_EXTRA_CA_CERTS=.test-ca/ca.pem (npm test sets it): the double's certificate comes
// from that CA.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { before, beforeEach, describe, it } from "node:test";
import MailComposer from "nodemailer/lib/mail-composer";
import type Mail from "nodemailer/lib/mailer";
import { ensureCertificateAuthority, issueCertificate } from "../cli/local/devCertificates.js";
import { LOCAL_MAILBOX, LOCAL_PUBLIC_CLIENT_ID } from "../cli/local/localStack.js";
import { GRAPH_APP_ID, GRAPH_RESOURCE, type OAuthServer } from "../cli/local/oauthServer.js";
import {
  GRAPH_REQUEST_LIMIT_BYTES,
  UPLOAD_CHUNK_MULTIPLE_BYTES,
  startGraphMailServer,
  type GraphMailServer,
} from "../cli/local/graphMailServer.js";
import { credentialSourceFor } from "../shared/auth/credentialSource.js";
import { loadSendConfig } from "../shared/config.js";
import { TokenProvider } from "../shared/token/tokenProvider.js";
import { capturingLogger, useLocalStack, within } from "./support/harness.js";

const MAILBOX = LOCAL_MAILBOX;
const OTHER_MAILBOX = "other@contoso.test";
/** An app registration with a secret, added to the stack's OAuth server for app-only Graph tokens. */
const APP_CLIENT = "00000000-0000-4000-8000-00000000a991";
const PUBLIC_CLIENT = LOCAL_PUBLIC_CLIENT_ID;
const APP_SECRET = randomBytes(24).toString("base64url");
const OTHER_PASSWORD = randomBytes(12).toString("base64url");

interface GraphResponse {
  status: number;
  headers: Headers;
  text: string;
  json: { error?: { code: string; message: string; innerError: Record<string, string> } } & Record<string, unknown>;
}

let oauth: OAuthServer;
let graph: GraphMailServer;
/** App-only Graph token (roles Mail.Send, Mail.ReadWrite). */
let appToken: string;
/** Delegated Graph tokens for MAILBOX: Mail.Send only, Mail.ReadWrite only; and Mail.Send for OTHER_MAILBOX. */
let sendOnlyToken: string;
let readWriteOnlyToken: string;
let otherUserToken: string;
/** App-only token for Exchange SMTP (audience outlook.office365.com). */
let smtpToken: string;

async function token(form: Record<string, string>): Promise<string> {
  const response = await fetch(oauth.tokenUrl, { method: "POST", headers: { "content-type": "application/x-www-form-urlencoded" }, body: new URLSearchParams(form) });
  const body = (await response.json()) as { access_token?: string };
  assert.equal(response.status, 200, JSON.stringify(body));
  return body.access_token!;
}

async function call(path: string, init: { method?: string; token?: string | null; body?: string | Buffer; contentType?: string; headers?: Record<string, string> } = {}): Promise<GraphResponse> {
  const url = path.startsWith("https://") ? path : `${graph.url}${path}`;
  const headers: Record<string, string> = { ...init.headers };
  if (init.token !== null) headers["authorization"] = `Bearer ${init.token ?? appToken}`;
  if (init.contentType) headers["content-type"] = init.contentType;
  const response = await fetch(url, { method: init.method ?? "POST", headers, ...(init.body === undefined ? {} : { body: init.body }) });
  const text = await response.text();
  return { status: response.status, headers: response.headers, text, json: text && response.headers.get("content-type")?.includes("json") ? JSON.parse(text) : {} };
}

const users = (mailbox = MAILBOX) => `/v1.0/users/${encodeURIComponent(mailbox)}`;

async function mime(options: Mail.Options): Promise<Buffer> {
  const node = new MailComposer(options).compile();
  (node as unknown as { keepBcc: boolean }).keepBcc = true;
  return node.build();
}

const sendMime = (raw: Buffer, init: { token?: string | null; mailbox?: string } = {}) =>
  call(`${users(init.mailbox)}/sendMail`, { body: raw.toString("base64"), contentType: "text/plain", ...(init.token === undefined ? {} : { token: init.token }) });

const simple = (overrides: Mail.Options = {}) => mime({ from: MAILBOX, to: "ada@example.test", subject: "Hello", text: "Hi", ...overrides });

/** Asserts Graph's error shape and returns the error. */
function graphError(response: GraphResponse, status: number, code: string) {
  assert.equal(response.status, status, response.text);
  const error = response.json.error;
  assert.ok(error, `an error body: ${response.text}`);
  assert.equal(error.code, code);
  assert.equal(typeof error.message, "string");
  assert.match(error.innerError["date"] ?? "", /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$/);
  assert.equal(error.innerError["request-id"], response.headers.get("request-id"));
  assert.equal(error.innerError["client-request-id"], response.headers.get("client-request-id"));
  return error;
}

const sha256 = (bytes: Buffer) => createHash("sha256").update(bytes).digest("hex");

describe("Microsoft Graph mail double", () => {
  // AUTH_METHOD=password: the method whose Graph scope differs (delegated Mail.Send, not .default).
  const local = useLocalStack("graph-double-", { transport: "graph", authMethod: "password" });

  before(async () => {
    const { stack } = local;
    assert.ok(stack.graph, "transport graph starts the Graph double");
    oauth = stack.oauth;
    graph = stack.graph;
    oauth.registerClient({ clientId: APP_CLIENT, auth: "client_secret_post", secret: APP_SECRET });
    oauth.registerUser({ username: OTHER_MAILBOX, password: OTHER_PASSWORD });
    graph.addMailbox(OTHER_MAILBOX);
    const app = { grant_type: "client_credentials", client_id: APP_CLIENT, client_secret: APP_SECRET };
    const user = (username: string, password: string, scope: string) => ({ grant_type: "password", client_id: PUBLIC_CLIENT, username, password, scope });
    const mailboxPassword = stack.env["MAILBOX_PASSWORD"]!;
    [appToken, smtpToken, sendOnlyToken, readWriteOnlyToken, otherUserToken] = await Promise.all([
      token({ ...app, scope: oauth.graphScope }),
      token({ ...app, scope: oauth.scope }),
      token(user(MAILBOX, mailboxPassword, oauth.graphDelegatedScope)),
      token(user(MAILBOX, mailboxPassword, `${GRAPH_RESOURCE}/Mail.ReadWrite`)),
      token(user(OTHER_MAILBOX, OTHER_PASSWORD, oauth.graphDelegatedScope)),
    ]);
  });
  beforeEach(() => {
    graph.resetStats();
    graph.restrictTo(undefined);
    graph.setInvalidRecipients([]);
    graph.setLatency(0);
  });

  describe("local stack and Graph tokens", () => {
    it("the stack's env sends through Graph as is: TRANSPORT, GRAPH_URL and the delegated Graph scope, through the real credential and token code", async () => {
      const { env } = local.stack;
      assert.equal(env["TRANSPORT"], "graph");
      assert.equal(env["GRAPH_URL"], graph.url);
      assert.equal(env["TOKEN_SCOPE"], "https://graph.microsoft.com/Mail.Send");
      const config = loadSendConfig(env);
      assert.equal(config.transport, "graph");
      assert.equal(config.graph.url, graph.url);
      const logger = capturingLogger();
      const provider = new TokenProvider({ credential: credentialSourceFor(config.auth, logger), logger });
      const { token: accessToken } = await provider.getToken();
      assert.equal(provider.stats.requests, 1);
      const response = await sendMime(await simple(), { token: accessToken });
      assert.equal(response.status, 202, response.text);
      assert.equal(graph.messages.length, 1);
      const logs = logger.lines.join("\n");
      for (const secret of [accessToken, env["MAILBOX_PASSWORD"]!]) assert.ok(!logs.includes(secret), "no secret in the logs");
    });

    it("issues app-only Graph tokens under both of Graph's names; Graph accepts either audience", async () => {
      const claims = (jwt: string) => JSON.parse(Buffer.from(jwt.split(".")[1]!, "base64url").toString("utf8")) as { aud: string; roles?: string[]; scp?: string };
      assert.deepEqual([claims(appToken).aud, claims(appToken).roles], [GRAPH_RESOURCE, ["Mail.Send", "Mail.ReadWrite"]]);
      assert.deepEqual([claims(sendOnlyToken).aud, claims(sendOnlyToken).scp], [GRAPH_RESOURCE, "Mail.Send"]);
      const byAppId = await token({ grant_type: "client_credentials", client_id: APP_CLIENT, client_secret: APP_SECRET, scope: `${GRAPH_APP_ID}/.default` });
      assert.equal(claims(byAppId).aud, GRAPH_APP_ID);
      assert.equal((await sendMime(await simple(), { token: byAppId })).status, 202);
    });

    it("verifyAccessToken says why a token does not pass: audience, permission, user or invalid", async () => {
      const problem = async (value: string, user: string | undefined, resource?: string, permission?: string) => {
        const check = await oauth.verifyAccessToken(value, user, resource, permission);
        return check.ok ? "ok" : check.problem;
      };
      assert.equal(await problem(appToken, MAILBOX), "audience", "a Graph token is not an Exchange SMTP token");
      assert.equal(await problem(smtpToken, MAILBOX), "ok");
      assert.equal(await problem(smtpToken, MAILBOX, GRAPH_RESOURCE), "audience");
      assert.equal(await problem(appToken, MAILBOX, GRAPH_RESOURCE, "Mail.ReadWrite"), "ok");
      assert.equal(await problem(sendOnlyToken, MAILBOX, GRAPH_RESOURCE, "Mail.ReadWrite"), "permission");
      assert.equal(await problem(sendOnlyToken, OTHER_MAILBOX, GRAPH_RESOURCE), "user");
      assert.equal(await problem("not-a-jwt", MAILBOX, GRAPH_RESOURCE), "invalid");
    });

    it("refuses a password-grant scope that names two resources (AADSTS28000)", async () => {
      const response = await fetch(oauth.tokenUrl, {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams({ grant_type: "password", client_id: PUBLIC_CLIENT, username: MAILBOX, password: local.stack.env["MAILBOX_PASSWORD"]!, scope: `${oauth.graphDelegatedScope} ${oauth.delegatedScope}` }),
      });
      const body = (await response.json()) as { error?: string; error_codes?: number[] };
      assert.equal(response.status, 400);
      assert.deepEqual([body.error, body.error_codes], ["invalid_scope", [28000]]);
    });
  });

  describe("sendMail", () => {
    it("takes base64 MIME: 202 with no body, the message recorded byte for byte with headers, alternatives and attachments", async () => {
      const pdf = randomBytes(50_000);
      const raw = await mime({
        from: `Mailer <${MAILBOX}>`,
        to: ["Ada <ada@example.test>", "grace@example.test"],
        cc: "linus@example.test",
        bcc: "audit@example.test",
        subject: "Your receipt ✓",
        text: "Plain alternative",
        html: "<p>HTML alternative</p>",
        messageId: "<receipt-42@queue-mailer.test>",
        headers: { "X-Campaign": "graph-test" },
        attachments: [{ filename: "receipt.pdf", contentType: "application/pdf", content: pdf }],
      });
      const response = await sendMime(raw);
      assert.equal(response.status, 202, response.text);
      assert.equal(response.text, "");
      assert.match(response.headers.get("request-id") ?? "", /^[0-9a-f-]{36}$/);

      assert.equal(graph.messages.length, 1);
      const [message] = graph.messages;
      assert.ok(message);
      assert.ok(message.raw.equals(raw), "the MIME arrives unchanged");
      assert.equal(message.via, "sendMail");
      assert.equal(message.format, "mime");
      assert.equal(message.mailbox, MAILBOX);
      assert.equal(message.from, MAILBOX);
      assert.equal(message.messageId, "<receipt-42@queue-mailer.test>");
      assert.deepEqual(message.headers["x-campaign"], ["graph-test"]);
      assert.equal(message.subject, "Your receipt ✓");
      assert.deepEqual(message.to, ["ada@example.test", "grace@example.test"]);
      assert.deepEqual(message.cc, ["linus@example.test"]);
      assert.deepEqual(message.bcc, ["audit@example.test"], "Graph takes Bcc from the MIME header");
      assert.equal(message.text?.trim(), "Plain alternative");
      assert.equal(message.html?.trim(), "<p>HTML alternative</p>");
      assert.equal(message.attachments.length, 1);
      assert.equal(message.attachments[0]!.filename, "receipt.pdf");
      assert.equal(message.attachments[0]!.contentType, "application/pdf");
      assert.equal(message.attachments[0]!.source, "mime");
      assert.ok(message.attachments[0]!.content.equals(pdf));
      assert.deepEqual(
        graph.requests.map((r) => [r.method, r.kind, r.mailbox, r.status]),
        [["POST", "sendMail", MAILBOX, 202]],
      );
      assert.equal(graph.requests[0]!.bytes, raw.toString("base64").length);
    });

    it("takes the JSON form: subject, body, recipients, custom headers and file attachments", async () => {
      const bytes = randomBytes(1000);
      const response = await call(`${users()}/sendMail`, {
        contentType: "application/json",
        body: JSON.stringify({
          message: {
            subject: "JSON form",
            body: { contentType: "HTML", content: "<b>Hi</b>" },
            toRecipients: [{ emailAddress: { address: "ada@example.test", name: "Ada" } }],
            ccRecipients: [{ emailAddress: { address: "linus@example.test" } }],
            bccRecipients: [{ emailAddress: { address: "audit@example.test" } }],
            internetMessageHeaders: [{ name: "x-custom-group", value: "Nevada" }],
            attachments: [{ "@odata.type": "#microsoft.graph.fileAttachment", name: "data.bin", contentType: "application/octet-stream", contentBytes: bytes.toString("base64") }],
          },
          saveToSentItems: false,
        }),
      });
      assert.equal(response.status, 202, response.text);
      const [message] = await within(graph.waitForMessages(1, 2_000), 3_000, "the JSON message");
      assert.ok(message);
      assert.equal(message.format, "json");
      assert.equal(message.saveToSentItems, false);
      assert.equal(message.from, MAILBOX, "no from: the mailbox sends as itself");
      assert.equal(message.subject, "JSON form");
      assert.equal(message.html?.trim(), "<b>Hi</b>");
      assert.deepEqual([message.to, message.cc, message.bcc], [["ada@example.test"], ["linus@example.test"], ["audit@example.test"]]);
      assert.deepEqual(message.headers["x-custom-group"], ["Nevada"]);
      assert.equal(message.attachments[0]!.source, "json");
      assert.ok(message.attachments[0]!.content.equals(bytes));

      const badHeader = await call(`${users()}/sendMail`, {
        contentType: "application/json",
        body: JSON.stringify({ message: { subject: "x", toRecipients: [{ emailAddress: { address: "ada@example.test" } }], internetMessageHeaders: [{ name: "Reply-To", value: "x@example.test" }] } }),
      });
      graphError(badHeader, 400, "InvalidInternetMessageHeader");
      assert.equal(graph.messages.length, 1);
    });

    it("refuses malformed base64 MIME and a message without recipients", async () => {
      const error = graphError(await call(`${users()}/sendMail`, { body: "not base64!", contentType: "text/plain" }), 400, "ErrorMimeContentInvalidBase64String");
      assert.equal(error.message, "Invalid base64 string for MIME content.");
      graphError(await sendMime(await mime({ from: MAILBOX, subject: "nobody", text: "x" })), 400, "ErrorInvalidRecipients");
      assert.equal(graph.messages.length, 0);
    });

    it("answers 413 for a request body over 4 MB, after reading it, so the client sees the answer", async () => {
      const body = "A".repeat(GRAPH_REQUEST_LIMIT_BYTES + 4);
      const response = await call(`${users()}/sendMail`, { body, contentType: "text/plain" });
      graphError(response, 413, "RequestEntityTooLarge");
      assert.equal(graph.requests[0]!.bytes, body.length);
      assert.equal(graph.messages.length, 0);
    });
  });

  describe("authentication and authorization", () => {
    it("401 InvalidAuthenticationToken without a token, with a malformed one and with a token for another resource; the token never echoed", async () => {
      const raw = await simple();
      const none = graphError(await sendMime(raw, { token: null }), 401, "InvalidAuthenticationToken");
      assert.equal(none.message, "Access token is empty.");
      const garbage = graphError(await sendMime(raw, { token: "not-a-jwt" }), 401, "InvalidAuthenticationToken");
      assert.match(garbage.message, /CompactToken parsing failed/);
      // An SMTP.SendAsApp token is for Exchange (aud outlook.office365.com): Graph refuses its audience.
      const smtp = await sendMime(raw, { token: smtpToken });
      const audience = graphError(smtp, 401, "InvalidAuthenticationToken");
      assert.equal(audience.message, "Access token validation failure. Invalid audience.");
      assert.match(smtp.headers.get("www-authenticate") ?? "", /^Bearer /);
      assert.ok(!smtp.text.includes(smtpToken), "the token is not in the answer");
      assert.equal(graph.messages.length, 0);
    });

    it("403 ErrorAccessDenied for a token without Mail.Send, a delegated token for another user, and a mailbox outside the application access policy", async () => {
      const raw = await simple();
      const noSend = graphError(await sendMime(raw, { token: readWriteOnlyToken }), 403, "ErrorAccessDenied");
      assert.equal(noSend.message, "Access is denied. Check credentials and try again.");
      graphError(await sendMime(raw, { token: otherUserToken }), 403, "ErrorAccessDenied");

      graph.restrictTo([OTHER_MAILBOX]);
      graphError(await sendMime(raw), 403, "ErrorAccessDenied");
      graph.restrictTo(undefined);
      assert.equal((await sendMime(raw)).status, 202, "the policy lifted, the same request passes");
      assert.equal((await sendMime(raw, { token: sendOnlyToken })).status, 202, "a delegated Mail.Send token for its own mailbox passes");
      assert.equal(graph.messages.length, 2);
    });

    it("404 ErrorInvalidUser for an unknown mailbox and MailboxNotEnabledForRESTAPI for one Graph cannot use", async () => {
      const raw = await simple();
      const unknown = graphError(await sendMime(raw, { mailbox: "nobody@contoso.test" }), 404, "ErrorInvalidUser");
      assert.equal(unknown.message, "The requested user 'nobody@contoso.test' is invalid.");
      graph.setRestEnabled(OTHER_MAILBOX, false);
      try {
        graphError(await sendMime(await simple({ from: OTHER_MAILBOX }), { mailbox: OTHER_MAILBOX }), 404, "MailboxNotEnabledForRESTAPI");
      } finally {
        graph.setRestEnabled(OTHER_MAILBOX, true);
      }
    });

    it("400 ErrorInvalidRecipients for an unresolvable recipient; 403 ErrorSendAsDenied for a From without Send As", async () => {
      graph.setInvalidRecipients(["ghost@example.test"]);
      const invalid = graphError(await sendMime(await simple({ to: ["ada@example.test", "ghost@example.test"] })), 400, "ErrorInvalidRecipients");
      assert.match(invalid.message, /Recipient 'ghost@example.test' isn't resolved/);

      const sendAs = graphError(await sendMime(await simple({ from: "ceo@contoso.test" })), 403, "ErrorSendAsDenied");
      assert.match(sendAs.message, /does not have the right to send mail on behalf of the specified sending account/);
      graph.grantSendAs(MAILBOX, ["ceo@contoso.test"]);
      assert.equal((await sendMime(await simple({ from: "ceo@contoso.test" }))).status, 202);
      assert.equal(graph.messages.length, 1);
      assert.equal(graph.messages[0]!.from, "ceo@contoso.test");
    });
  });

  describe("large messages: draft, upload session, send", () => {
    /** Creates a draft from MIME and returns its id. */
    async function draft(raw: Buffer, token?: string): Promise<GraphResponse> {
      return call(`${users()}/messages`, { body: raw.toString("base64"), contentType: "text/plain", ...(token === undefined ? {} : { token }) });
    }
    async function uploadSession(draftId: string, size: number, name = "big.bin") {
      return call(`${users()}/messages/${encodeURIComponent(draftId)}/attachments/createUploadSession`, {
        contentType: "application/json",
        body: JSON.stringify({ AttachmentItem: { attachmentType: "file", name, size, contentType: "application/octet-stream" } }),
      });
    }
    const put = (uploadUrl: string, bytes: Buffer, start: number, total: number, headers: Record<string, string> = {}) =>
      call(uploadUrl, {
        method: "PUT",
        token: null,
        body: bytes,
        contentType: "application/octet-stream",
        headers: { "content-range": `bytes ${start}-${start + bytes.length - 1}/${total}`, ...headers },
      });

    it("sends a 10 MB attachment in 320 KiB-multiple chunks: byte-exact, with a small attachment and the draft's MIME", async () => {
      const big = randomBytes(10 * 1024 * 1024);
      const small = randomBytes(2048);
      const raw = await simple({ subject: "Big one", html: "<p>see attached</p>", messageId: "<big-1@queue-mailer.test>" });
      const created = await draft(raw);
      assert.equal(created.status, 201, created.text);
      const draftId = created.json["id"] as string;
      assert.match(draftId, /^AAMkAD/);
      assert.equal(created.json["isDraft"], true);

      const session = await uploadSession(draftId, big.length);
      assert.equal(session.status, 201, session.text);
      const uploadUrl = session.json["uploadUrl"] as string;
      assert.ok(uploadUrl.startsWith(`${graph.url}/api/v2.0/Users(`), uploadUrl);
      assert.match(uploadUrl, /\?authtoken=/);
      assert.deepEqual(session.json["nextExpectedRanges"], ["0-"]);
      assert.ok(Date.parse(session.json["expirationDateTime"] as string) > Date.now());

      const chunkSize = 12 * UPLOAD_CHUNK_MULTIPLE_BYTES; // 3.75 MiB: under Outlook's 4 MB per PUT
      let last: GraphResponse | undefined;
      for (let start = 0; start < big.length; start += chunkSize) {
        last = await put(uploadUrl, big.subarray(start, start + chunkSize), start, big.length);
        const end = Math.min(start + chunkSize, big.length);
        if (end < big.length) {
          assert.equal(last.status, 200, last.text);
          assert.deepEqual(last.json["nextExpectedRanges"], [String(end)]);
          assert.ok(last.json["ExpirationDateTime"], "Outlook's capitalised ExpirationDateTime");
        }
      }
      assert.equal(last?.status, 201, last?.text);
      assert.equal(last?.text, "");
      assert.match(last?.headers.get("location") ?? "", /\/Attachments\('/);

      const attached = await call(`${users()}/messages/${encodeURIComponent(draftId)}/attachments`, {
        contentType: "application/json",
        body: JSON.stringify({ "@odata.type": "#microsoft.graph.fileAttachment", name: "small.txt", contentType: "text/plain", contentBytes: small.toString("base64") }),
      });
      assert.equal(attached.status, 201, attached.text);
      assert.equal(attached.json["size"], small.length);
      assert.equal(graph.messages.length, 0, "nothing is sent before /send");

      const sent = await call(`${users()}/messages/${encodeURIComponent(draftId)}/send`);
      assert.equal(sent.status, 202, sent.text);
      const [message] = graph.messages;
      assert.ok(message);
      assert.equal(message.via, "uploadSession");
      assert.ok(message.raw.equals(raw), "the draft's MIME unchanged");
      assert.equal(message.messageId, "<big-1@queue-mailer.test>");
      assert.deepEqual(message.attachments.map((a) => [a.filename, a.source, a.content.length]), [["big.bin", "uploadSession", big.length], ["small.txt", "attachment", small.length]]);
      assert.equal(sha256(message.attachments[0]!.content), sha256(big));
      assert.ok(message.attachments[1]!.content.equals(small));
      assert.deepEqual(
        graph.requests.map((r) => r.kind),
        ["createDraft", "createUploadSession", "uploadChunk", "uploadChunk", "uploadChunk", "addAttachment", "send"],
      );
      assert.ok(graph.requests.filter((r) => r.kind === "uploadChunk").every((r) => r.bytes <= 4 * 1024 * 1024));

      const again = await call(`${users()}/messages/${encodeURIComponent(draftId)}/send`);
      graphError(again, 404, "ErrorItemNotFound");
    });

    it("refuses bad chunks: out of order or overlapping (416), not a 320 KiB multiple (400), a wrong total (400), with Authorization (401)", async () => {
      const size = 3 * 1024 * 1024 + 5;
      const bytes = randomBytes(size);
      const created = await draft(await simple());
      const session = await uploadSession(created.json["id"] as string, size);
      const uploadUrl = session.json["uploadUrl"] as string;
      const chunk = 4 * UPLOAD_CHUNK_MULTIPLE_BYTES;

      const gap = graphError(await put(uploadUrl, bytes.subarray(chunk, 2 * chunk), chunk, size), 416, "invalidRange");
      assert.match(gap.message, /out of order/);
      const odd = graphError(await put(uploadUrl, bytes.subarray(0, chunk + 1), 0, size), 400, "invalidRequest");
      assert.match(odd.message, /multiple of 320 KiB/);
      graphError(await put(uploadUrl, bytes.subarray(0, chunk), 0, size + 1), 400, "invalidRequest");
      // Graph documents this: the upload URL is pre-authenticated; a bearer token there fails.
      const withBearer = await put(uploadUrl, bytes.subarray(0, chunk), 0, size, { authorization: `Bearer ${appToken}` });
      graphError(withBearer, 401, "InvalidAudienceForResource");
      const authtoken = new URL(uploadUrl).searchParams.get("authtoken")!;
      assert.ok(!withBearer.text.includes(authtoken) && !withBearer.text.includes(appToken), "no credential in the answer");

      assert.equal((await put(uploadUrl, bytes.subarray(0, chunk), 0, size)).status, 200);
      const overlap = graphError(await put(uploadUrl, bytes.subarray(0, chunk), 0, size), 416, "invalidRange");
      assert.match(overlap.message, /overlaps/);
      const wrongToken = uploadUrl.replace(/authtoken=[^&]+/, "authtoken=forged");
      graphError(await put(wrongToken, bytes.subarray(chunk, 2 * chunk), chunk, size), 404, "ErrorItemNotFound");
      assert.equal((await put(uploadUrl, bytes.subarray(chunk), chunk, size)).status, 201, "the rest, in order, completes it");
    });

    it("needs Mail.ReadWrite for drafts and sessions of 3 MB or more; a small attachment goes inline", async () => {
      graphError(await draft(await simple(), sendOnlyToken), 403, "ErrorAccessDenied");
      const created = await draft(await simple());
      const tooSmall = await uploadSession(created.json["id"] as string, 2 * 1024 * 1024);
      graphError(tooSmall, 400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize");
      graphError(await uploadSession("AAMkADnothere", 5 * 1024 * 1024), 404, "ErrorItemNotFound");
    });
  });

  describe("limits and injected answers", () => {
    it("answers the 5th concurrent request for one mailbox with 429 ApplicationThrottled and Retry-After", async () => {
      graph.setLatency(300);
      const raw = await simple();
      const responses = await within(Promise.all(Array.from({ length: 5 }, () => sendMime(raw))), 5_000, "five concurrent sendMail");
      const throttled = responses.filter((r) => r.status === 429);
      assert.equal(throttled.length, 1, responses.map((r) => r.status).join(","));
      const error = graphError(throttled[0]!, 429, "ApplicationThrottled");
      assert.equal(error.message, "Application is over its MailboxConcurrency limit.");
      assert.equal(throttled[0]!.headers.get("retry-after"), "1");
      assert.equal(responses.filter((r) => r.status === 202).length, 4);
      assert.equal(graph.maxInFlight[MAILBOX], 5);
      assert.equal(graph.messages.length, 4);
    });

    it("four at once are fine; another mailbox has its own budget", async () => {
      graph.setLatency(200);
      const responses = await Promise.all([
        ...Array.from({ length: 4 }, async () => sendMime(await simple())),
        sendMime(await simple({ from: OTHER_MAILBOX }), { mailbox: OTHER_MAILBOX }),
      ]);
      assert.deepEqual(responses.map((r) => r.status), [202, 202, 202, 202, 202]);
      assert.equal(graph.maxInFlight[MAILBOX], 4);
      assert.equal(graph.maxInFlight[OTHER_MAILBOX], 1);
    });

    it("failNext: Graph's default 503 and 429 bodies with Retry-After, a custom answer, then normal service", async () => {
      const raw = await simple();
      graph.failNext(1, 503);
      graph.failNext(1, 429);
      graph.failNext(1, 504, { error: { code: "UnknownError", message: "" } }, { "retry-after": "3" });
      const unavailable = await sendMime(raw);
      assert.equal(unavailable.status, 503);
      assert.equal(unavailable.json.error?.code, "serviceNotAvailable");
      assert.equal(unavailable.headers.get("retry-after"), "1");
      const tooMany = await sendMime(raw);
      assert.equal(tooMany.status, 429);
      assert.equal(tooMany.json.error?.code, "TooManyRequests");
      assert.equal(tooMany.headers.get("retry-after"), "1");
      const custom = await sendMime(raw);
      assert.equal(custom.status, 504);
      assert.equal(custom.headers.get("retry-after"), "3");
      assert.equal((await sendMime(raw)).status, 202);
      assert.deepEqual(graph.requests.map((r) => r.status), [503, 429, 504, 202]);
      assert.equal(graph.messages.length, 1);
    });

    it("throttle(mailbox) answers that mailbox's next requests with 429 and the given Retry-After", async () => {
      graph.throttle(MAILBOX, { retryAfterSeconds: 7, count: 1, limit: "IncomingBytes" });
      const throttled = await sendMime(await simple());
      const error = graphError(throttled, 429, "ApplicationThrottled");
      assert.equal(error.message, "Application is over its IncomingBytes limit.");
      assert.equal(throttled.headers.get("retry-after"), "7");
      assert.equal((await sendMime(await simple())).status, 202);
    });

    it("waitForMessages fails after its time limit instead of hanging", async () => {
      const started = Date.now();
      await assert.rejects(graph.waitForMessages(1, 100), /timed out after 100 ms waiting for 1 message/);
      assert.ok(Date.now() - started < 1_000);
    });
  });

  it("close() returns promptly with a request in flight and a kept-alive connection", async () => {
    const ca = ensureCertificateAuthority(".test-ca");
    const tls = issueCertificate({ commonName: "localhost", hosts: ["127.0.0.1"] }, ca);
    const own = await startGraphMailServer({ tls: { key: tls.privateKeyPem, cert: tls.certificatePem }, mailboxes: [MAILBOX], verifyToken: async () => ({ ok: true }), latencyMs: 10_000 });
    const pending = fetch(`${own.url}${users()}/sendMail`, { method: "POST", headers: { authorization: "Bearer x", "content-type": "text/plain" }, body: (await simple()).toString("base64") });
    await within(
      (async () => {
        while (own.maxInFlight[MAILBOX] !== 1) await new Promise((resolve) => setTimeout(resolve, 10));
      })(),
      2_000,
      "the request to arrive",
    );
    const started = Date.now();
    await within(own.close(), 2_000, "close()");
    assert.ok(Date.now() - started < 1_000, `close took ${Date.now() - started} ms`);
    await assert.rejects(pending);
  });
});
