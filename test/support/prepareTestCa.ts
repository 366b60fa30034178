// Runs before the test processes start: Node reads NODE_EXTRA_CA_CERTS only at process start, so the
// CA that signs the test servers' certificates (Key Vault double, SMTP STARTTLS) must exist first.
import { ensureCertificateAuthority } from "../../cli/local/devCertificates.js";

const { caPath } = ensureCertificateAuthority(".test-ca");
console.log(`test CA: ${caPath}`);
