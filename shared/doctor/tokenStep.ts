// Step 5: one token request, exactly as the sender makes it (CredentialSource → TokenProvider), with
// the provider's refusal mapped to the setup step that is missing. For a refused time window
// (AADSTS700024, Google's "reasonable timeframe") the clock offset is measured against the token
// endpoint's own Date header, so the fix can say by how much this machine is off.
import { credentialSourceFor } from "../auth/credentialSource.js";
import type { SendConfig } from "../config.js";
import { toMailerError } from "../errors.js";
import type { Logger } from "../log.js";
import { TokenProvider, type AccessToken } from "../token/tokenProvider.js";
import { failed, pass, type Check } from "./check.js";
import type { FixContext } from "./fixes.js";

export interface TokenResult {
  check: Check;
  tokens: TokenProvider;
  /** Secret: only its claims may be shown. */
  token?: AccessToken;
}

/**
 * This machine's clock minus the server's, in whole seconds, from the Date header of any answer
 * at `url` (RFC 9110: every origin server with a clock sends one). Date has one-second resolution,
 * so the server's time is taken as the middle of its second, and ours as the middle of the request.
 */
export async function measureClockOffset(url: string, now: () => number = Date.now): Promise<number | undefined> {
  try {
    const started = now();
    const response = await fetch(url, { method: "HEAD", signal: AbortSignal.timeout(10_000) });
    const ended = now();
    const date = response.headers.get("date");
    const server = date === null ? Number.NaN : Date.parse(date);
    if (Number.isNaN(server)) return undefined;
    return Math.round(((started + ended) / 2 - (server + 500)) / 1000);
  } catch {
    return undefined;
  }
}

const CLOCK_CODES = /^TOKEN_AADSTS700024$/;

export async function tokenStep(config: SendConfig, logger: Logger, context: FixContext): Promise<TokenResult> {
  const credential = credentialSourceFor(config.auth, logger);
  const tokens = new TokenProvider({ credential, logger });
  const started = Date.now();
  try {
    const token = await tokens.getToken();
    const url = config.auth.tokenUrl ?? "the key's token_uri";
    return { check: pass("token", `token for ${config.auth.scope} from ${url} in ${Date.now() - started} ms`), tokens, token };
  } catch (error) {
    const failure = toMailerError(error);
    let clockOffsetSeconds: number | undefined;
    const tokenUrl = config.auth.tokenUrl ?? context.tokenUrl;
    if (tokenUrl && (CLOCK_CODES.test(failure.code) || /short-lived token|reasonable timeframe/i.test(failure.response ?? ""))) {
      clockOffsetSeconds = await measureClockOffset(tokenUrl);
    }
    const check = failed("token", failure, { ...context, ...(clockOffsetSeconds === undefined ? {} : { clockOffsetSeconds }) });
    if (clockOffsetSeconds !== undefined) check.message += ` [clock offset to the token endpoint: ${clockOffsetSeconds > 0 ? "+" : ""}${clockOffsetSeconds} s]`;
    return { check, tokens };
  }
}
