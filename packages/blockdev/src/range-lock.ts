/**
 * An async lock over ranges of integers: holders of overlapping ranges run one after another,
 * holders of disjoint ranges run together. Waiters are served in arrival order among those that
 * overlap, so a stream of small requests cannot starve a large one.
 */

interface Holder {
  readonly start: number;
  readonly end: number;
  readonly released: Promise<void>;
}

export class RangeLock {
  /** Holders and waiters in arrival order. */
  #queue: Holder[] = [];

  /** Number of ranges held or waited for. */
  get pending(): number {
    return this.#queue.length;
  }

  /** Waits until `[start, end)` overlaps no earlier holder, then holds it; call the returned
   * function to release. */
  async acquire(start: number, end: number): Promise<() => void> {
    const earlier = this.#queue.filter((holder) => holder.start < end && start < holder.end);
    let release!: () => void;
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    const holder: Holder = { start, end, released };
    this.#queue.push(holder);
    await Promise.all(earlier.map((other) => other.released));
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.#queue = this.#queue.filter((other) => other !== holder);
      release();
    };
  }

  /** Runs `task` while holding `[start, end)`. */
  async with<T>(start: number, end: number, task: () => Promise<T>): Promise<T> {
    const release = await this.acquire(start, end);
    try {
      return await task();
    } finally {
      release();
    }
  }
}
