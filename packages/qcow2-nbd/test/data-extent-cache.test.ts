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
    // The answer reached the device's end: the other windows are not asked about again, and
    // their holes stay holes.
    await cache.learn(counting, 2 * STATUS_WINDOW + 10, 20);
    await cache.learn(counting, STATUS_WINDOW + 65536, 1);
    expect(calls).toHaveLength(1);
    expect(cache.covers(2 * STATUS_WINDOW + 10, 20)).toBe(false);
  });

  it('asks again about a window the answer did not reach to its end', async () => {
    const device = new MemoryBlockDevice(3 * STATUS_WINDOW);
    const calls: [number, number][] = [];
    // A device answering one 1 MiB extent at a time (as a qcow2 image may, table by table).
    const stingy = {
      size: device.size,
      blockStatus: async (offset: number, length: number): Promise<Extent[]> => {
        calls.push([offset, length]);
        return [
          { offset, length: Math.min(length, 1 << 20), zero: false, data: true, present: true, depth: 0 },
        ];
      },
    } as unknown as BlockDevice;
    const cache = new DataExtentCache();
    await cache.learn(stingy, 0, 1);
    const first = calls.length;
    expect(first).toBe(STATUS_WINDOW / (1 << 20));
    expect(cache.covers(0, STATUS_WINDOW)).toBe(true);
    await cache.learn(stingy, 10, 1);
    expect(calls).toHaveLength(first);
    await cache.learn(stingy, STATUS_WINDOW + 10, 1);
    expect(calls.length).toBe(2 * first);
    expect(cache.covers(0, 2 * STATUS_WINDOW)).toBe(true);
  });
});

describe('DataExtentCache over a huge device', () => {
  it('learns a 2 PiB hole in one answer, and asks no more about any of its windows', async () => {
    // 2^25 windows: more than a Set of window numbers can hold (2^24).
    const size = 2 ** 51;
    const calls: number[] = [];
    const empty = {
      size,
      blockStatus: async (offset: number, length: number): Promise<Extent[]> => {
        calls.push(offset);
        return [{ offset, length, zero: true, data: false, present: false, depth: 0 }];
      },
    } as unknown as BlockDevice;
    const cache = new DataExtentCache();
    await cache.learn(empty, 0, 1);
    await cache.learn(empty, size - 1, 1);
    await cache.learn(empty, size / 2, STATUS_WINDOW * 4);
    expect(calls).toEqual([0]);
    expect(cache.covers(0, 1)).toBe(false);
  });
});
