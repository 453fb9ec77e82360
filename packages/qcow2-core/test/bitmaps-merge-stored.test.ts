/**
 * PersistentBitmaps.mergeStored (another image's stored bitmap merged one bitmap cluster at a time,
 * for convert --bitmaps) against merge of the whole bitmap read by readStoredBitmap: the same bits
 * for random sets of ranges, granularities and cluster sizes on both sides; its refusals.
 */
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { forEachStoredRun, Qcow2Image, readStoredBitmap } from '../src/index.js';
import { keepOpen } from './keep-open.js';

/** A source image of `size` bytes whose bitmap 'b' has the bits of `ranges` set, stored. */
async function sourceWith(
  size: number,
  clusterSize: number,
  granularity: number,
  ranges: readonly [number, number][],
): Promise<Qcow2Image> {
  const storage = keepOpen(new MemoryBlockDevice(0));
  const image = await Qcow2Image.create(storage, { size, clusterSize });
  const bitmaps = await image.persistentBitmaps();
  bitmaps.add('b', { granularity });
  for (const [offset, length] of ranges) bitmaps.bitmap('b')!.setGuestRange(offset, length);
  await image.close();
  return Qcow2Image.open(storage);
}

describe('PersistentBitmaps.mergeStored', () => {
  it('sets the bits merge sets from the whole stored bitmap (property)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 3 * 2 ** 20 }),
        fc.constantFrom(512, 4096),
        fc.constantFrom(512, 4096),
        fc.constantFrom(512, 2048, 65536),
        fc.constantFrom(512, 2048, 65536),
        fc.array(fc.tuple(fc.double({ min: 0, max: 1, noNaN: true }), fc.integer({ min: 1, max: 300_000 })), {
          maxLength: 12,
        }),
        async (size, sourceCluster, targetCluster, sourceGranularity, targetGranularity, picks) => {
          const ranges = picks.map(
            ([at, length]) => [Math.floor(at * (size - 1)), Math.min(length, size)] as [number, number],
          );
          const source = await sourceWith(size, sourceCluster, sourceGranularity, ranges);
          const target = await Qcow2Image.create(new MemoryBlockDevice(0), {
            size,
            clusterSize: targetCluster,
          });
          const bitmaps = await target.persistentBitmaps();
          bitmaps.add('streamed', { granularity: targetGranularity });
          bitmaps.add('whole', { granularity: targetGranularity });
          await bitmaps.mergeStored('streamed', source, 'b');
          bitmaps.merge('whole', await readStoredBitmap(source, 'b'), source.size);
          const streamed = await bitmaps.currentBits('streamed');
          expect(streamed).toEqual(await bitmaps.currentBits('whole'));
          if (sourceGranularity === targetGranularity) {
            expect(streamed.bits).toEqual((await readStoredBitmap(source, 'b')).bits);
          }
          await source.close();
          await target.close();
        },
      ),
      { numRuns: 40 },
    );
  });

  it('reports runs merged across bitmap clusters, the last one cut at the last bit', async () => {
    // 512 B clusters hold 4096 bits: bits 4000-4200 cross a cluster boundary.
    const source = await sourceWith(2 ** 22, 512, 512, [
      [4000 * 512, 200 * 512],
      [2 ** 22 - 700, 700],
    ]);
    const runs: [number, number][] = [];
    const { bitCount } = await forEachStoredRun(source, 'b', (first, end) => runs.push([first, end]));
    expect(bitCount).toBe(8192);
    expect(runs).toEqual([
      [4000, 4200],
      [8190, 8192],
    ]);
    await source.close();
  });

  it('an all-ones table entry (no data cluster) reads as set bits', async () => {
    const storage = keepOpen(new MemoryBlockDevice(0));
    const image = await Qcow2Image.create(storage, { size: 2 ** 22, clusterSize: 512 });
    (await image.persistentBitmaps()).add('b', { granularity: 512 });
    (await image.persistentBitmaps()).bitmap('b')!.setBits(5000, 5001);
    await image.close();
    const tableOffset = (await Qcow2Image.open(storage)).bitmapDirectory[0]!.tableOffset;
    // Entry 0 (bits 0-4095): offset 0 with bit 0 set, all ones.
    await storage.write(tableOffset, new Uint8Array([0, 0, 0, 0, 0, 0, 0, 1]));
    const source = await Qcow2Image.open(storage);
    const runs: [number, number][] = [];
    await forEachStoredRun(source, 'b', (first, end) => runs.push([first, end]));
    expect(runs).toEqual([
      [0, 4096],
      [5000, 5001],
    ]);
    const target = await Qcow2Image.create(new MemoryBlockDevice(0), { size: 2 ** 22, clusterSize: 4096 });
    const bitmaps = await target.persistentBitmaps();
    bitmaps.add('t', { granularity: 512 });
    await bitmaps.mergeStored('t', source, 'b');
    expect((await bitmaps.currentBits('t')).bits).toEqual((await readStoredBitmap(source, 'b')).bits);
    await target.close();
  });

  it("refuses another guest size with QEMU's words, and an in-use or missing source bitmap", async () => {
    const source = await sourceWith(2 ** 20, 512, 4096, [[0, 1]]);
    const target = await Qcow2Image.create(new MemoryBlockDevice(0), { size: 2 ** 21, clusterSize: 512 });
    const bitmaps = await target.persistentBitmaps();
    bitmaps.add('t');
    await expect(bitmaps.mergeStored('t', source, 'b')).rejects.toThrow(
      "Bitmaps are of different sizes (destination size is 2097152, source size is 1048576) and can't be merged",
    );
    await expect(forEachStoredRun(source, 'nope', () => {})).rejects.toMatchObject({ code: 'ENOENT' });
    const inUse = {
      file: source.file,
      size: source.size,
      clusterSize: source.clusterSize,
      bitmapDirectory: source.bitmapDirectory.map((entry) => ({ ...entry, inUse: true })),
    };
    await expect(forEachStoredRun(inUse, 'b', () => {})).rejects.toMatchObject({ code: 'EINVAL' });
    await source.close();
    await target.close();
  });
});
