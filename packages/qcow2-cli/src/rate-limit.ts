/**
 * `convert -r RATE`: at most RATE bytes a second written to the target, paced as QEMU's throttle
 * paces a BlockBackend given only an average rate. QEMU's leaky bucket drains at the rate and
 * holds a burst of a tenth of it: a request goes as soon as the bucket's level is at most the
 * burst, then adds its whole size (so one large request may overfill it), and the next one waits
 * for the level to drain back to the burst. Over a copy of N bytes that is about
 * (N - RATE / 10) / RATE seconds whatever the request sizes.
 */

export interface RateLimiterClock {
  /** Milliseconds from any fixed origin. */
  now(): number;
  /** Resolves after `milliseconds`. */
  sleep(milliseconds: number): Promise<void>;
}

const realClock: RateLimiterClock = {
  now: () => performance.now(),
  sleep: (milliseconds) => new Promise((resolve) => setTimeout(resolve, milliseconds)),
};

export class RateLimiter {
  readonly bytesPerSecond: number;
  /** Bytes the bucket may hold before a request waits (QEMU's default: a tenth of the rate). */
  readonly burst: number;
  readonly #clock: RateLimiterClock;
  /** Bytes in the bucket at `#last`. */
  #level = 0;
  #last: number;
  /** Requests wait in turn, so two of them never both pass on the same room. */
  #turn: Promise<void> = Promise.resolve();

  /** `bytesPerSecond` > 0 (`-r 0` means no limit: make no limiter then). */
  constructor(bytesPerSecond: number, clock: RateLimiterClock = realClock) {
    if (!(bytesPerSecond > 0) || !Number.isFinite(bytesPerSecond)) {
      throw new RangeError(`RateLimiter: ${bytesPerSecond} bytes a second is not a positive rate`);
    }
    this.bytesPerSecond = bytesPerSecond;
    this.burst = bytesPerSecond / 10;
    this.#clock = clock;
    this.#last = clock.now();
  }

  /** Resolves when `bytes` more may be written (at once for the first request). */
  take(bytes: number): Promise<void> {
    const turn = this.#turn.then(() => this.#take(bytes));
    this.#turn = turn.catch(() => undefined);
    return turn;
  }

  async #take(bytes: number): Promise<void> {
    this.#drain();
    if (this.#level > this.burst) {
      await this.#clock.sleep(((this.#level - this.burst) / this.bytesPerSecond) * 1000);
      this.#drain();
    }
    this.#level += bytes;
  }

  #drain(): void {
    const now = this.#clock.now();
    this.#level = Math.max(0, this.#level - ((now - this.#last) / 1000) * this.bytesPerSecond);
    this.#last = now;
  }
}

/** A limiter for `-r RATE`, or undefined when there is no limit (no `-r`, or `-r 0`). */
export function rateLimiterFor(rate: number | undefined): RateLimiter | undefined {
  return rate === undefined || rate === 0 ? undefined : new RateLimiter(rate);
}
