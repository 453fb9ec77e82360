import { blockStatusAll, MemoryBlockDevice, OverlayBlockDevice } from '@qcowkit/blockdev';
import { patternBytes } from '@qcowkit/blockdev/testing';
import { describe, expect, it } from 'vitest';

const G = 4096;

/** A read-only lower device full of data, so any attempt to write it fails. */
function lowerWithData(size: number): { lower: MemoryBlockDevice; content: Uint8Array } {
  const content = patternBytes(99, size);
  return { lower: MemoryBlockDevice.from(content, { readOnly: true }), content };
}

describe('OverlayBlockDevice', () => {
  it('copies the rest of a granule from the lower device on a partial write', async () => {
    const { lower, content } = lowerWithData(4 * G);
    const overlay = new OverlayBlockDevice(lower, { granularity: G });
    await overlay.write(G + 100, new Uint8Array([1, 2, 3]));
    // The whole granule now lives in the upper device, with the lower bytes around the write.
    const upperGranule = await overlay.upper.read(G, G);
    const expected = content.slice(G, 2 * G);
    expected.set([1, 2, 3], 100);
    expect(upperGranule).toEqual(expected);
    expect(await overlay.read(0, 4 * G)).toEqual(
      (() => {
        const all = content.slice();
        all.set([1, 2, 3], G + 100);
        return all;
      })(),
    );
    expect(overlay.allocatedBytes).toBe(G);
    expect(await lower.read(0, 4 * G)).toEqual(content);
  });

  it('reports depth 0 where the overlay answers and the lower extents at depth + 1', async () => {
    const lower = new MemoryBlockDevice(8 * G, { chunkSize: G });
    await lower.write(6 * G, new Uint8Array(G).fill(1));
    const overlay = new OverlayBlockDevice(lower, { granularity: G });
    await overlay.write(0, new Uint8Array(G).fill(2));
    await overlay.writeZeroes(G, G);
    await overlay.resize(10 * G);
    expect(await blockStatusAll(overlay, 0, 10 * G)).toEqual([
      { offset: 0, length: G, zero: false, data: true, present: true, depth: 0 },
      { offset: G, length: G, zero: true, data: false, present: true, depth: 0 },
      { offset: 2 * G, length: 4 * G, zero: true, data: false, present: false, depth: 1 },
      { offset: 6 * G, length: G, zero: false, data: true, present: true, depth: 1 },
      { offset: 7 * G, length: 3 * G, zero: true, data: false, present: false, depth: 1 },
    ]);
  });

  it('hides the lower device where it was zeroed or discarded, partial granules included', async () => {
    const { lower } = lowerWithData(4 * G);
    const overlay = new OverlayBlockDevice(lower, { granularity: G });
    await overlay.discard(G - 10, 2 * G + 20);
    const bytes = await overlay.read(G - 10, 2 * G + 20);
    expect(bytes.every((b) => b === 0)).toBe(true);
    expect((await overlay.read(G - 11, 1))[0]).not.toBe(0);
  });

  it('serializes concurrent partial writes to the same granule', async () => {
    const { lower, content } = lowerWithData(2 * G);
    const overlay = new OverlayBlockDevice(lower, { granularity: G });
    const writes = [];
    const expected = content.slice();
    for (let index = 0; index < 64; index++) {
      const offset = index * 97;
      const data = new Uint8Array([index + 1, index + 1]);
      expected.set(data, offset);
      writes.push(overlay.write(offset, data));
    }
    await Promise.all(writes);
    expect(await overlay.read(0, 2 * G)).toEqual(expected);
  });

  it('grows past the lower device with zeros and commits into a writable lower device', async () => {
    const content = patternBytes(5, 3 * G + 7);
    const lower = MemoryBlockDevice.from(content);
    const overlay = new OverlayBlockDevice(lower, { granularity: G });
    await overlay.resize(5 * G);
    expect((await overlay.read(3 * G, 2 * G)).subarray(7).every((b) => b === 0)).toBe(true);
    await overlay.write(4 * G, new Uint8Array([7]));
    await overlay.writeZeroes(0, 10);
    expect(await lower.read(0, 10)).toEqual(content.subarray(0, 10));
    await overlay.commit();
    expect(lower.size).toBe(5 * G);
    const expected = new Uint8Array(5 * G);
    expected.set(content);
    expected.fill(0, 0, 10);
    expected[4 * G] = 7;
    expect(await lower.read(0, 5 * G)).toEqual(expected);
    expect(overlay.allocatedBytes).toBe(0);
    expect(await overlay.read(0, 5 * G)).toEqual(expected);
  });

  it('never shows the lower tail again after shrinking', async () => {
    const { lower } = lowerWithData(4 * G);
    const overlay = new OverlayBlockDevice(lower, { granularity: G });
    await overlay.resize(G + 1);
    await overlay.resize(4 * G);
    expect((await overlay.read(G + 1, 3 * G - 1)).every((b) => b === 0)).toBe(true);
  });

  it('keeps reads that overlap a commit correct', async () => {
    /** An upper device whose reads take a turn of the event loop. */
    class SlowUpper extends MemoryBlockDevice {
      override async readInto(buffer: Uint8Array, offset: number): Promise<void> {
        await new Promise((resolve) => setTimeout(resolve, 1));
        await super.readInto(buffer, offset);
      }
    }
    const lower = new MemoryBlockDevice(4 * G);
    const overlay = new OverlayBlockDevice(lower, { granularity: G, upper: new SlowUpper(4 * G) });
    const data = patternBytes(3, 4 * G);
    await overlay.write(0, data);
    const reads = Array.from({ length: 8 }, (_, index) => overlay.read(index * 512, G));
    await overlay.commit();
    for (const [index, read] of reads.entries()) {
      expect(Buffer.from(await read).equals(data.subarray(index * 512, index * 512 + G))).toBe(true);
    }
    expect(Buffer.from(await lower.read(0, 4 * G)).equals(data)).toBe(true);
  });
});
