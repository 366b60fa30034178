// Publishes the message schema for producers: writes emailMessageSchema to
// schema/email-message.v1.json. test/message.test.ts fails when the two differ, so rerun this after
// every change to shared/message/schema.ts:
//   node --import tsx scripts/writeSchema.ts
import { mkdirSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { emailMessageSchema } from "../shared/message/schema.js";

const target = new URL("../schema/email-message.v1.json", import.meta.url);
mkdirSync(new URL(".", target), { recursive: true });
writeFileSync(target, JSON.stringify(emailMessageSchema, null, 2) + "\n");
console.log(`wrote ${fileURLToPath(target)}`);
