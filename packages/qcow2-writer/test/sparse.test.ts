/**
 * `sparseSize` (qemu-img convert -S) for qcow2 output: the zero-run rule on sector patterns, and
 * what conversions store for 0, sizes up to a cluster and sizes above it.
 */
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { convertToQcow2, planConversion } from '@qcowkit/qcow2-writer/node';
import { describe, expect, it } from 'vitest';
import { sparseMode, sparseWrittenRuns } from '../src/sparse.js';
import { expectSameBytes, memorySink, memorySource, openChecked } from './helpers.js';

/** Written runs for a pattern of sectors: `#` data, `.` zeros. */
function runs(pattern: string, minSectors: number, alignSectors: number, firstSector = 0): string[] {
  const zero = Uint8Array.from([...pattern], (char) => (char === '.' ? 1 : 0));
  const out: string[] = [];
  sparseWrittenRuns(zero, zero.length, firstSector, minSectors, alignSectors, (from, to) =>
    out.push(`${from}-${to}`),
  );
  return out;
}

describe('the zero-run rule', () => {
  it('writes zero runs shorter than the least run with the data around them', () => {
    expect(runs('##..##', 4, 1)).toEqual(['0-6']);
    expect(runs('##....##', 4, 1)).toEqual(['0-2', '6-8']);
    expect(runs('#.#..#...#', 3, 1)).toEqual(['0-6', '9-10']);
  });

  it('never writes zeros at the start or the end of a piece, whatever their length', () => {
    expect(runs('.##.', 8, 1)).toEqual(['1-3']);
    expect(runs('....', 8, 1)).toEqual([]);
    expect(runs('####', 8, 1)).toEqual(['0-4']);
  });

  it('snaps runs to the alignment', () => {
    // Data ends move up to the next aligned sector (not past the piece's end).
    expect(runs('#.......', 1, 4)).toEqual(['0-4']);
    expect(runs('#..', 1, 4)).toEqual(['0-3']);
    // A zero run's end moves down; one inside the aligned block of the data after it is data.
    expect(runs('......##', 1, 4)).toEqual(['4-8']);
    expect(runs('.##.....', 1, 4)).toEqual(['0-4']);
    // Alignment counts from the guest's start, not the piece's.
    expect(runs('#.......', 1, 4, 2)).toEqual(['0-2']);
  });

  it('applies the rule only where it changes something', () => {
    expect(sparseMode(undefined, 65536, false)).toBe('clusters');
    expect(sparseMode(0, 65536, false)).toBe('all');
    expect(sparseMode(0, 65536, true)).toBe('all');
    expect(sparseMode(65536, 65536, false)).toBe('clusters');
    expect(sparseMode(65536 + 512, 65536, false)).toBe('runs');
    expect(sparseMode(2 ** 20, 65536, true)).toBe('clusters');
  });
});

describe('convert with sparseSize', () => {
  const cluster = 4096;
  const mark = (value: number) => new Uint8Array(512).fill(value);
  // One sector of data at the start of clusters 0, 3 and 10; zeros up to 16 clusters.
  const source = () =>
    memorySource(16 * cluster, [
      { offset: 0, data: mark(1) },
      { offset: 3 * cluster, data: mark(2) },
      { offset: 10 * cluster, data: mark(3) },
    ]);
  const dataClusters = async (sparseSize: number | undefined, compress = false) => {
    const device = await source();
    const plan = await planConversion(device, {
      clusterSize: cluster,
      compress,
      ...(sparseSize === undefined ? {} : { sparseSize }),
    });
    const sink = memorySink();
    await plan.write(sink.sink);
    const image = await openChecked(sink.bytes());
    const copy = new Uint8Array(device.size);
    await image.readInto(copy, 0);
    const original = new Uint8Array(device.size);
    await device.readInto(original, 0);
    expectSameBytes(copy, original);
    const allocated: number[] = [];
    for (const extent of await image.blockStatus(0, image.size)) {
      if (!extent.data) continue;
      for (let at = extent.offset; at < extent.offset + extent.length; at += cluster)
        allocated.push(at / cluster);
    }
    await image.close();
    return allocated;
  };

  it('stores only clusters with data by default and for sizes up to a cluster', async () => {
    expect(await dataClusters(undefined)).toEqual([0, 3, 10]);
    expect(await dataClusters(512)).toEqual([0, 3, 10]);
    expect(await dataClusters(cluster)).toEqual([0, 3, 10]);
  });

  it('stores short zero runs between data, snapped to the alignment', async () => {
    // 8 KiB (16 sectors, aligned to 16): the data at 0 is written up to 8 KiB; the zeros from
    // there to cluster 3 lie in the aligned block of its data, so they are written too; the 24 KiB
    // of zeros before cluster 10 are long enough to be left out; cluster 10's data is written up
    // to its aligned end (cluster 11).
    expect(await dataClusters(2 * cluster)).toEqual([0, 1, 2, 3, 10, 11]);
  });

  it('0 stores every cluster, compressed or not', async () => {
    const all = Array.from({ length: 16 }, (_, index) => index);
    expect(await dataClusters(0)).toEqual(all);
    expect(await dataClusters(0, true)).toEqual(all);
    expect(await dataClusters(4 * cluster, true)).toEqual([0, 3, 10]);
  });

  it('refuses sizes qemu-img refuses', async () => {
    const device = new MemoryBlockDevice(cluster);
    for (const sparseSize of [100, -512, 32 * 2 ** 20]) {
      await expect(planConversion(device, { sparseSize })).rejects.toMatchObject({ code: 'EINVAL' });
    }
    await expect(convertToQcow2(device, () => {}, { sparseSize: 0 })).resolves.toBeGreaterThan(0);
  });
});
