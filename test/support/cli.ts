// The queue-mailer command for tests that run it as a separate process, from the TypeScript
// sources. Not through bin/queue-mailer.js: the bin runs dist/ whenever it exists, and `npm test`
// does not build, so a test through the bin would run whatever was compiled last.
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";

/**
 * argv that runs cli/main.ts: `[node, "--import", <tsx loader>, <cli/main.ts>]`, all absolute, so
 * that it works from any cwd (a bare `--import tsx` is resolved from the cwd and fails in a temp
 * directory).
 */
export const cliEntry: string[] = [process.execPath, "--import", import.meta.resolve("tsx"), fileURLToPath(new URL("../../cli/main.ts", import.meta.url))];

const shiftClock = import.meta.resolve("./shiftClock.ts");

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs `queue-mailer <args>` and collects its output. The child sees only PATH and `env`, so
 * settings from the outer environment cannot leak in. A child still running after `timeoutMs` is
 * killed and the promise rejects, naming the command and what it printed.
 */
export function spawnCli(args: string[], options: { env?: Record<string, string>; cwd?: string; timeoutMs?: number } = {}): Promise<CliResult> {
  const [node = process.execPath, ...nodeArgs] = cliEntry;
  const env: Record<string, string> = { PATH: process.env["PATH"] ?? "", ...options.env };
  // A test run on a fake clock runs the CLI on the same clock: tests issue certificates here and
  // the CLI reads their days left (and talks TLS to the doubles) there.
  const fakeNow = process.env["QM_FAKE_NOW"];
  if (fakeNow !== undefined && fakeNow !== "") {
    // test/support/shiftClock.ts, after tsx's --import (which loads it), continuing from this
    // process's shifted "now".
    nodeArgs.splice(2, 0, "--import", shiftClock);
    env["QM_FAKE_NOW"] = new Date().toISOString();
  }
  if (process.env["FAKETIME"] !== undefined) {
    // libfaketime (`faketime` command): LD_PRELOAD and its settings, shared memory included.
    for (const [key, value] of Object.entries(process.env)) if ((key === "LD_PRELOAD" || key.startsWith("FAKETIME")) && value !== undefined) env[key] = value;
  }
  const timeoutMs = options.timeoutMs ?? 60_000;
  return new Promise((resolve, reject) => {
    const child = spawn(node, [...nodeArgs, ...args], { cwd: options.cwd, env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
    child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`queue-mailer ${args.join(" ")} did not exit within ${timeoutMs} ms and was killed\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    child.on("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on("close", (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
  });
}

export interface RunningCli {
  /** The first stdout line matching `match`, once printed; fails if the process ends first or after 20 s. */
  line(match: RegExp, what: string): Promise<string>;
  /** Everything printed so far. */
  output(): { stdout: string; stderr: string };
  /** The end of the process (killed after `timeoutMs`). */
  done: Promise<CliResult>;
}

/**
 * Starts `queue-mailer <args>` and lets the test read its output while it runs (a command that
 * waits for something the test does, such as `authorize`). Same environment rules as spawnCli.
 */
export function startCli(args: string[], options: { env?: Record<string, string>; timeoutMs?: number } = {}): RunningCli {
  const [node = process.execPath, ...nodeArgs] = cliEntry;
  const child = spawn(node, [...nodeArgs, ...args], { env: { PATH: process.env["PATH"] ?? "", ...options.env }, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  const waiters: Array<() => void> = [];
  child.stdout.on("data", (chunk: Buffer) => {
    stdout += chunk.toString();
    waiters.splice(0).forEach((wake) => wake());
  });
  child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  const timer = setTimeout(() => child.kill("SIGKILL"), options.timeoutMs ?? 60_000);
  const done = new Promise<CliResult>((resolve) =>
    child.on("close", (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    }),
  );
  return {
    done,
    output: () => ({ stdout, stderr }),
    line(match, what) {
      const printed = new Promise<string>((resolve) => {
        const check = () => {
          const line = stdout.split("\n").find((l) => match.test(l));
          if (line !== undefined) resolve(line);
          else waiters.push(check);
        };
        check();
      });
      const ended = done.then((result) => {
        throw new Error(`queue-mailer ${args.join(" ")} exited (${result.status}) before printing ${what}:\n${result.stdout}\n${result.stderr}`);
      });
      let timeout: NodeJS.Timeout | undefined;
      const late = new Promise<never>((_, reject) => {
        timeout = setTimeout(() => reject(new Error(`queue-mailer ${args.join(" ")} printed no ${what} within 20 s:\n${stdout}\n${stderr}`)), 20_000);
      });
      return Promise.race([printed, ended, late]).finally(() => clearTimeout(timeout));
    },
  };
}
