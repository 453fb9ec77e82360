import { describe, expect, it } from 'vitest';
import { IoLimiter } from '../src/node/io-limiter.js';

describe('IoLimiter (FileBlockDevice request queue)', () => {
  it('keeps at most `limit` calls in flight and starts them in order', async () => {
    const limiter = new IoLimiter(3);
    let active = 0;
    let peak = 0;
    const started: number[] = [];
    const tasks = Array.from({ length: 20 }, (_, i) =>
      limiter.run(async () => {
        started.push(i);
        active++;
        peak = Math.max(peak, active);
        await new Promise((resolve) => setImmediate(resolve));
        active--;
        return i;
      }),
    );
    expect(limiter.pending).toBe(20);
    expect(await Promise.all(tasks)).toEqual(Array.from({ length: 20 }, (_, i) => i));
    expect(peak).toBe(3);
    expect(started).toEqual(Array.from({ length: 20 }, (_, i) => i));
    expect(limiter.pending).toBe(0);
  });

  it('releases the slot of a failed task and reports idleness', async () => {
    const limiter = new IoLimiter(1);
    const failed = limiter.run(() => Promise.reject(new Error('boom')));
    const next = limiter.run(async () => 'ok');
    const idle = limiter.whenIdle();
    await expect(failed).rejects.toThrow('boom');
    await expect(next).resolves.toBe('ok');
    await idle;
    expect(limiter.pending).toBe(0);
  });

  it('rejects a limit below one', () => {
    expect(() => new IoLimiter(0)).toThrow(RangeError);
  });
});
