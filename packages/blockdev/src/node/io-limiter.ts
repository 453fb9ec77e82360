/**
 * A small FIFO semaphore bounding how many file-system calls one device has in flight. libuv runs
 * file I/O on a pool of 4 threads by default; queueing more there only delays everyone else's
 * work (DNS, zlib, other devices), so each device waits its turn here instead.
 */
export class IoLimiter {
  readonly limit: number;
  #active = 0;
  #waiting: Array<() => void> = [];
  #head = 0;
  #idle: Array<() => void> = [];

  constructor(limit: number) {
    if (!Number.isSafeInteger(limit) || limit < 1) throw new RangeError(`IoLimiter: bad limit ${limit}`);
    this.limit = limit;
  }

  /** Calls in flight plus calls waiting for a slot. */
  get pending(): number {
    return this.#active + this.#waiting.length - this.#head;
  }

  /** Runs `task` once a slot is free. */
  async run<T>(task: () => Promise<T>): Promise<T> {
    if (this.#active < this.limit) this.#active++;
    else await new Promise<void>((resolve) => this.#waiting.push(resolve));
    try {
      return await task();
    } finally {
      this.#release();
    }
  }

  /** Resolves once nothing is in flight or waiting. */
  whenIdle(): Promise<void> {
    if (this.pending === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idle.push(resolve));
  }

  #release(): void {
    if (this.#head < this.#waiting.length) {
      // Hand the slot straight to the next waiter so nobody can overtake it.
      const next = this.#waiting[this.#head]!;
      this.#head++;
      if (this.#head === this.#waiting.length) {
        this.#waiting = [];
        this.#head = 0;
      } else if (this.#head > 1024 && this.#head * 2 > this.#waiting.length) {
        this.#waiting = this.#waiting.slice(this.#head);
        this.#head = 0;
      }
      next();
      return;
    }
    this.#active--;
    if (this.#active === 0 && this.#idle.length > 0) {
      const idle = this.#idle;
      this.#idle = [];
      for (const resolve of idle) resolve();
    }
  }
}
