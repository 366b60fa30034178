// `queue-mailer status ID [--json]`: what happened to message ID, from the `deliveryevents` table,
// newest last. Exits 1 when nothing is known about the id (never taken yet, or a typo).
import { parseArgs } from "node:util";
import { loadStorageConfig, readSettings } from "../shared/config.js";
import { readDeliveryEvents, type DeliveryEvent } from "../shared/events/deliveryEvents.js";

function line(event: DeliveryEvent): string {
  const detail =
    event.event === "sent" || event.event === "duplicate"
      ? `${event.messageId ?? ""} ${event.response ?? ""}${event.suppressed?.length ? ` (suppressed, not sent to: ${event.suppressed.join(", ")})` : ""}`
      : event.event === "bounced"
        ? `${event.recipient ?? ""} ${event.code ?? ""}: ${event.reason ?? ""}${event.suppressed?.length ? " (now suppressed)" : ""}`
        : `${event.code ?? ""}: ${event.reason ?? ""}${event.afterSeconds === undefined ? "" : ` (again in ${event.afterSeconds} s)`}`;
  return `${event.at}  attempt ${event.attempt}  ${event.event.padEnd(9)}  ${detail.trim()}`;
}

export async function statusCommand(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({ args, options: { json: { type: "boolean" } }, allowPositionals: true, strict: true });
  const [id, ...extra] = positionals;
  if (id === undefined || extra.length > 0) {
    process.stderr.write("usage: queue-mailer status ID [--json]\n");
    return 2;
  }
  const events = await readDeliveryEvents(loadStorageConfig(readSettings()), id);
  if (values.json) {
    console.log(JSON.stringify({ id, events }, null, 2));
  } else if (events.length === 0) {
    console.log(`No delivery events for ${JSON.stringify(id)}: not taken from the queue yet, or not this id.`);
  } else {
    console.log(`Message ${JSON.stringify(id)}:`);
    for (const event of events) console.log(`  ${line(event)}`);
  }
  return events.length === 0 ? 1 : 0;
}
