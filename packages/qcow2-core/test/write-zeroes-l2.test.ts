/**
 * The L2 entries write zeroes leaves, read back from the image's storage (a memory device), as
 * QEMU 7.2 leaves them: the zero flag keeps an allocated cluster's host cluster (and COPIED)
 * unless may-unmap; compressed clusters always go; extended L2 entries get zero bits (whole
 * clusters: all of them, the host cluster kept unless may-unmap; subclusters: only theirs, the
 * host cluster kept); a v2 image discards; a part of a cluster is written as zeros unless the
 * rest of the cluster reads as zeros. Every image ends clean by our check.
 */
import { type BlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { describe, expect, it } from 'vitest';
import type { Qcow2CreateOptions } from '../src/create.js';
import { Qcow2Image } from '../src/image.js';
import { nodeCodecs } from '../src/node/node-codecs.js';
import { createSnapshot } from '../src/snapshot/index.js';
import { keepOpen } from './keep-open.js';

const KiB = 1024;
const CLUSTER = 64 * KiB;
const ZERO_FLAG = 1;
const COPIED_HIGH = 0x80000000;
const COMPRESSED_HIGH = 0x40000000;

interface Entry {
  readonly high: number;
  readonly low: number;
  /** Extended L2: bits 32..63 (reads as zeros) and 0..31 (allocated). */
  readonly zeroBits: number;
  readonly allocBits: number;
}

/** The active L2 entry of guest cluster `clusterIndex` as stored (undefined: no L2 table). */
async function l2Entry(
  storage: BlockDevice,
  clusterIndex: number,
  extendedL2 = false,
): Promise<Entry | undefined> {
  const header = new DataView((await storage.read(0, 104)).buffer);
  const l1Offset = header.getUint32(44);
  const clusterBits = header.getUint32(20);
  const entrySize = extendedL2 ? 16 : 8;
  const perTable = 2 ** clusterBits / entrySize;
  const l1 = new DataView((await storage.read(l1Offset + Math.floor(clusterIndex / perTable) * 8, 8)).buffer);
  const l2Offset = (l1.getUint32(0) & 0x00ffffff) * 2 ** 32 + (l1.getUint32(4) & 0xfffffe00);
  if (l2Offset === 0) return undefined;
  const bytes = await storage.read(l2Offset + (clusterIndex % perTable) * entrySize, entrySize);
  const view = new DataView(bytes.buffer);
  return {
    high: view.getUint32(0),
    low: view.getUint32(4),
    zeroBits: extendedL2 ? view.getUint32(8) : 0,
    allocBits: extendedL2 ? view.getUint32(12) : 0,
  };
}

const hostOffset = (entry: Entry | undefined): number =>
  entry === undefined ? 0 : (entry.high & 0x00ffffff) * 2 ** 32 + (entry.low & 0xfffffe00);

async function makeImage(
  options: Partial<Qcow2CreateOptions> = {},
): Promise<{ storage: BlockDevice; image: Qcow2Image }> {
  const storage = keepOpen(new MemoryBlockDevice(0));
  const image = await Qcow2Image.create(storage, { size: 1024 * KiB, codecs: nodeCodecs, ...options });
  return { storage, image };
}

/** Closes `image` (metadata written back) and checks it clean; returns the allocated clusters. */
async function closeClean(storage: BlockDevice, image: Qcow2Image): Promise<number> {
  await image.close();
  const reopened = await Qcow2Image.open(storage, { codecs: nodeCodecs });
  try {
    const result = await reopened.check();
    expect(result.corruptions, result.messages.join('\n')).toBe(0);
    expect(result.leaks, result.messages.join('\n')).toBe(0);
    return result.allocatedClusters;
  } finally {
    await reopened.close();
  }
}

describe('write zeroes: L2 entries as QEMU leaves them', () => {
  it('keeps an allocated cluster (zero flag, COPIED, same host offset) without may-unmap', async () => {
    const { storage, image } = await makeImage();
    await image.write(0, new Uint8Array(4 * CLUSTER).fill(1));
    await image.flush();
    const before = await l2Entry(storage, 0);
    await image.writeZeroes(0, CLUSTER, { mayUnmap: false });
    await image.flush();
    const after = await l2Entry(storage, 0);
    expect(hostOffset(after)).toBe(hostOffset(before));
    expect(hostOffset(after)).toBeGreaterThan(0);
    expect(after!.low & ZERO_FLAG).toBe(ZERO_FLAG);
    expect((after!.high & COPIED_HIGH) >>> 0).toBe(COPIED_HIGH);
    expect(await image.read(0, CLUSTER)).toEqual(new Uint8Array(CLUSTER));
    expect(await closeClean(storage, image)).toBe(4);
  });

  it('a later write reuses the zero-allocated host cluster (whole cluster written: zeros around the data)', async () => {
    const { storage, image } = await makeImage();
    await image.write(0, new Uint8Array(2 * CLUSTER).fill(1));
    await image.flush();
    const before = hostOffset(await l2Entry(storage, 1));
    await image.writeZeroes(CLUSTER, CLUSTER);
    await image.write(CLUSTER + 4 * KiB, new Uint8Array(4 * KiB).fill(2));
    await image.flush();
    const after = await l2Entry(storage, 1);
    expect(hostOffset(after)).toBe(before);
    expect(after!.low & ZERO_FLAG).toBe(0);
    expect((after!.high & COPIED_HIGH) >>> 0).toBe(COPIED_HIGH);
    const expected = new Uint8Array(CLUSTER);
    expected.fill(2, 4 * KiB, 8 * KiB);
    expect(await image.read(CLUSTER, CLUSTER)).toEqual(expected);
    // The host cluster itself holds the zeros (its old bytes were overwritten).
    expect(await storage.read(before, CLUSTER)).toEqual(expected);
    expect(await closeClean(storage, image)).toBe(2);
  });

  it('frees it with may-unmap (plain zero entry)', async () => {
    const { storage, image } = await makeImage();
    await image.write(0, new Uint8Array(4 * CLUSTER).fill(1));
    await image.writeZeroes(0, 2 * CLUSTER, { mayUnmap: true });
    await image.flush();
    for (const cluster of [0, 1]) {
      expect(await l2Entry(storage, cluster)).toEqual({ high: 0, low: ZERO_FLAG, zeroBits: 0, allocBits: 0 });
    }
    expect(await closeClean(storage, image)).toBe(2);
  });

  it('sets the zero flag on unallocated clusters, allocating their L2 table (v3)', async () => {
    const { storage, image } = await makeImage();
    expect(await l2Entry(storage, 8)).toBeUndefined();
    await image.writeZeroes(8 * CLUSTER, 2 * CLUSTER);
    await image.flush();
    expect(await l2Entry(storage, 8)).toEqual({ high: 0, low: ZERO_FLAG, zeroBits: 0, allocBits: 0 });
    expect(await l2Entry(storage, 10)).toEqual({ high: 0, low: 0, zeroBits: 0, allocBits: 0 });
    expect(await closeClean(storage, image)).toBe(0);
  });

  it('writes zeros into part of an allocated cluster; zeroes a whole unallocated one for part of it', async () => {
    const { storage, image } = await makeImage();
    await image.write(0, new Uint8Array(CLUSTER).fill(1));
    await image.flush();
    const before = await l2Entry(storage, 0);
    await image.writeZeroes(4 * KiB, 4 * KiB);
    await image.writeZeroes(5 * CLUSTER + 4 * KiB, 4 * KiB);
    await image.flush();
    expect(await l2Entry(storage, 0)).toEqual(before);
    const read = await image.read(0, CLUSTER);
    expect(read.subarray(4 * KiB, 8 * KiB)).toEqual(new Uint8Array(4 * KiB));
    expect(read[0]).toBe(1);
    expect(await l2Entry(storage, 5)).toEqual({ high: 0, low: ZERO_FLAG, zeroBits: 0, allocBits: 0 });
    expect(await closeClean(storage, image)).toBe(1);
  });

  it('always frees a compressed cluster', async () => {
    const { storage, image } = await makeImage();
    await image.writeCompressed(0, new Uint8Array(CLUSTER).fill(3));
    await image.flush();
    expect(((await l2Entry(storage, 0))!.high & COMPRESSED_HIGH) >>> 0).toBe(COMPRESSED_HIGH);
    await image.writeZeroes(0, CLUSTER, { mayUnmap: false });
    await image.flush();
    expect(await l2Entry(storage, 0)).toEqual({ high: 0, low: ZERO_FLAG, zeroBits: 0, allocBits: 0 });
    expect(await closeClean(storage, image)).toBe(0);
  });

  it('extended L2: whole clusters get every zero bit, subclusters only theirs; host clusters kept', async () => {
    const { storage, image } = await makeImage({ extendedL2: true });
    await image.write(0, new Uint8Array(2 * CLUSTER).fill(1));
    await image.flush();
    const first = hostOffset(await l2Entry(storage, 0, true));
    const second = hostOffset(await l2Entry(storage, 1, true));
    // Subclusters 3..31 of cluster 0 (2 KiB each), then all of cluster 1.
    await image.writeZeroes(6 * KiB, 2 * CLUSTER - 6 * KiB);
    await image.flush();
    const zeroed = await l2Entry(storage, 0, true);
    expect(hostOffset(zeroed)).toBe(first);
    expect(zeroed!.zeroBits).toBe(0xfffffff8);
    expect(zeroed!.allocBits).toBe(0x7);
    const whole = await l2Entry(storage, 1, true);
    expect(hostOffset(whole)).toBe(second);
    expect(whole!.zeroBits).toBe(0xffffffff);
    expect(whole!.allocBits).toBe(0);
    await image.writeZeroes(CLUSTER, CLUSTER, { mayUnmap: true });
    await image.flush();
    expect(await l2Entry(storage, 1, true)).toEqual({ high: 0, low: 0, zeroBits: 0xffffffff, allocBits: 0 });
    expect(await closeClean(storage, image)).toBe(1);
  });

  it('extended L2: zeroes up to an end that is not subcluster-aligned (the last subcluster counts whole)', async () => {
    const { storage, image } = await makeImage({ extendedL2: true, clusterSize: 16 * KiB, size: 600_000 });
    await image.resize(600_001);
    await image.write(541_703, new Uint8Array(600_001 - 541_703).fill(71));
    await image.writeZeroes(0, 1);
    await image.writeZeroes(589_825, 600_001 - 589_825);
    const expected = new Uint8Array(600_001 - 541_703).fill(71);
    expected.fill(0, 589_825 - 541_703);
    expect(await image.read(541_703, expected.length)).toEqual(expected);
    await image.close();
    const reopened = await Qcow2Image.open(storage, { codecs: nodeCodecs, readOnly: false });
    expect(await reopened.read(541_703, expected.length)).toEqual(expected);
    await closeClean(storage, reopened);
  });

  it('v2 (no zero flag, no backing file): discards whole clusters, even without may-unmap', async () => {
    const { storage, image } = await makeImage({ compat: '0.10' });
    await image.write(0, new Uint8Array(2 * CLUSTER).fill(1));
    await image.writeZeroes(0, CLUSTER, { mayUnmap: false });
    await image.flush();
    expect(await l2Entry(storage, 0)).toEqual({ high: 0, low: 0, zeroBits: 0, allocBits: 0 });
    expect(await closeClean(storage, image)).toBe(1);
  });

  it('a cluster shared with a snapshot keeps its host cluster without COPIED; the snapshot keeps its data', async () => {
    const made = await makeImage();
    const storage = made.storage;
    await made.image.write(0, new Uint8Array(CLUSTER).fill(5));
    await made.image.close();
    await createSnapshot(storage, 's1');
    const image = await Qcow2Image.open(storage, { codecs: nodeCodecs, readOnly: false });
    await image.writeZeroes(0, CLUSTER);
    await image.flush();
    const entry = await l2Entry(storage, 0);
    expect(hostOffset(entry)).toBeGreaterThan(0);
    expect(entry!.low & ZERO_FLAG).toBe(ZERO_FLAG);
    expect(entry!.high & COPIED_HIGH).toBe(0);
    expect(await image.read(0, CLUSTER)).toEqual(new Uint8Array(CLUSTER));
    await image.close();
    const snapshot = await Qcow2Image.open(storage, { codecs: nodeCodecs, snapshot: { name: 's1' } });
    expect(await snapshot.read(0, CLUSTER)).toEqual(new Uint8Array(CLUSTER).fill(5));
    await snapshot.close();
    const reopened = await Qcow2Image.open(storage, { codecs: nodeCodecs, readOnly: false });
    expect(await closeClean(storage, reopened)).toBe(1);
  });
});

describe('write zeroes with a raw external data file', () => {
  it('extended L2: zeroed subclusters read as zeros in the data file too (it stays a raw image of the guest)', async () => {
    const file = keepOpen(new MemoryBlockDevice(0));
    const data = keepOpen(new MemoryBlockDevice(64 * KiB));
    const image = await Qcow2Image.create(file, {
      size: 64 * KiB,
      clusterSize: 16 * KiB,
      extendedL2: true,
      dataFile: 'data.raw',
      dataFileRaw: true,
      resolveDataFile: async () => data,
    });
    await image.write(0, new Uint8Array(64 * KiB).fill(9));
    // Subclusters (512 B) of cluster 0 from 1 KiB, then of cluster 1 up to 21 KiB: no whole cluster.
    await image.writeZeroes(KiB, 20 * KiB);
    await image.flush();
    const guest = await image.read(0, 64 * KiB);
    expect(guest.subarray(KiB, 21 * KiB)).toEqual(new Uint8Array(20 * KiB));
    expect(await data.read(0, 64 * KiB)).toEqual(guest);
    const report = await image.check();
    expect(report.corruptions + report.leaks, report.messages.join('\n')).toBe(0);
    await image.close();
  });
});

describe('write zeroes: no write-back of its own', () => {
  it('zeros written in place after unmapping clusters (may-unmap, a partial tail over data) flush nothing', async () => {
    const storage = keepOpen(new MemoryBlockDevice(0));
    let flushes = 0;
    const counting = new Proxy(storage, {
      get(target, property) {
        if (property !== 'flush') return Reflect.get(target, property, target);
        return () => {
          flushes++;
          return target.flush();
        };
      },
    });
    const image = await Qcow2Image.create(counting, { size: 1024 * KiB, codecs: nodeCodecs });
    await image.write(0, new Uint8Array(4 * CLUSTER).fill(1));
    await image.flush();
    flushes = 0;
    await image.writeZeroes(0, 2 * CLUSTER + 4 * KiB, { mayUnmap: true });
    expect(flushes).toBe(0);
    const expected = new Uint8Array(4 * CLUSTER).fill(1);
    expected.fill(0, 0, 2 * CLUSTER + 4 * KiB);
    expect(await image.read(0, 4 * CLUSTER)).toEqual(expected);
    expect(await closeClean(storage, image)).toBe(2);
  });
});
