/**
 * Metadata preallocation of a grown range (`Qcow2Image.preallocateMetadata(fromGuest)`, what
 * `qcow2 resize --preallocation=metadata` uses): every cluster of the range gets a host cluster,
 * the range reads as zeros even where a freed cluster holding old bytes is reused, clusters that
 * already had a host cluster keep it, and the image checks clean.
 */
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { describe, expect, it } from 'vitest';
import { checkQcow2Image } from '../src/check/index.js';
import { Qcow2Image } from '../src/image.js';

const KiB = 1024;
const CLUSTER = 64 * KiB;

async function grownImage(compat: '0.10' | '1.1') {
  const first = new MemoryBlockDevice(0);
  let image = await Qcow2Image.create(first, { size: 1000 * KiB, compat });
  // Data everywhere, then the first half discarded: its clusters are free and hold old bytes.
  await image.write(0, new Uint8Array(1000 * KiB).fill(0xa5));
  const freedHost = (await image.blockStatus(0, CLUSTER))[0]?.hostOffset;
  await image.discard(0, 512 * KiB);
  await image.flush();
  await image.flush();
  // A host file need not zero what is discarded: the freed clusters keep old bytes.
  expect(freedHost).toBeGreaterThan(0);
  await first.write(freedHost ?? 0, new Uint8Array(8 * CLUSTER).fill(0x5a));
  // Reopened, the allocator starts from the first free cluster: the discarded ones come first.
  const file = MemoryBlockDevice.from(await first.read(0, first.size));
  await image.close();
  image = await Qcow2Image.open(file, { readOnly: false });
  const lastHost = (await image.blockStatus(960 * KiB, 40 * KiB))[0];
  // Eight clusters grown: they fit the eight discarded ones, which the allocator finds first.
  await image.resize(1536 * KiB);
  await image.preallocateMetadata(1000 * KiB);
  return { file, image, lastHost };
}

describe('preallocateMetadata of a grown range', () => {
  for (const compat of ['1.1', '0.10'] as const) {
    it(`compat ${compat}: allocates every grown cluster, reads zeros, keeps existing clusters`, async () => {
      const { file, image, lastHost } = await grownImage(compat);
      const grown = await image.read(1000 * KiB, image.size - 1000 * KiB);
      expect(grown.every((byte) => byte === 0)).toBe(true);
      const kept = await image.read(512 * KiB, 488 * KiB);
      expect(kept.every((byte) => byte === 0xa5)).toBe(true);
      // The partial last cluster keeps its host cluster; every later one has one now.
      const status = await image.blockStatus(960 * KiB, image.size - 960 * KiB);
      expect(status[0]?.hostOffset).toBe(lastHost?.hostOffset);
      for (const extent of status) expect(extent.data).toBe(true);
      const covered = status.reduce((sum, extent) => sum + extent.length, 0);
      expect(covered).toBe(image.size - 960 * KiB);
      await image.flush();
      const copy = MemoryBlockDevice.from(await file.read(0, file.size));
      await image.close();
      const result = await checkQcow2Image(await Qcow2Image.open(copy));
      expect(result.corruptions).toBe(0);
      expect(result.leaks).toBe(0);
      expect(result.allocatedClusters).toBe(Math.ceil((image.size - 512 * KiB) / CLUSTER));
    });
  }

  it('refuses a range the backing file shows through without extended L2', async () => {
    const backing = new MemoryBlockDevice(2 * 1024 * KiB);
    const file = new MemoryBlockDevice(0);
    const image = await Qcow2Image.create(file, {
      size: 1024 * KiB,
      backingFile: 'base.raw',
      backingFormat: 'raw',
      resolveBacking: async () => backing,
    });
    await expect(image.preallocateMetadata(0)).rejects.toMatchObject({ code: 'EUNSUPPORTED' });
    await image.close();
  });
});
