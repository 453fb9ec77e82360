import { isBlockDeviceError, MemoryBlockDevice } from '@qcowkit/blockdev';
import { Qcow2Image } from '@qcowkit/qcow2-core';
import { afterEach, describe, expect, it } from 'vitest';
import { FastZeroQcow2, zeroesInMetadata } from '../src/cli/qcow2-fast-zero.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 64 * KiB;
const SIZE = 4 * MiB - 512;

async function rejectionCode(promise: Promise<unknown>): Promise<string | undefined> {
  try {
    await promise;
    return undefined;
  } catch (error) {
    return isBlockDeviceError(error) ? error.code : String(error);
  }
}

describe('FastZeroQcow2', () => {
  let device: FastZeroQcow2 | undefined;
  afterEach(async () => {
    await device?.close();
    device = undefined;
  });

  /** A v3 image in memory (4 MiB less 512 bytes: its last cluster is short) with 0x5a bytes over
   * its first MiB. */
  async function image(): Promise<FastZeroQcow2> {
    const qcow2 = await Qcow2Image.create(new MemoryBlockDevice(0), {
      size: SIZE,
      clusterSize: CLUSTER,
    });
    await qcow2.write(0, new Uint8Array(MiB).fill(0x5a));
    device = new FastZeroQcow2(qcow2);
    return device;
  }

  async function bytesAt(offset: number, length: number): Promise<Uint8Array> {
    return device!.read(offset, length);
  }

  it('zeroes whole clusters in the metadata and says so in its capabilities', async () => {
    const zeroable = await image();
    expect(zeroable.capabilities.fastZero).toBe(true);
    await zeroable.writeZeroes(CLUSTER, 3 * CLUSTER, { fastOnly: true });
    expect((await bytesAt(CLUSTER, 3 * CLUSTER)).every((byte) => byte === 0)).toBe(true);
    expect((await bytesAt(0, CLUSTER)).every((byte) => byte === 0x5a)).toBe(true);
    expect((await bytesAt(4 * CLUSTER, CLUSTER)).every((byte) => byte === 0x5a)).toBe(true);
    const [extent] = await zeroable.blockStatus(CLUSTER, 3 * CLUSTER);
    expect(extent).toMatchObject({ offset: CLUSTER, length: 3 * CLUSTER, zero: true, data: false });
  });

  it('refuses (ENOTSUP) and changes nothing when a partial cluster at either end holds data', async () => {
    const zeroable = await image();
    // Whole clusters 1-3, and a tail of 1000 bytes of data in cluster 4.
    expect(await rejectionCode(zeroable.writeZeroes(CLUSTER, 3 * CLUSTER + 1000, { fastOnly: true }))).toBe(
      'ENOTSUP',
    );
    // A head of data in cluster 0.
    expect(await rejectionCode(zeroable.writeZeroes(100, CLUSTER, { fastOnly: true }))).toBe('ENOTSUP');
    // Inside one cluster.
    expect(await rejectionCode(zeroable.writeZeroes(100, 200, { fastOnly: true }))).toBe('ENOTSUP');
    expect((await bytesAt(0, MiB)).every((byte) => byte === 0x5a)).toBe(true);
    // Without fastOnly the same request writes the partial clusters.
    await zeroable.writeZeroes(CLUSTER, 3 * CLUSTER + 1000);
    expect((await bytesAt(CLUSTER, 3 * CLUSTER + 1000)).every((byte) => byte === 0)).toBe(true);
    expect((await bytesAt(4 * CLUSTER + 1000, 10)).every((byte) => byte === 0x5a)).toBe(true);
  });

  it('accepts partial clusters that read as zeros already, and never widens them', async () => {
    const zeroable = await image();
    // Unallocated clusters read as zeros: partial ends there are fine.
    await zeroable.writeZeroes(MiB + 10, 2 * MiB, { fastOnly: true });
    // A head of zeros made by an earlier zeroing, then whole data clusters.
    await zeroable.writeZeroes(2 * CLUSTER, 2 * CLUSTER);
    await zeroable.writeZeroes(3 * CLUSTER + 500, 2 * CLUSTER - 500, { fastOnly: true });
    expect((await bytesAt(2 * CLUSTER, 3 * CLUSTER)).every((byte) => byte === 0)).toBe(true);
    expect((await bytesAt(5 * CLUSTER, 4)).every((byte) => byte === 0x5a)).toBe(true);
    // The image's last, short cluster counts as whole when the request reaches the end.
    await zeroable.write(SIZE - 1000, new Uint8Array(1000).fill(1));
    expect(await rejectionCode(zeroable.writeZeroes(SIZE - 1000, 1000, { fastOnly: true }))).toBe('ENOTSUP');
    const lastCluster = 4 * MiB - CLUSTER;
    await zeroable.writeZeroes(lastCluster, SIZE - lastCluster, { fastOnly: true });
    expect((await bytesAt(SIZE - 1000, 1000)).every((byte) => byte === 0)).toBe(true);
  });

  it('offers no fast zeroing on v2 images over a backing file, raw data files, read-only images', () => {
    const base = { version: 3 as const, backingFileName: undefined, dataFileRaw: false, readOnly: false };
    const as = (patch: object) => zeroesInMetadata({ ...base, ...patch } as never);
    expect(as({})).toBe(true);
    expect(as({ version: 2 })).toBe(true);
    expect(as({ version: 2, backingFileName: 'base.qcow2' })).toBe(false);
    expect(as({ backingFileName: 'base.qcow2' })).toBe(true);
    expect(as({ dataFileRaw: true })).toBe(false);
    expect(as({ readOnly: true })).toBe(false);
  });
});
