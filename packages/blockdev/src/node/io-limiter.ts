/**
 * A small FIFO queue bounding how many file-system calls one device has in flight. libuv runs
 * file I/O on a pool of 4 threads by default; flooding it only delays everyone else's work (DNS,
 * zlib, other devices), so each device waits its turn here instead. A finished call starts the
 * next queued one directly from its completion callback, so the pool never waits on a promise
 * round trip.
 */
export type StartFunction = (release: () => void) => void;

export class IoLimiter {
  readonly limit: number;
  #active = 0;
  #queue: StartFunction[] = [];
  #head = 0;
  #idle: Array<() => void> = [];
  readonly #release = (): void => this.#next();

  constructor(limit: number) {
    if (!Number.isSafeInteger(limit) || limit < 1) throw new RangeError(`IoLimiter: bad limit ${limit}`);
    this.limit = limit;
  }

  /** Calls in flight plus calls waiting for a slot. */
  get pending(): number {
    return this.#active + this.#queue.length - this.#head;
  }

  /** Calls `start` once a slot is free; `start` must call `release` exactly once when done. */
  submit(start: StartFunction): void {
    if (this.#active < this.limit) {
      this.#active++;
      start(this.#release);
    } else {
      this.#queue.push(start);
    }
  }

  /** Runs a promise-returning task in a slot. */
  run<T>(task: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.submit((release) => {
        let promise: Promise<T>;
        try {
          promise = task();
        } catch (error) {
          release();
          reject(error);
          return;
        }
        promise.then(
          (value) => {
            release();
            resolve(value);
          },
          (error: unknown) => {
            release();
            reject(error);
          },
        );
      });
    });
  }

  /** Resolves once nothing is in flight or waiting. */
  whenIdle(): Promise<void> {
    if (this.pending === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idle.push(resolve));
  }

  #next(): void {
    if (this.#head < this.#queue.length) {
      // The slot passes straight to the next caller in line, so nobody overtakes it.
      const start = this.#queue[this.#head]!;
      this.#queue[this.#head] = undefined as unknown as StartFunction;
      this.#head++;
      if (this.#head === this.#queue.length) {
        this.#queue = [];
        this.#head = 0;
      }
      start(this.#release);
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
