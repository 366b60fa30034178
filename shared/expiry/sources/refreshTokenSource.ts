// The delegated sign-in (AUTH_METHOD=refresh-token) as an expiring credential. A refresh token has
// no end date of its own that the client can read; what ends it is inactivity: Microsoft's refresh
// tokens last 90 days from their last use, and each redemption hands out a new one (which the
// sender stores). So a mailbox that sends nothing for 90 days loses its grant, and someone has to
// run `queue-mailer authorize` again. The item's expiresOn is the last rotation (the stored
// token's date: the Key Vault version's creation, or the file's rotatedAt) plus that limit, and the
// usual EXPIRY_WARN_DAYS thresholds warn before it.
//
// Google's refresh tokens do not rotate and end after six months without use (or when the user
// or an admin revokes them): for a Google token endpoint the limit is 180 days from the sign-in,
// which a sender that uses the token never reaches; only the token's use resets it.
import type { TokenCredential } from "@azure/identity";
import { refreshTokenStoreFor, type StoredRefreshToken } from "../../auth/refreshTokenStore.js";
import type { RefreshTokenLocation } from "../../config.js";
import { toMailerError } from "../../errors.js";
import { errorFinding, type ExpiryFinding } from "../finding.js";
import type { ExpirySource } from "./source.js";

/** Microsoft: a refresh token unused for 90 days no longer works. */
export const MICROSOFT_REFRESH_TOKEN_INACTIVITY_DAYS = 90;
/** Google: a refresh token unused for six months no longer works. */
export const GOOGLE_REFRESH_TOKEN_INACTIVITY_DAYS = 180;
const DAY_MS = 86_400_000;

const isGoogle = (tokenUrl: string | undefined) => tokenUrl !== undefined && /(^|\.)(google|googleapis)\.com$/i.test(URL.parse(tokenUrl)?.hostname ?? "");

export function refreshTokenSource(location: RefreshTokenLocation, options: { tokenUrl?: string; credential?: TokenCredential } = {}): ExpirySource {
  const store = refreshTokenStoreFor(location, options.credential ? { credential: options.credential } : {});
  const google = isGoogle(options.tokenUrl);
  const limitDays = google ? GOOGLE_REFRESH_TOKEN_INACTIVITY_DAYS : MICROSOFT_REFRESH_TOKEN_INACTIVITY_DAYS;
  const provider = google ? "Google" : "Microsoft";
  const label = `Delegated sign-in (refresh token in ${store.setting})`;
  return {
    name: "refresh-token",
    async list() {
      let stored: StoredRefreshToken;
      try {
        stored = await store.read();
      } catch (error) {
        const failure = toMailerError(error);
        const finding: ExpiryFinding = errorFinding(`refresh-token:${store.where}`, label, "refresh-token", store.where, `${failure.code}: ${failure.message}`, failure.hint ?? "Check the setting and that this identity may read it.");
        return { items: [], errors: [finding] };
      }
      if (!stored.rotatedAt) {
        const notice: ExpiryFinding = {
          key: `refresh-token:${store.where}`,
          name: label,
          kind: "refresh-token",
          source: store.where,
          enabled: true,
          inUse: true,
          status: "unchecked",
          detail: "the stored refresh token carries no date, so its inactivity limit cannot be counted",
          action: "Run `queue-mailer authorize` once to store a dated token.",
        };
        return { items: [], errors: [], notices: [notice] };
      }
      const ageDays = Math.floor((Date.now() - stored.rotatedAt.getTime()) / DAY_MS);
      const who = stored.user ?? "the mailbox user";
      const what = google ? "signed in" : "last rotated";
      return {
        items: [
          {
            // A rotation is a new item: the old one's alerts stop by themselves.
            key: `refresh-token:${store.where}:${stored.rotatedAt.toISOString()}`,
            name: `Delegated sign-in of ${who} (refresh token in ${store.setting}, ${what} ${stored.rotatedAt.toISOString().slice(0, 10)}, ${ageDays} days ago; ${provider} ends it after ${limitDays} days unused)`,
            kind: "refresh-token",
            source: store.where,
            expiresOn: new Date(stored.rotatedAt.getTime() + limitDays * DAY_MS),
            enabled: true,
            inUse: true,
          },
        ],
        errors: [],
      };
    },
  };
}
