// Runs a test process on a shifted wall clock, to check tests against a time of day they would
// otherwise meet only by chance (e.g. just before midnight UTC, when "today" in UTC is about to
// change):
//
//   QM_FAKE_NOW=2026-11-29T23:30:00Z node --import tsx --import ./test/support/shiftClock.ts --test test/x.test.ts
//
// Without QM_FAKE_NOW this module does nothing. With it, `Date.now()`, `new Date()` and `Date()`
// start at QM_FAKE_NOW and keep flowing at the real rate (the offset to the real clock is fixed at
// startup), so timeouts and durations measured with Date still work. Only JavaScript's Date moves:
// performance.now(), timers and OpenSSL keep the real clock. So pick an instant in the past (the
// time of day you want on an earlier date): certificates the tests issue start at the fake "now",
// and from a future one OpenSSL finds them "not yet valid" and TLS to the test doubles fails.
// (libfaketime moves OpenSSL's clock too.) Child processes get the shift only if they import this
// module and are given QM_FAKE_NOW: test/support/cli.ts does that for the CLI. No test needs it.
const fake = process.env["QM_FAKE_NOW"];

if (fake !== undefined && fake !== "") {
  const target = Date.parse(fake);
  if (Number.isNaN(target)) throw new Error(`QM_FAKE_NOW must be an ISO 8601 instant, e.g. 2026-11-30T23:30:00Z; got "${fake}"`);
  const RealDate = Date;
  const realNow = RealDate.now.bind(RealDate);
  const offset = target - realNow();
  const now = () => realNow() + offset;
  if (offset > 60_000) {
    process.stderr.write(`shiftClock: QM_FAKE_NOW is ${Math.round(offset / 60_000)} min ahead of the real clock; TLS to certificates issued in this process will fail as "not yet valid" (see test/support/shiftClock.ts)\n`);
  }
  // A Proxy rather than a subclass: `Date()` called without `new` must keep working (it returns a
  // string), and `instanceof Date`, Date.prototype and the static methods stay the real ones.
  globalThis.Date = new Proxy(RealDate, {
    construct(date, args, newTarget) {
      return Reflect.construct(date, args.length === 0 ? [now()] : args, newTarget) as object;
    },
    apply() {
      return new RealDate(now()).toString();
    },
    get(date, property, receiver) {
      return property === "now" ? now : Reflect.get(date, property, receiver);
    },
  });
}

export {};
