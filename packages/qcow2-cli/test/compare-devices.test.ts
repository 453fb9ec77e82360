import { MemoryBlockDevice } from '@qcowkit/blockdev';
import fc from 'fast-check';
import { describe, expect, test } from 'vitest';
import { compareDevices, firstDifferingSector, SECTOR_SIZE } from '../src/compare/compare-devices.js';

/** A sparse device: only the 4 KiB chunks written to hold data (block status reports holes). */
function device(size: number, writes: ReadonlyArray<readonly [number, number]> = []): MemoryBlockDevice {
  const memory = new MemoryBlockDevice(size, { chunkSize: 4096 });
  for (const [offset, value] of writes) void memory.write(offset, Uint8Array.of(value));
  return memory;
}

/** The reference: the sector (counted from 0) of the first differing byte, zeros past an end
 * (sizes are multiples of 512, as every image qemu-img makes). */
function reference(a: Uint8Array, b: Uint8Array): number {
  const length = Math.max(a.length, b.length);
  for (let i = 0; i < length; i++) {
    if ((a[i] ?? 0) !== (b[i] ?? 0)) return Math.floor(i / SECTOR_SIZE) * SECTOR_SIZE;
  }
  return -1;
}

describe('compareDevices', () => {
  test('identical devices', async () => {
    expect(await compareDevices(device(65536, [[5, 1]]), device(65536, [[5, 1]]))).toEqual({
      kind: 'identical',
      sizeMismatch: false,
    });
  });

  test('a difference is reported at the start of its sector', async () => {
    expect(await compareDevices(device(65536), device(65536, [[1300, 9]]))).toEqual({
      kind: 'content-mismatch',
      offset: 1024,
      sizeMismatch: false,
    });
  });

  test('sizes: zeros past the shorter end are identical with a warning; -s refuses', async () => {
    expect(await compareDevices(device(4096), device(8192))).toEqual({
      kind: 'identical',
      sizeMismatch: true,
    });
    expect(await compareDevices(device(4096), device(8192, [[6000, 1]]))).toEqual({
      kind: 'content-mismatch',
      offset: 5632,
      sizeMismatch: true,
    });
    expect(await compareDevices(device(4096), device(8192), { strict: true })).toEqual({
      kind: 'strict-size-mismatch',
    });
  });

  test('read and status errors go to their handlers', async () => {
    const failing = device(4096, [[0, 1]]);
    failing.readInto = () => Promise.reject(new Error('boom'));
    await expect(
      compareDevices(failing, device(4096), {
        onReadError: (side, offset) => {
          throw new Error(`read ${side} ${offset}`);
        },
      }),
    ).rejects.toThrow('read 0 0');
    const noStatus = device(4096);
    noStatus.blockStatus = () => Promise.reject(new Error('boom'));
    await expect(
      compareDevices(device(4096), noStatus, {
        onStatusError: (side) => {
          throw new Error(`status ${side}`);
        },
      }),
    ).rejects.toThrow('status 1');
  });

  test('progress reaches the total', async () => {
    const seen: number[] = [];
    await compareDevices(device(8192), device(4096), { onProgress: (done) => seen.push(done) });
    expect(seen.at(-1)).toBe(8192);
  });

  test('matches a byte-by-byte reference on random devices', async () => {
    const writes = fc.array(fc.tuple(fc.nat(3 * 65536 - 1), fc.integer({ min: 1, max: 255 })), {
      maxLength: 6,
    });
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(65536, 3 * 65536, 100_352),
        fc.constantFrom(65536, 3 * 65536, 100_352),
        writes,
        writes,
        fc.constantFrom(512, 4096, 12_288, 2 ** 20),
        fc.integer({ min: 1, max: 4 }),
        async (sizeA, sizeB, writesA, writesB, chunkSize, readsInFlight) => {
          const a = device(
            sizeA,
            writesA.filter(([offset]) => offset < sizeA),
          );
          const b = device(
            sizeB,
            writesB.filter(([offset]) => offset < sizeB),
          );
          const [bytesA, bytesB] = await Promise.all([a.read(0, sizeA), b.read(0, sizeB)]);
          const expected = reference(bytesA, bytesB);
          const result = await compareDevices(a, b, { chunkSize, readsInFlight });
          if (expected < 0) expect(result.kind).toBe('identical');
          else expect(result).toMatchObject({ kind: 'content-mismatch', offset: expected });
        },
      ),
      { numRuns: 60 },
    );
  });

  test('firstDifferingSector', () => {
    const a = new Uint8Array(2000);
    const b = new Uint8Array(2000);
    expect(firstDifferingSector(a, b)).toBe(-1);
    b[1999] = 1;
    expect(firstDifferingSector(a, b)).toBe(1536);
    b[700] = 1;
    expect(firstDifferingSector(a, b)).toBe(512);
    b[0] = 1;
    expect(firstDifferingSector(a, b)).toBe(0);
  });
});
