/**
 * `commitToBacking({ rateLimit })` (`qemu-img commit -r`): the commit waits so the bytes written
 * never run ahead of the rate. Fake timers make it deterministic: the commit cannot finish before
 * the virtual clock has advanced by bytes / rate.
 */
import { MemoryBlockDevice, OverlayBlockDevice } from '@qcowkit/blockdev';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { commitToBacking } from '../src/ops/index.js';

const MiB = 2 ** 20;

async function chain() {
  const base = new MemoryBlockDevice(16 * MiB);
  const top = new OverlayBlockDevice(base, { granularity: 64 * 1024 });
  await top.write(0, new Uint8Array(8 * MiB).fill(7));
  return { base, top };
}

afterEach(() => {
  vi.useRealTimers();
});

describe('commitToBacking with a rate limit', () => {
  it('takes at least bytes / rate of (virtual) time and writes everything', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'Date'] });
    const { base, top } = await chain();
    const start = Date.now();
    let finished = false;
    const done = commitToBacking({ overlay: top, backing: base, rateLimit: 2 * MiB }).then((written) => {
      finished = true;
      return written;
    });
    // 8 MiB at 2 MiB/s: not done after 3 virtual seconds, done by 4.5.
    await vi.advanceTimersByTimeAsync(3000);
    expect(finished).toBe(false);
    await vi.advanceTimersByTimeAsync(1500);
    expect(finished).toBe(true);
    expect(await done).toBe(8 * MiB);
    expect(Date.now() - start).toBeGreaterThanOrEqual(4000);
    expect((await base.read(0, 8 * MiB)).every((byte) => byte === 7)).toBe(true);
  });

  it('without a limit it needs no timer at all', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'Date'] });
    const { base, top } = await chain();
    expect(await commitToBacking({ overlay: top, backing: base })).toBe(8 * MiB);
  });

  it('refuses a negative or non-finite rate', async () => {
    const { base, top } = await chain();
    await expect(commitToBacking({ overlay: top, backing: base, rateLimit: -1 })).rejects.toMatchObject({
      code: 'EINVAL',
    });
    await expect(
      commitToBacking({ overlay: top, backing: base, rateLimit: Number.POSITIVE_INFINITY }),
    ).rejects.toMatchObject({ code: 'EINVAL' });
  });
});
