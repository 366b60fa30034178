// An ExpirySource lists the credentials it can see. It reports what it could not read as an error
// finding instead of throwing, so one broken source never hides the others, and what it knows is in
// use but cannot date as a notice (status "unchecked").
import type { ExpiryFinding, ExpiryItem } from "../finding.js";

export interface ExpirySource {
  readonly name: string;
  list(): Promise<{ items: ExpiryItem[]; errors: ExpiryFinding[]; notices?: ExpiryFinding[] }>;
}
