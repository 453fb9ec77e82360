/** `convert -r`: the leaky bucket that paces writes, on a clock the test drives. */
import { describe, expect, test } from 'vitest';
import { RateLimiter, type RateLimiterClock, rateLimiterFor } from '../src/rate-limit.js';

/** A clock whose sleeps advance it at once and are recorded. */
function fakeClock(): RateLimiterClock & { time: number; sleeps: number[] } {
  const clock = {
    time: 0,
    sleeps: [] as number[],
    now: () => clock.time,
    sleep: async (milliseconds: number) => {
      clock.sleeps.push(milliseconds);
      clock.time += milliseconds;
    },
  };
  return clock;
}

const MiB = 2 ** 20;

describe('RateLimiter', () => {
  test('the first request goes at once; the next waits until the bucket drained to a tenth of a second', async () => {
    const clock = fakeClock();
    const limiter = new RateLimiter(MiB, clock);
    await limiter.take(2 * MiB);
    expect(clock.sleeps).toEqual([]);
    await limiter.take(2 * MiB);
    // 2 MiB in the bucket drains at 1 MiB/s down to the 0.1 MiB burst: 1.9 s.
    expect(clock.sleeps).toHaveLength(1);
    expect(clock.sleeps[0]).toBeCloseTo(1900, 6);
    // From then on each request waits for the one before it to drain: 2 s for 2 MiB.
    await limiter.take(2 * MiB);
    expect(clock.sleeps[1]).toBeCloseTo(2000, 6);
  });

  test('over many small requests the average is the rate', async () => {
    const clock = fakeClock();
    const limiter = new RateLimiter(10 * MiB, clock);
    for (let index = 0; index < 1000; index++) await limiter.take(64 * 1024);
    // 1000 x 64 KiB = 62.5 MiB at 10 MiB/s, less the burst (1 MiB) and the last request.
    expect(clock.time / 1000).toBeGreaterThan(6.0);
    expect(clock.time / 1000).toBeLessThan(6.25);
  });

  test('time that passed between requests is credited', async () => {
    const clock = fakeClock();
    const limiter = new RateLimiter(MiB, clock);
    await limiter.take(MiB);
    clock.time += 5000;
    await limiter.take(MiB);
    expect(clock.sleeps).toEqual([]);
  });

  test('requests made at once take their turns', async () => {
    const clock = fakeClock();
    const limiter = new RateLimiter(MiB, clock);
    await Promise.all([limiter.take(MiB), limiter.take(MiB), limiter.take(MiB)]);
    // 0.9 s for the second (down to the burst), 1 s for the third.
    expect(clock.sleeps).toHaveLength(2);
    expect(clock.time).toBeCloseTo(1900, 6);
  });

  test('-r 0 and no -r make no limiter; a rate must be positive', () => {
    expect(rateLimiterFor(undefined)).toBeUndefined();
    expect(rateLimiterFor(0)).toBeUndefined();
    expect(rateLimiterFor(1024)?.bytesPerSecond).toBe(1024);
    expect(() => new RateLimiter(-1)).toThrow(RangeError);
  });
});
