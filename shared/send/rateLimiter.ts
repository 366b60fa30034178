// Exchange counts messages per mailbox per minute (30 for SMTP client submission) and answers
// 432 4.3.2 when it is exceeded. A sliding window never lets more than `limit` sends start in any
// 60-second span, so bursts right after a quiet minute cannot trip it.
export interface RateLimiter {
  acquire(): Promise<void>;
}

export function slidingWindowLimiter(limit: number, windowMs = 60_000, now: () => number = Date.now): RateLimiter {
  if (limit <= 0) return { acquire: () => Promise.resolve() };
  const starts: number[] = [];
  let chain = Promise.resolve();
  return {
    acquire() {
      // Serialise waiters so that they are served in order.
      const turn = chain.then(async () => {
        for (;;) {
          const t = now();
          while (starts.length > 0 && (starts[0] ?? 0) <= t - windowMs) starts.shift();
          if (starts.length < limit) {
            starts.push(t);
            return;
          }
          await new Promise((resolve) => setTimeout(resolve, (starts[0] ?? t) + windowMs - t + 1));
        }
      });
      chain = turn.catch(() => undefined);
      return turn;
    },
  };
}
