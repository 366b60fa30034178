// `queue-mailer authorize [--device-code] [--timeout SECONDS]`: a user signs in once, from the
// operator's machine, and the refresh token the sender lives on from then on is stored where
// REFRESH_TOKEN_NAME or REFRESH_TOKEN_PATH says (AUTH_METHOD=refresh-token; docs/auth-refresh-token.md).
//
// Browser (default): the authorization code grant with PKCE (S256) and `state` (RFC 6749 4.1,
// RFC 7636, RFC 8252 for the loopback redirect). A listener on http://localhost:<port>/ (a free
// port, or AUTHORIZE_REDIRECT_PORT) receives the redirect; the URL to open is printed on a line of
// its own. The listener is closed when the command ends, whatever the outcome.
// --device-code: the device authorization grant (RFC 8628) for a machine without a browser: the
// code and the verification URL are printed, and the token endpoint is polled at the server's
// interval, 5 s slower after each slow_down.
//
// Printed: the URL or code, who signed in (from the ID token, or the access token's claims) and
// where the refresh token was stored. Never a token, the code or the PKCE verifier: they are
// registered with redact() as soon as they exist, and nothing here prints them.
import { createHash, randomBytes } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { parseArgs } from "node:util";
import { clientSecretAuthentication } from "../shared/auth/clientAuthentication.js";
import { refreshTokenStoreFor, type RefreshTokenStore } from "../shared/auth/refreshTokenStore.js";
import { secretSourceFor } from "../shared/auth/secretSource.js";
import { loadAuthorizeConfig, readSettings, type AuthorizeConfig, type Env } from "../shared/config.js";
import { MailerError, toMailerError } from "../shared/errors.js";
import { silentLogger } from "../shared/log.js";
import { redact, registerSecret } from "../shared/redact.js";
import { tokenNetworkError, tokenResponseError } from "../shared/token/tokenErrors.js";

export const authorizeUsage = "queue-mailer authorize [--device-code] [--timeout SECONDS]";

/** The issue's limit on waiting for the user: 5 minutes. */
const DEFAULT_TIMEOUT_SECONDS = 300;
const DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code";
/** Asked for besides TOKEN_SCOPE, so that the answer says who signed in (ID token). */
const IDENTITY_SCOPES = ["openid", "profile", "email"];

type Auth = AuthorizeConfig["auth"];
type Print = (line: string) => void;

interface TokenAnswer {
  access_token?: unknown;
  refresh_token?: unknown;
  id_token?: unknown;
  scope?: unknown;
  [key: string]: unknown;
}

const isGoogle = (url: string) => /(^|\.)google\.com$/i.test(safeHost(url)) || /(^|\.)googleapis\.com$/i.test(safeHost(url));

function safeHost(url: string): string {
  try {
    return new URL(url).hostname;
  } catch {
    return "";
  }
}

/** TOKEN_SCOPE plus openid/profile/email, each once. */
function signInScope(auth: Auth): string {
  return [...new Set([...auth.scope.split(" ").filter(Boolean), ...IDENTITY_SCOPES])].join(" ");
}

/** client_id, and the secret of a confidential client as CLIENT_AUTH says. */
async function clientAuthentication(auth: Auth): Promise<{ form: Record<string, string>; headers?: Record<string, string> }> {
  if (!auth.clientSecret) return { form: { client_id: auth.clientId } };
  const secret = await secretSourceFor(auth.clientSecret, "client secret", silentLogger).load();
  return clientSecretAuthentication(auth.clientId, secret.value, auth.clientAuth);
}

/** One form POST to an OAuth endpoint: status and parsed JSON (or the text when it is not JSON). */
async function postForm(url: string, form: Record<string, string>, headers: Record<string, string> = {}): Promise<{ status: number; body: Record<string, unknown>; text: string; retryAfter: string | null }> {
  let response: Response;
  let text: string;
  try {
    response = await fetch(url, {
      method: "POST",
      headers: { ...headers, "content-type": "application/x-www-form-urlencoded", accept: "application/json" },
      body: new URLSearchParams(form),
      signal: AbortSignal.timeout(15_000),
    });
    text = await response.text();
  } catch (error) {
    throw tokenNetworkError(error, url);
  }
  let body: Record<string, unknown> = {};
  try {
    const json: unknown = JSON.parse(text);
    if (json !== null && typeof json === "object") body = json as Record<string, unknown>;
  } catch {
    // Not JSON: a proxy's page, say. The status decides.
  }
  return { status: response.status, body, text, retryAfter: response.headers.get("retry-after") };
}

/** The claims of a JWT, unverified (only to say who signed in), or undefined for an opaque token. */
function claimsOf(token: unknown): Record<string, unknown> | undefined {
  if (typeof token !== "string") return undefined;
  const [, payload] = token.split(".");
  if (!payload) return undefined;
  try {
    const claims: unknown = JSON.parse(Buffer.from(payload, "base64url").toString("utf8"));
    return claims !== null && typeof claims === "object" ? (claims as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

/** Who signed in: the ID token's claims first (meant for the client), else the access token's. */
function signedInUser(answer: TokenAnswer): string | undefined {
  for (const claims of [claimsOf(answer.id_token), claimsOf(answer.access_token)]) {
    for (const name of ["preferred_username", "upn", "email", "unique_name"]) {
      const value = claims?.[name];
      if (typeof value === "string" && value.includes("@")) return value;
    }
  }
  return undefined;
}

/** What an error answer at the redirect or the token endpoint means for the person running this. */
function signInError(error: string, description: string | undefined, where: string): MailerError {
  const said = redact(`${error}${description ? `: ${description}` : ""}`);
  const hints: Record<string, string> = {
    access_denied: "The sign-in was cancelled or consent was declined. Run `queue-mailer authorize` again and accept the permissions; if the page said an administrator must approve the app, ask an admin to grant consent (Entra: App registrations > API permissions > Grant admin consent for SMTP.Send, delegated).",
    authorization_declined: "The user declined the sign-in on the device page. Run `queue-mailer authorize --device-code` again and approve it.",
    expired_token: "The device code expired before the sign-in finished. Run `queue-mailer authorize --device-code` again and enter the new code within the time shown.",
    invalid_scope: "The server refused the scope: check TOKEN_SCOPE (Microsoft: https://outlook.office365.com/SMTP.Send offline_access; Google: https://mail.google.com/).",
    unauthorized_client: "The app registration may not use this flow: for Microsoft add the platform \"Mobile and desktop applications\" with the redirect URI http://localhost (and, for --device-code, turn on \"Allow public client flows\"); for Google use an OAuth client of type \"Desktop app\".",
    invalid_client: "The server does not know this client or refused its credential: check CLIENT_ID, and CLIENT_SECRET with CLIENT_AUTH for a confidential client.",
    invalid_grant: "The authorization code was refused (expired, already used, or issued for another redirect or PKCE verifier). Run `queue-mailer authorize` again and finish the sign-in within a few minutes.",
  };
  return new MailerError(`AUTHORIZE_${error.toUpperCase().replace(/[^A-Z0-9]+/g, "_")}`, `${where} answered ${said}`, {
    kind: error === "invalid_client" || error === "unauthorized_client" || error === "invalid_scope" ? "config" : "permanent",
    hint: hints[error] ?? "Run `queue-mailer authorize` again; if it keeps failing, check CLIENT_ID, TENANT_ID (or AUTHORIZE_URL and TOKEN_URL) and TOKEN_SCOPE.",
  });
}

/** A token endpoint refusal: the OAuth error word decides the advice, the code stays the server's. */
function tokenEndpointError(result: { status: number; text: string; retryAfter: string | null; body: Record<string, unknown> }, tokenUrl: string): MailerError {
  const error = typeof result.body["error"] === "string" ? result.body["error"] : undefined;
  const classified = tokenResponseError(result.status, result.text, result.retryAfter, tokenUrl);
  if (error === undefined || classified.kind === "transient") return classified;
  const advice = signInError(error, undefined, tokenUrl);
  return new MailerError(classified.code, classified.message, { kind: advice.kind, ...(classified.response === undefined ? {} : { response: classified.response }), hint: advice.hint ?? classified.hint ?? "" });
}

const page = (title: string, text: string) =>
  `<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>${title}</title></head><body><h1>${title}</h1><p>${text}</p></body></html>`;

/** Listens on http://localhost:<port>/ (IPv4 and, where there is one, IPv6 loopback). */
async function loopbackListener(port: number, onRequest: (req: IncomingMessage, res: ServerResponse) => void): Promise<{ port: number; close(): Promise<void> }> {
  const servers: Server[] = [];
  const listen = (host: string, wanted: number) =>
    new Promise<Server>((resolve, reject) => {
      const server = createServer(onRequest);
      server.once("error", reject);
      server.listen(wanted, host, () => resolve(server));
    });
  try {
    servers.push(await listen("127.0.0.1", port));
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new MailerError("AUTHORIZE_PORT_UNAVAILABLE", `cannot listen on 127.0.0.1:${port} for the sign-in redirect: ${code ?? (error as Error).message}`, {
      kind: "config",
      hint: "Set AUTHORIZE_REDIRECT_PORT to a free port, or leave it empty for any free one.",
    });
  }
  const bound = (servers[0]!.address() as AddressInfo).port;
  // "localhost" may resolve to ::1 first; take the same port there when the machine has IPv6.
  await listen("::1", bound).then((server) => servers.push(server), () => undefined);
  return {
    port: bound,
    async close() {
      await Promise.all(servers.map((server) => new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      })));
    },
  };
}

/** Browser sign-in: resolves with the code once the redirect carries it (and the right state). */
async function browserSignIn(auth: Auth, redirectPort: number, deadline: number, print: Print): Promise<{ code: string; redirectUri: string; verifier: string }> {
  const verifier = randomBytes(32).toString("base64url");
  registerSecret(verifier);
  const challenge = createHash("sha256").update(verifier).digest("base64url");
  const state = randomBytes(16).toString("base64url");
  let settle: { resolve(code: string): void; reject(error: MailerError): void } | undefined;
  const outcome = new Promise<string>((resolve, reject) => (settle = { resolve, reject }));
  let done = false;
  const listener = await loopbackListener(redirectPort, (req, res) => {
    const url = new URL(req.url ?? "/", "http://localhost");
    // Browsers also ask for /favicon.ico and the like: only the redirect itself counts.
    if (req.method !== "GET" || url.pathname !== "/" || (!url.searchParams.has("code") && !url.searchParams.has("error"))) {
      res.writeHead(404, { "content-type": "text/plain" }).end("Not found");
      return;
    }
    if (done) {
      res.writeHead(409, { "content-type": "text/html; charset=utf-8" }).end(page("Already done", "This sign-in has already been handled. You can close this window."));
      return;
    }
    const code = url.searchParams.get("code");
    if (code) registerSecret(code);
    if (url.searchParams.get("state") !== state) {
      // Not the answer to our request (a stale tab, or a forged redirect): refuse it.
      done = true;
      res.writeHead(400, { "content-type": "text/html; charset=utf-8" }).end(page("Sign-in refused", "The answer does not belong to this sign-in (state mismatch). Run queue-mailer authorize again."));
      settle?.reject(new MailerError("AUTHORIZE_STATE_MISMATCH", "the redirect's state does not match the sign-in request (a stale browser tab, or a redirect this command did not ask for); nothing was stored", { kind: "permanent", hint: "Run `queue-mailer authorize` again and use the URL it prints, in one browser tab." }));
      return;
    }
    done = true;
    const error = url.searchParams.get("error");
    if (error) {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end(page("Sign-in failed", "The sign-in did not complete; the command line says why. You can close this window."));
      settle?.reject(signInError(error, url.searchParams.get("error_description") ?? undefined, "the sign-in"));
      return;
    }
    res.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end(page("Signed in", "queue-mailer received the sign-in. You can close this window and return to the command line."));
    settle?.resolve(code ?? "");
  });
  const redirectUri = `http://localhost:${listener.port}/`;
  try {
    const url = new URL(auth.authorizeUrl);
    const params: Record<string, string> = {
      client_id: auth.clientId,
      response_type: "code",
      redirect_uri: redirectUri,
      response_mode: "query",
      scope: signInScope(auth),
      state,
      code_challenge: challenge,
      code_challenge_method: "S256",
      ...(auth.username ? { login_hint: auth.username } : {}),
      // Google issues a refresh token only for offline access, and again only when consent is asked.
      ...(isGoogle(auth.authorizeUrl) ? { access_type: "offline", prompt: "consent" } : {}),
    };
    for (const [name, value] of Object.entries(params)) url.searchParams.set(name, value);
    print(`Sign in${auth.username ? ` as ${auth.username}` : " as the mailbox user"} in a browser on this machine. Open this URL:`);
    print("");
    print(url.href);
    print("");
    print(`Waiting up to ${Math.round((deadline - Date.now()) / 1000)} s for the sign-in to come back to ${redirectUri} …`);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new MailerError("AUTHORIZE_TIMEOUT", `no sign-in came back to ${redirectUri} in time; nothing was stored`, { kind: "transient", hint: "Run `queue-mailer authorize` again and finish the sign-in in the browser within the time shown (on a machine without a browser: --device-code)." })), Math.max(0, deadline - Date.now()));
    });
    try {
      const code = await Promise.race([outcome, timeout]);
      return { code, redirectUri, verifier };
    } finally {
      clearTimeout(timer);
    }
  } finally {
    await listener.close();
  }
}

async function redeemCode(auth: Auth, signIn: { code: string; redirectUri: string; verifier: string }): Promise<TokenAnswer> {
  const client = await clientAuthentication(auth);
  const result = await postForm(auth.tokenUrl, { grant_type: "authorization_code", ...client.form, code: signIn.code, redirect_uri: signIn.redirectUri, code_verifier: signIn.verifier }, client.headers);
  if (result.status !== 200) throw tokenEndpointError(result, auth.tokenUrl);
  return result.body as TokenAnswer;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Device flow: prints the code, then polls until the user has signed in (or it ends). */
async function deviceSignIn(auth: Auth, deadline: number, print: Print): Promise<TokenAnswer> {
  const client = await clientAuthentication(auth);
  const started = await postForm(auth.deviceCodeUrl, { ...client.form, scope: signInScope(auth) }, client.headers);
  const body = started.body;
  if (started.status !== 200 || typeof body["device_code"] !== "string" || typeof body["user_code"] !== "string") {
    const error = typeof body["error"] === "string" ? body["error"] : undefined;
    if (error) throw signInError(error, typeof body["error_description"] === "string" ? body["error_description"] : undefined, auth.deviceCodeUrl);
    throw new MailerError("AUTHORIZE_DEVICE_CODE_FAILED", `${auth.deviceCodeUrl} answered ${started.status} without a device code`, { kind: started.status >= 500 ? "transient" : "config", hint: "Check DEVICE_CODE_URL (Microsoft: .../oauth2/v2.0/devicecode; Google: https://oauth2.googleapis.com/device/code)." });
  }
  const deviceCode = body["device_code"];
  registerSecret(deviceCode);
  // RFC 8628 says verification_uri; Google says verification_url.
  const verificationUri = String(body["verification_uri"] ?? body["verification_url"] ?? "");
  const expiresIn = Number(body["expires_in"]);
  let intervalMs = (Number.isFinite(Number(body["interval"])) && Number(body["interval"]) > 0 ? Number(body["interval"]) : 5) * 1000;
  const end = Math.min(deadline, Date.now() + (Number.isFinite(expiresIn) && expiresIn > 0 ? expiresIn * 1000 : DEFAULT_TIMEOUT_SECONDS * 1000));
  print(`Sign in${auth.username ? ` as ${auth.username}` : " as the mailbox user"} from any device with a browser. Open:`);
  print("");
  print(verificationUri);
  print("");
  print(`and enter the code: ${body["user_code"]}`);
  print("");
  print(`Waiting up to ${Math.round((end - Date.now()) / 1000)} s for the sign-in …`);
  for (;;) {
    // Always one interval before each poll (RFC 8628 3.5), the first one included.
    if (Date.now() + intervalMs > end) {
      throw new MailerError("AUTHORIZE_TIMEOUT", "the device code expired before the sign-in finished; nothing was stored", { kind: "transient", hint: "Run `queue-mailer authorize --device-code` again and enter the new code within the time shown." });
    }
    await sleep(intervalMs);
    let result: Awaited<ReturnType<typeof postForm>>;
    try {
      result = await postForm(auth.tokenUrl, { grant_type: DEVICE_GRANT, ...client.form, device_code: deviceCode }, client.headers);
    } catch (error) {
      // The network failed on one poll: the device code is still good, keep going.
      print(`(the token endpoint could not be reached: ${toMailerError(error).message}; still waiting)`);
      continue;
    }
    if (result.status === 200) return result.body as TokenAnswer;
    const error = result.body["error"];
    if (error === "authorization_pending") continue;
    if (error === "slow_down") {
      intervalMs += 5_000;
      continue;
    }
    if (result.status >= 500 || result.status === 429) continue;
    throw tokenEndpointError(result, auth.tokenUrl);
  }
}

/** Stores the new refresh token, trying again twice if the store fails (the token exists nowhere else). */
async function store(storeAt: RefreshTokenStore, token: { token: string; user?: string; authorizedAt: Date }): Promise<{ version?: string }> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await storeAt.write(token);
    } catch (error) {
      const failure = toMailerError(error);
      if (attempt >= 3 || failure.kind === "config") {
        throw new MailerError(failure.code, `the sign-in worked but the refresh token could not be stored in ${storeAt.setting} (${storeAt.where}): ${failure.message}`, {
          kind: failure.kind,
          hint: `${failure.hint ? `${failure.hint} ` : ""}Fix that, then run \`queue-mailer authorize\` again: the token from this sign-in is discarded, never printed.`,
        });
      }
      await sleep(1000 * attempt);
    }
  }
}

export async function authorizeCommand(args: string[], settings: () => Env = () => readSettings(), print: Print = (line) => process.stdout.write(`${line}\n`)): Promise<number> {
  let values: { "device-code"?: boolean; timeout?: string };
  try {
    ({ values } = parseArgs({ args, options: { "device-code": { type: "boolean" }, timeout: { type: "string" } }, strict: true, allowPositionals: false }));
  } catch (error) {
    process.stderr.write(`queue-mailer authorize: ${(error as Error).message}\nUsage: ${authorizeUsage}\n`);
    return 2;
  }
  const timeoutSeconds = values.timeout === undefined ? DEFAULT_TIMEOUT_SECONDS : Number(values.timeout);
  if (!Number.isInteger(timeoutSeconds) || timeoutSeconds < 1) {
    process.stderr.write(`queue-mailer authorize: --timeout needs a whole number of seconds, got "${values.timeout}"\nUsage: ${authorizeUsage}\n`);
    return 2;
  }
  const deviceFlow = values["device-code"] === true;
  const { auth, redirectPort } = loadAuthorizeConfig(settings(), deviceFlow ? "device" : "browser");
  const storeAt = refreshTokenStoreFor(auth.refreshToken);
  const deadline = Date.now() + timeoutSeconds * 1000;

  const answer = deviceFlow ? await deviceSignIn(auth, deadline, print) : await redeemCode(auth, await browserSignIn(auth, redirectPort, deadline, print));
  for (const name of ["access_token", "refresh_token", "id_token"]) {
    const value = answer[name];
    if (typeof value === "string") registerSecret(value);
  }
  const refreshToken = answer.refresh_token;
  if (typeof refreshToken !== "string" || refreshToken.length === 0) {
    throw new MailerError("AUTHORIZE_NO_REFRESH_TOKEN", "the sign-in worked but the server issued no refresh token; nothing was stored", {
      kind: "config",
      hint: isGoogle(auth.tokenUrl)
        ? "Google issues a refresh token only with consent for offline access: remove the app's access at https://myaccount.google.com/permissions and run `queue-mailer authorize` again."
        : "TOKEN_SCOPE must include offline_access (the default is https://outlook.office365.com/SMTP.Send offline_access).",
    });
  }
  const user = signedInUser(answer);
  if (auth.username && user && user.toLowerCase() !== auth.username.toLowerCase()) {
    throw new MailerError("AUTHORIZE_WRONG_USER", `${user} signed in, but SMTP_USER is ${auth.username}; nothing was stored`, {
      kind: "permanent",
      hint: `A delegated token sends only as the user who signed in. Run \`queue-mailer authorize\` again and sign in as ${auth.username}, or set SMTP_USER=${user} if that is the mailbox to send from.`,
    });
  }
  const authorizedAt = new Date();
  const { version } = await store(storeAt, { token: refreshToken, ...(user ? { user } : {}), authorizedAt });
  const granted = typeof answer.scope === "string" ? answer.scope : undefined;
  print("");
  print(`Signed in as ${user ?? "(the server did not say who: no ID token or user claims)"}${granted ? `; granted: ${granted}` : ""}.`);
  print(`Refresh token stored in ${storeAt.setting} ${storeAt.where}${version ? ` (version ${version})` : ""}.`);
  print("The sender redeems it from now on and stores each rotated one in the same place.");
  return 0;
}
