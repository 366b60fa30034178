// What every `queue-mailer <command> <subcommand>` shares: dispatch, help, and how a failure is
// reported (usage errors and configuration exit 2, anything else 1).
import { MailerError } from "../shared/errors.js";

/** A mistake in the command line itself: printed with the command's usage, exit 2. */
export class UsageError extends Error {}

export async function runSubcommands(command: string, usage: string, subcommands: Record<string, (args: string[]) => Promise<number>>, args: string[]): Promise<number> {
  const [sub, ...rest] = args;
  const run = sub === undefined ? undefined : subcommands[sub];
  const name = run ? `${command} ${sub}` : command;
  try {
    if (run) return await run(rest);
    if (sub === "help" || sub === "--help" || sub === "-h") {
      process.stdout.write(usage);
      return 0;
    }
    process.stderr.write(`queue-mailer ${command}: ${sub === undefined ? "missing subcommand" : `unknown subcommand "${sub}"`}\n\n${usage}`);
    return 2;
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(`queue-mailer ${name}: ${error.message}\n\n${usage}`);
      return 2;
    }
    if (error instanceof MailerError) {
      process.stderr.write(`queue-mailer ${name}: ${error.code}: ${error.message}\n${error.hint ? `hint: ${error.hint}\n` : ""}`);
      return error.kind === "config" ? 2 : 1;
    }
    process.stderr.write(`queue-mailer ${name}: ${(error as Error).message}\n`);
    return 1;
  }
}
