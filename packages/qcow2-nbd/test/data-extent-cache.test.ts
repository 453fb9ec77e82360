import { type BlockDevice, type Extent, MemoryBlockDevice } from '@qcowkit/blockdev';
import { describe, expect, it } from 'vitest';
import { DataExtentCache, STATUS_WINDOW } from '../src/server/data-extent-cache.js';

describe('DataExtentCache', () => {
  it('merges touching ranges and forgets ranges that zeroing or trimming touch', () => {
    const cache = new DataExtentCache();
    cache.add(0, 100);
    cache.add(100, 200);
    expect(cache.covers(50, 120)).toBe(true);
    cache.add(300, 400);
    expect(cache.covers(150, 200)).toBe(false);
    cache.invalidate(350, 1);
    expect(cache.covers(300, 10)).toBe(false);
    expect(cache.covers(0, 200)).toBe(true);
  });

  it('asks the device once per window, however many reads want it at once', async () => {
    const device = new MemoryBlockDevice(3 * STATUS_WINDOW);
    await device.write(0, new Uint8Array(STATUS_WINDOW + 4096).fill(1));
    const calls: [number, number][] = [];
    // learn() uses only size and blockStatus.
    const counting = {
      size: device.size,
      blockStatus: (offset: number, length: number): Promise<Extent[]> => {
        calls.push([offset, length]);
        return device.blockStatus(offset, length);
      },
    } as unknown as BlockDevice;
    const cache = new DataExtentCache();
    await Promise.all([
      cache.learn(counting, 0, 4096),
      cache.learn(counting, 8192, 4096),
      cache.learn(counting, 100, 1),
    ]);
    // One question from the window's start to the device's end: its answer reaches past the window.
    expect(calls).toEqual([[0, 3 * STATUS_WINDOW]]);
    expect(cache.covers(0, STATUS_WINDOW)).toBe(true);
    // Data runs across the window border are one range; the hole after them is not data.
    expect(cache.covers(STATUS_WINDOW - 10, 20)).toBe(true);
    expect(cache.covers(STATUS_WINDOW + 65536, 1)).toBe(false); // past the 64 KiB memory chunk written
    await cache.learn(counting, 2 * STATUS_WINDOW + 10, 20);
    expect(calls[1]).toEqual([2 * STATUS_WINDOW, STATUS_WINDOW]);
    expect(cache.covers(2 * STATUS_WINDOW + 10, 20)).toBe(false);
  });
});
