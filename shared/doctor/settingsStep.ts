// Step 1: the settings are complete and consistent for the chosen AUTH_METHOD and TRANSPORT: the
// same start-up check the function and the worker make (loadSendConfig), plus DNS_SERVERS.
import { loadDnsServers, loadSendConfig, type Env, type SendConfig } from "../config.js";
import { ConfigError } from "../errors.js";
import { fail, pass, warn, type Check } from "./check.js";

export interface SettingsResult {
  check: Check;
  config: SendConfig | undefined;
  dnsServers: string[];
}

/** The problems of a ConfigError, one per line, as its message lists them. */
function problemsOf(error: ConfigError): string[] {
  return error.message.split("\n").slice(1).map((line) => line.replace(/^\s*-\s*/, ""));
}

function attempt<T>(load: () => T, problems: string[], settings: string[]): T | undefined {
  try {
    return load();
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    problems.push(...problemsOf(error));
    settings.push(...error.settings);
    return undefined;
  }
}

export function settingsStep(env: Env): SettingsResult {
  const problems: string[] = [];
  const settings: string[] = [];
  const config = attempt(() => loadSendConfig(env), problems, settings);
  const dnsServers = attempt(() => loadDnsServers(env), problems, settings) ?? [];
  if (problems.length > 0 || config === undefined) {
    const named = [...new Set(settings)];
    return {
      check: fail("settings", "CONFIG_INVALID", `${named.length} setting(s) missing or invalid: ${named.join(", ")}`, problems.join("\n")),
      config,
      dnsServers,
    };
  }
  const summary = `complete for AUTH_METHOD=${config.auth.method}, TRANSPORT=${config.transport}, mailbox ${config.smtp.user}${config.mailFrom !== config.smtp.user ? `, From ${config.mailFrom}` : ""}`;
  if (config.auth.method === "password") {
    // Works today, but is the method most likely to break without any change on our side.
    return {
      check: warn("settings", "AUTH_PASSWORD_DEPRECATED", `${summary}; the password grant cannot do MFA, so Conditional Access or Security Defaults on the mailbox account break it`, "Move to AUTH_METHOD=certificate (app-only: SMTP.SendAsApp plus the mailbox grant in Exchange); see docs/auth-password.md."),
      config,
      dnsServers,
    };
  }
  return { check: pass("settings", summary), config, dnsServers };
}
