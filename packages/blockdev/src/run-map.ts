/**
 * A map from integer keys to values stored as sorted runs `[start, end)` of equal value. Setting
 * a range of a billion keys costs one run, not a billion entries. Keys without a value are gaps.
 */

export interface Run<T> {
  readonly start: number;
  readonly end: number;
  /** `undefined` for a gap. */
  readonly value: T | undefined;
}

interface StoredRun<T> {
  start: number;
  end: number;
  value: T;
}

export class RunMap<T> {
  /** Non-overlapping, sorted by start, neighbours with equal values merged. */
  readonly #runs: StoredRun<T>[] = [];

  get runCount(): number {
    return this.#runs.length;
  }

  /** Sets `[start, end)` to `value`, or clears it when `value` is `undefined`. */
  set(start: number, end: number, value: T | undefined): void {
    if (end <= start) return;
    const runs = this.#runs;
    let first = this.#firstEndingAfter(start);
    const replacement: StoredRun<T>[] = [];
    let last = first;
    // Keep the part of an overlapping run before `start`.
    const head = runs[first];
    if (head !== undefined && head.start < start) replacement.push({ ...head, end: start });
    while (last < runs.length && runs[last]!.start < end) last++;
    const tail = runs[last - 1];
    if (value !== undefined) replacement.push({ start, end, value });
    if (tail !== undefined && last > first && tail.end > end) replacement.push({ ...tail, start: end });
    // Merge with the neighbours outside the replaced span when they touch and agree.
    const before = runs[first - 1];
    const firstNew = replacement[0];
    if (
      before !== undefined &&
      firstNew !== undefined &&
      before.end === firstNew.start &&
      before.value === firstNew.value
    ) {
      firstNew.start = before.start;
      first--;
    }
    const after = runs[last];
    const lastNew = replacement[replacement.length - 1];
    if (
      after !== undefined &&
      lastNew !== undefined &&
      lastNew.end === after.start &&
      after.value === lastNew.value
    ) {
      lastNew.end = after.end;
      last++;
    }
    // Merge inside the replacement (a kept head or tail equal to the new value).
    const merged: StoredRun<T>[] = [];
    for (const run of replacement) {
      const previous = merged[merged.length - 1];
      if (previous !== undefined && previous.end === run.start && previous.value === run.value) {
        previous.end = run.end;
      } else {
        merged.push(run);
      }
    }
    runs.splice(first, last - first, ...merged);
  }

  /** The value at `key`. */
  get(key: number): T | undefined {
    const run = this.#runs[this.#firstEndingAfter(key)];
    return run !== undefined && run.start <= key ? run.value : undefined;
  }

  /** Runs and gaps covering exactly `[start, end)`, in order. */
  runs(start: number, end: number): Run<T>[] {
    const out: Run<T>[] = [];
    let position = start;
    for (let index = this.#firstEndingAfter(start); index < this.#runs.length && position < end; index++) {
      const run = this.#runs[index]!;
      if (run.start >= end) break;
      if (run.start > position) out.push({ start: position, end: run.start, value: undefined });
      const runEnd = Math.min(run.end, end);
      out.push({ start: Math.max(run.start, position), end: runEnd, value: run.value });
      position = runEnd;
    }
    if (position < end) out.push({ start: position, end, value: undefined });
    return out;
  }

  /** Every stored run (no gaps), in order. */
  entries(): Run<T>[] {
    return this.#runs.map((run) => ({ ...run }));
  }

  /** Removes every run. */
  clear(): void {
    this.#runs.length = 0;
  }

  /** Index of the first run whose end is after `key` (binary search). */
  #firstEndingAfter(key: number): number {
    let low = 0;
    let high = this.#runs.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (this.#runs[middle]!.end <= key) low = middle + 1;
      else high = middle;
    }
    return low;
  }
}
