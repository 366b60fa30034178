import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { MailerError } from "../shared/errors.js";
import { jsonLineLogger } from "../shared/log.js";
import { redact, registerSecret } from "../shared/redact.js";

const jwt = "eyJhbGciOiJQUzI1NiIsInR5cCI6IkpXVCJ9.eyJhdWQiOiJ4In0.c2lnbmF0dXJlLXBhcnQ";
const xoauth2 = Buffer.from(`user=mailer@contoso.com\x01auth=Bearer ${jwt}\x01\x01`).toString("base64");

describe("redact", () => {
  const cases: Array<[string, string, RegExp]> = [
    ["a JWT", `token ${jwt} rejected`, /token \[redacted JWT\] rejected/],
    ["a bearer header", "Authorization: Bearer abc.def-ghi_123", /Bearer \[redacted\]/],
    ["an XOAUTH2 initial response", `AUTH XOAUTH2 ${xoauth2}`, /AUTH XOAUTH2 \[redacted XOAUTH2\]/],
    ["a PEM private key", "key: -----BEGIN PRIVATE KEY-----\nMIIEv...\n-----END PRIVATE KEY----- end", /key: \[redacted PEM\] end/],
    ["form fields", "client_assertion=abc&client_secret=s3cr3t&scope=x", /client_assertion=\[redacted\]&client_secret=\[redacted\]&scope=x/],
    ["JSON fields", '{"access_token":"opaque-token-value","expires_in":3599}', /"access_token":"\[redacted\]","expires_in":3599/],
  ];
  for (const [name, input, expected] of cases) {
    it(`masks ${name}`, () => assert.match(redact(input), expected));
  }

  it("masks registered secret values wherever they appear", () => {
    registerSecret("pfx-pa55word-xyz");
    assert.equal(redact("bad password pfx-pa55word-xyz for file"), "bad password [redacted] for file");
  });

  it("applies to error messages, responses and log records", () => {
    const error = new MailerError("TOKEN_X", `failed with ${jwt}`, { kind: "config", response: `Bearer ${jwt}` });
    assert.doesNotMatch(JSON.stringify(error.toJSON()), /eyJhbGci/);
    const lines: string[] = [];
    jsonLineLogger((line) => lines.push(line)).log("info", "x", { assertion: jwt, nested: { xoauth2 } });
    assert.doesNotMatch(lines.join(""), /eyJhbGci|dXNlcj/);
  });
});
