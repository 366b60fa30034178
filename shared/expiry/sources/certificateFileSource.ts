// The certificate in CERT_PATH: the sender's own credential when it signs from a file.
import { readFile } from "node:fs/promises";
import { basename } from "node:path";
import { parseCertificateFile } from "../../auth/signingCertificate.js";
import { toMailerError } from "../../errors.js";
import { errorFinding } from "../finding.js";
import type { ExpirySource } from "./source.js";

export function certificateFileSource(path: string, password?: string): ExpirySource {
  return {
    name: "certificate-file",
    async list() {
      try {
        const signing = parseCertificateFile(await readFile(path), path, password);
        return {
          items: [{ key: `file:${signing.thumbprintSha256}`, name: basename(path), kind: "certificate-file", source: path, expiresOn: signing.notAfter, enabled: true, inUse: true }],
          errors: [],
        };
      } catch (error) {
        const failure = toMailerError(error);
        return { items: [], errors: [errorFinding(`file:${path}`, basename(path), "certificate-file", path, `${failure.code}: ${failure.message}`, "Fix CERT_PATH (and CERT_PASSWORD) so the certificate can be read.")] };
      }
    },
  };
}
