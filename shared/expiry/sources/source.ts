// An ExpirySource lists the credentials it can see. It reports what it could not read as an error
// finding instead of throwing, so one broken source never hides the others.
import type { ExpiryFinding, ExpiryItem } from "../finding.js";

export interface ExpirySource {
  readonly name: string;
  list(): Promise<{ items: ExpiryItem[]; errors: ExpiryFinding[] }>;
}
