// Bounce reports as they arrive in the sending mailbox (test/fixtures/bounces/*.eml, modelled on
// real Postfix, Sendmail, Exim, Exchange Online and Gmail reports) → what parseBounce reads from
// them: the bounced message's Message-ID (ours, from messageIdFor), each failed or delayed
// recipient with its status and kind. Ordinary mail and auto-replies are not bounces; a report
// that cannot be read is BOUNCE_MALFORMED. No storage, no network.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, it } from "node:test";
import { LOCAL_MAILBOX } from "../cli/local/localStack.js";
import { parseBounce, type BounceParse, type BounceReport } from "../shared/bounces/parseBounce.js";
import { messageIdFor } from "../shared/transport/mailOptions.js";
import { rejectionOf } from "./support/harness.js";

const fixture = (name: string): Buffer => readFileSync(new URL(`./fixtures/bounces/${name}`, import.meta.url));

function reportOf(parsed: BounceParse): BounceReport {
  assert.ok(parsed.bounce, `expected a bounce, got: ${parsed.bounce ? "" : parsed.reason}`);
  return parsed.report;
}

/** The recipients without the long diagnostic text, for deepEqual. */
const brief = (report: BounceReport) => report.recipients.map(({ address, finalRecipient, action, status, kind }) => ({ address, finalRecipient, action, status, kind }));

describe("parseBounce: the fixtures", () => {
  it("RFC 3464 (Postfix): two hard bounces, the original attached as message/rfc822", async () => {
    const report = reportOf(await parseBounce(fixture("rfc3464.eml")));
    assert.equal(report.format, "rfc3464");
    assert.equal(report.originalMessageId, messageIdFor("bounce-rfc3464", LOCAL_MAILBOX));
    assert.equal(report.originalMessageIdFrom, "attached-message");
    assert.deepEqual(brief(report), [
      { address: "ghost@fabrikam.test", finalRecipient: "ghost@fabrikam.test", action: "failed", status: "5.1.1", kind: "hard" },
      // Written Old.Team@Fabrikam.test in the report: lower-cased, as the suppression list keys it.
      { address: "old.team@fabrikam.test", finalRecipient: "old.team@fabrikam.test", action: "failed", status: "5.2.1", kind: "hard" },
    ]);
    // Folded Diagnostic-Code lines are unfolded, its "smtp;" type dropped.
    assert.equal(report.recipients[0]?.diagnostic, "550 5.1.1 <ghost@fabrikam.test>: Recipient address rejected: User unknown in local recipient table");
    assert.equal(report.recipients[0]?.remoteMta, "mailstore.fabrikam.test");
    assert.equal(report.reportingMta, "mx1.fabrikam.test");
    assert.equal(report.reportedAt.toISOString(), "2026-11-23T09:14:06.000Z");
    assert.equal(report.reportMessageId, "<20261123091406.4Zk9Ql6X3Tz9sRq@mx1.fabrikam.test>");
  });

  it("Exchange Online NDR: 5.1.10, the original's headers as text/rfc822-headers", async () => {
    const report = reportOf(await parseBounce(fixture("exchange-ndr.eml")));
    assert.equal(report.format, "exchange");
    assert.equal(report.originalMessageId, messageIdFor("bounce-exchange", LOCAL_MAILBOX));
    assert.equal(report.originalMessageIdFrom, "attached-headers");
    assert.deepEqual(brief(report), [{ address: "nobody@northwind.test", finalRecipient: "nobody@northwind.test", action: "failed", status: "5.1.10", kind: "hard" }]);
    assert.match(report.recipients[0]?.diagnostic ?? "", /^550 5\.1\.10 RESOLVER\.ADR\.RecipientNotFound/);
    assert.equal(report.subject, "Undeliverable: Reset your password");
  });

  it("Exchange Online NDR without the attached headers: the Message-ID from In-Reply-To", async () => {
    // Some NDRs (a large original, or a policy that strips it) carry no copy of the original.
    const text = fixture("exchange-ndr.eml").toString("utf8");
    const withoutHeaders = text.replace(/--6f1a7c2e-90b4-4d3e-b7a1-2f5c8e9d0a13\nContent-Type: text\/rfc822-headers\n[\s\S]*?(?=--6f1a7c2e-90b4-4d3e-b7a1-2f5c8e9d0a13--)/, "");
    assert.notEqual(withoutHeaders, text, "the fixture's headers part was cut out");
    const report = reportOf(await parseBounce(Buffer.from(withoutHeaders)));
    assert.equal(report.originalMessageId, messageIdFor("bounce-exchange", LOCAL_MAILBOX));
    assert.equal(report.originalMessageIdFrom, "in-reply-to");
    assert.equal(report.recipients.length, 1);
  });

  it("Gmail: mailer-daemon@googlemail.com, X-Failed-Recipients and a message/delivery-status part", async () => {
    const report = reportOf(await parseBounce(fixture("gmail.eml")));
    assert.equal(report.format, "gmail");
    assert.equal(report.originalMessageId, messageIdFor("bounce-gmail", LOCAL_MAILBOX));
    assert.deepEqual(brief(report), [{ address: "grace.hopper.typo@gmail.com", finalRecipient: "grace.hopper.typo@gmail.com", action: "failed", status: "5.1.1", kind: "hard" }]);
    assert.match(report.recipients[0]?.diagnostic ?? "", /The email account that you tried to reach does not exist/);
    // The report's own Date (-0800) in UTC.
    assert.equal(report.reportedAt.toISOString(), "2026-11-23T10:31:18.000Z");
  });

  it("a delay (4.2.2, Action: delayed) is a soft bounce", async () => {
    const report = reportOf(await parseBounce(fixture("soft-4xx.eml")));
    assert.equal(report.originalMessageId, messageIdFor("bounce-soft", LOCAL_MAILBOX));
    assert.equal(report.originalMessageIdFrom, "attached-headers");
    assert.deepEqual(brief(report), [{ address: "busy@woodgrove.test", finalRecipient: "busy@woodgrove.test", action: "delayed", status: "4.2.2", kind: "soft" }]);
  });

  it("a report for a message we never sent parses like any other (matching is the ledger's job)", async () => {
    const report = reportOf(await parseBounce(fixture("unknown-message.eml")));
    assert.equal(report.originalMessageId, messageIdFor("never-sent-4711", LOCAL_MAILBOX));
    assert.deepEqual(brief(report), [{ address: "nobody@tailspin.test", finalRecipient: "nobody@tailspin.test", action: "failed", status: "5.1.1", kind: "hard" }]);
  });

  it("a plain-text bounce with X-Failed-Recipients (Exim): status from the text, Message-ID from References", async () => {
    const report = reportOf(await parseBounce(fixture("exim-text.eml")));
    assert.equal(report.format, "x-failed-recipients");
    assert.equal(report.originalMessageId, messageIdFor("bounce-exim", LOCAL_MAILBOX));
    assert.equal(report.originalMessageIdFrom, "references");
    assert.deepEqual(brief(report), [{ address: "former.employee@adventure-works.test", finalRecipient: "former.employee@adventure-works.test", action: "failed", status: "5.1.1", kind: "hard" }]);
  });

  it("ordinary mail is not a bounce, even a reply to our message that talks about delivery failing", async () => {
    const parsed = await parseBounce(fixture("ordinary.eml"));
    assert.equal(parsed.bounce, false);
    assert.match(parsed.bounce ? "" : parsed.reason, /not a delivery status notification/);
  });

  it("an Exchange out-of-office reply (X-MS-Exchange headers, Auto-Submitted) is not a bounce", async () => {
    assert.equal((await parseBounce(fixture("auto-reply.eml"))).bounce, false);
  });

  it("a malformed report is BOUNCE_MALFORMED, naming the report and what is wrong", async () => {
    const error = await rejectionOf(parseBounce(fixture("malformed.eml")));
    assert.equal(error.code, "BOUNCE_MALFORMED");
    assert.equal(error.kind, "permanent");
    assert.match(error.message, /<ndr\.20261124113001\.77@gateway\.litware\.test>/);
    assert.match(error.message, /no usable Final-Recipient/);
    assert.match(error.hint ?? "", /left in the bounce folder/);
  });
});

describe("parseBounce: edge cases", () => {
  const rfc3464 = () => fixture("rfc3464.eml").toString("utf8");

  it("a delivery confirmation (every recipient delivered) is not a bounce", async () => {
    const parsed = await parseBounce(Buffer.from(rfc3464().replaceAll("Action: failed", "Action: delivered")));
    assert.equal(parsed.bounce, false);
    assert.match(parsed.bounce ? "" : parsed.reason, /without failed or delayed recipients/);
  });

  it("delivered recipients are left out of a report that also has a failure", async () => {
    const report = reportOf(await parseBounce(Buffer.from(rfc3464().replace("Action: failed", "Action: delivered"))));
    assert.deepEqual(report.recipients.map((r) => r.address), ["old.team@fabrikam.test"]);
  });

  it("a read receipt (report-type=disposition-notification) is not a bounce", async () => {
    const parsed = await parseBounce(Buffer.from(rfc3464().replace("report-type=delivery-status", "report-type=disposition-notification")));
    assert.equal(parsed.bounce, false);
    assert.match(parsed.bounce ? "" : parsed.reason, /disposition-notification/);
  });

  it("a failure with a 4.x.x status (given up after retries) is soft", async () => {
    const report = reportOf(await parseBounce(Buffer.from(rfc3464().replace("Status: 5.1.1", "Status: 4.4.7"))));
    assert.deepEqual([report.recipients[0]?.status, report.recipients[0]?.kind], ["4.4.7", "soft"]);
  });

  it("Original-Recipient (what we sent to) wins over Final-Recipient (where a forward ended)", async () => {
    const forwarded = rfc3464().replace("Final-Recipient: rfc822; ghost@fabrikam.test", "Final-Recipient: rfc822; ghost.forward@elsewhere.test");
    const report = reportOf(await parseBounce(Buffer.from(forwarded)));
    assert.deepEqual([report.recipients[0]?.address, report.recipients[0]?.finalRecipient], ["ghost@fabrikam.test", "ghost.forward@elsewhere.test"]);
  });

  it("a Status that is not an enhanced status code is BOUNCE_MALFORMED", async () => {
    const error = await rejectionOf(parseBounce(Buffer.from(rfc3464().replace("Status: 5.1.1", "Status: unknown").replace("550 5.1.1 <ghost", "550 <ghost"))));
    assert.equal(error.code, "BOUNCE_MALFORMED");
    assert.match(error.message, /recipient 1: Status "unknown"/);
  });

  it("a delivery-status report without its message/delivery-status part is BOUNCE_MALFORMED", async () => {
    const text = rfc3464().replace(/Content-Type: message\/delivery-status/, "Content-Type: text/plain");
    const error = await rejectionOf(parseBounce(Buffer.from(text)));
    assert.equal(error.code, "BOUNCE_MALFORMED");
    assert.match(error.message, /without a message\/delivery-status part/);
  });
});
