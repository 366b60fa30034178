// Created on first use and shared after that (clients, tables, a loaded certificate). A failed
// attempt is not kept, so the next call tries again; reset() forgets a success too.
export interface Lazy<T> {
  (): Promise<T>;
  reset(): void;
}

export function lazy<T>(make: () => Promise<T>): Lazy<T> {
  let value: Promise<T> | undefined;
  const get = () => {
    if (value) return value;
    const attempt: Promise<T> = make().catch((error: unknown) => {
      // Forget only this attempt: after a reset() a newer one may be under way.
      if (value === attempt) value = undefined;
      throw error;
    });
    value = attempt;
    return attempt;
  };
  return Object.assign(get, {
    reset() {
      value = undefined;
    },
  });
}
