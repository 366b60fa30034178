// `queue-mailer doctor`: walks the setup in the order the sender meets it and names the first
// broken step with its fix. Every check that can run does: storage does not wait for the
// credential, DNS does not wait for SMTP; a step that needs an earlier one (a token needs a readable
// credential) says so instead. It never takes, changes or sends queue messages, and sends mail only
// for `sendTest`.
import { loadExpiryConfig, loadStorageConfig, settingSpecs, type Env } from "../config.js";
import { GOOGLE_TOKEN_URL } from "../auth/googleServiceAccountCredential.js";
import { silentLogger, type Logger } from "../log.js";
import { ConfigError } from "../errors.js";
import { fail, skip, type Check, type DoctorReport } from "./check.js";
import { loadCredentialMaterial, type MaterialOutcome } from "./credentialMaterial.js";
import { credentialStep, type ExpiryThresholds } from "./credentialStep.js";
import { dnsSteps } from "./dnsStep.js";
import { fixContextFor, type FixContext } from "./fixes.js";
import { keyVaultStep } from "./keyVaultStep.js";
import { sendTestStep } from "./sendTestStep.js";
import { settingsStep } from "./settingsStep.js";
import { storageStep } from "./storageStep.js";
import { tokenContentsStep } from "./tokenContentsStep.js";
import { tokenStep, type TokenResult } from "./tokenStep.js";
import { transportStep } from "./transportStep.js";

export interface DoctorOptions {
  /** Send one test message to this address (step send-test). */
  sendTest?: string;
  /** Check SPF, DKIM and DMARC of the From domain. */
  dns?: boolean;
  /** The sources' own log records (certificate.loaded, token.acquired…); silent by default. */
  logger?: Logger;
  now?: () => Date;
}

/** No step may hang the doctor: each gets this long, then it is reported as failed. */
const STEP_TIMEOUT_MS = 90_000;

async function bounded<T>(step: Check["step"], work: Promise<T>, onTimeout: (check: Check) => T): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<T>((resolve) => {
    timer = setTimeout(() => resolve(onTimeout(fail(step, "DOCTOR_STEP_TIMEOUT", `no result within ${STEP_TIMEOUT_MS / 1000} s`, "Something on the way does not answer: run again; if it persists, check the network path to the server this step talks to."))), STEP_TIMEOUT_MS);
    timer.unref();
  });
  try {
    return await Promise.race([work, deadline]);
  } finally {
    clearTimeout(timer);
  }
}

/** EXPIRY_CRITICAL_DAYS and the earliest EXPIRY_WARN_DAYS, as the expiry watch reads them. */
function expiryThresholds(env: Env): ExpiryThresholds {
  try {
    const config = loadExpiryConfig(env);
    return { criticalDays: config.criticalDays, warnDays: config.warnDays[0] ?? config.criticalDays };
  } catch {
    // The watch may be unconfigured (nothing to watch); the thresholds still have their defaults.
    const declared = (name: string) => Number(env[name]?.trim() || settingSpecs.find((s) => s.name === name)?.default || "0");
    const warnDays = (env["EXPIRY_WARN_DAYS"]?.trim() || settingSpecs.find((s) => s.name === "EXPIRY_WARN_DAYS")?.default || "30").split(",").map(Number).filter(Number.isFinite);
    return { criticalDays: declared("EXPIRY_CRITICAL_DAYS"), warnDays: Math.max(0, ...warnDays) };
  }
}

export async function runDoctor(env: Env, options: DoctorOptions = {}): Promise<DoctorReport> {
  const logger = options.logger ?? silentLogger;
  const now = options.now ?? (() => new Date());
  const checks: Check[] = [];

  // 1. Settings.
  const settings = settingsStep(env);
  checks.push(settings.check);
  const config = settings.config;

  // 2. Storage: needs only the storage settings, so it runs even when the rest is incomplete.
  let storageCheck: Check;
  try {
    const storage = config?.storage ?? loadStorageConfig(env);
    storageCheck = await bounded("storage", storageStep(storage), (c) => c);
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    storageCheck = skip("storage", `not checked: ${error.settings.join(", ")} (step settings)`);
  }
  checks.push(storageCheck);

  if (!config) {
    const why = "not checked: the settings are incomplete (step settings)";
    for (const step of ["keyvault", "credential", "token", "token-contents", "transport"] as const) checks.push(skip(step, why));
    checks.push(skip("send-test", options.sendTest ? why : "not asked (--send-test ADDRESS)"));
    if (options.dns) for (const step of ["dns-spf", "dns-dkim", "dns-dmarc"] as const) checks.push(skip(step, "not checked: MAIL_FROM / SMTP_USER unknown (step settings)"));
    return report(checks);
  }

  const context: FixContext = fixContextFor(config);

  // 3 and 4. Key Vault, then the credential read through it (or from a setting or file).
  const outcome = await bounded<MaterialOutcome | { timedOut: Check }>("keyvault", loadCredentialMaterial(config.auth, logger), (c) => ({ timedOut: c }));
  if ("timedOut" in outcome) {
    checks.push(outcome.timedOut, skip("credential", "not checked: Key Vault / the credential did not answer (step keyvault)"));
  } else {
    checks.push(await keyVaultStep(config.auth, outcome, context));
    checks.push(credentialStep(outcome, expiryThresholds(env), context, now()));
  }
  const material = "timedOut" in outcome ? undefined : outcome.material;
  if (material?.method === "certificate") {
    const { x509, thumbprintSha1Hex, location } = material.certificate;
    context.certificate = { subject: x509.subject.replace(/\n/g, ", "), thumbprintSha1Hex, notAfter: new Date(x509.validTo), location };
  }
  if (material?.method === "google-service-account") {
    context.google = { ...(material.key.clientId ? { clientId: material.key.clientId } : {}), clientEmail: material.key.clientEmail };
    context.tokenUrl ??= material.key.tokenUri ?? GOOGLE_TOKEN_URL;
  }

  // 5. Token request: needs a credential that could be read.
  const credentialUsable = !checks.some((c) => (c.step === "keyvault" || c.step === "credential") && c.status === "fail" && c.code !== "CERT_EXPIRING" && c.code !== "SECRET_EXPIRING");
  const downstream = (reason: string) => {
    for (const step of ["token-contents", "transport"] as const) checks.push(skip(step, reason));
    checks.push(skip("send-test", options.sendTest ? reason : "not asked (--send-test ADDRESS)"));
  };
  if (!credentialUsable) {
    checks.push(skip("token", "not requested: the credential could not be read or is unusable (steps keyvault, credential)"));
    downstream("not checked: no token (step token)");
  } else {
    const token = await bounded<TokenResult | { check: Check; tokens?: undefined; token?: undefined }>("token", tokenStep(config, logger, context), (check) => ({ check }));
    checks.push(token.check);
    if (!token.token || !token.tokens) {
      downstream("not checked: no token (step token)");
    } else {
      // 6. What the token allows.
      const contents = tokenContentsStep(config, token.token, context, now());
      checks.push(contents.check);
      context.token = contents.token;
      if (!contents.transportMayWork) {
        downstream("not tried: the token cannot work for this transport (step token-contents)");
      } else {
        // 7. Transport, 8. the test message.
        const transport = await bounded("transport", transportStep(config, token.tokens, logger, context), (c) => c);
        checks.push(transport);
        if (!options.sendTest) checks.push(skip("send-test", "not asked (--send-test ADDRESS)"));
        else if (transport.status === "fail") checks.push(skip("send-test", "not sent: the transport failed (step transport)"));
        else checks.push(await bounded("send-test", sendTestStep(config, options.sendTest, logger, context), (c) => c));
      }
    }
  }

  // 9. DNS of the From domain: independent of everything above.
  if (options.dns) {
    const dns = await bounded("dns-spf", dnsSteps(config.mailFrom, config.auth.method, settings.dnsServers), (c) => [c]);
    checks.push(...dns);
  }
  return report(checks);
}

function report(checks: Check[]): DoctorReport {
  return { ok: checks.every((c) => c.status !== "fail"), checks };
}
