/**
 * `discardFreedClusters`: host clusters the image stops using are discarded in its file (punched,
 * on a regular file), once the L2 change that dropped them is written, as QEMU's discard=unmap
 * gives the space back; clusters a snapshot still holds are not. Off by default.
 */
import { type BlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { describe, expect, it } from 'vitest';
import { Qcow2Image } from '../src/image.js';
import { nodeCodecs } from '../src/node/node-codecs.js';
import { createSnapshot } from '../src/snapshot/index.js';
import { keepOpen } from './keep-open.js';

const CLUSTER = 64 * 1024;

/** `device` (kept open across closes) and the discards it received, [offset, length] each. */
function recorded(device: BlockDevice): { storage: BlockDevice; discards: [number, number][] } {
  const discards: [number, number][] = [];
  const storage = new Proxy(keepOpen(device), {
    get(target, property) {
      if (property === 'discard') {
        return (offset: number, length: number) => {
          discards.push([offset, length]);
          return target.discard(offset, length);
        };
      }
      const value = Reflect.get(target, property, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  return { storage, discards };
}

/** A 1 MiB image holding four clusters of 0x11 at guest 0, closed; its storage. */
async function imageWithData(): Promise<BlockDevice> {
  const device = keepOpen(new MemoryBlockDevice(0));
  const image = await Qcow2Image.create(device, { size: 16 * CLUSTER, codecs: nodeCodecs });
  await image.write(0, new Uint8Array(4 * CLUSTER).fill(0x11));
  await image.close();
  return device;
}

/** Host offset of guest cluster `index` (0: not allocated), as the image maps it. */
async function hostOf(image: Qcow2Image, index: number): Promise<number> {
  const [extent] = await image.blockStatus(index * CLUSTER, CLUSTER);
  return extent?.hostOffset ?? 0;
}

async function expectClean(storage: BlockDevice): Promise<void> {
  const image = await Qcow2Image.open(storage, { codecs: nodeCodecs });
  try {
    const result = await image.check();
    expect(result.corruptions, result.messages.join('\n')).toBe(0);
    expect(result.leaks, result.messages.join('\n')).toBe(0);
    const data = await image.read(0, 4 * CLUSTER);
    expect(data.subarray(0, CLUSTER).every((byte) => byte === 0x11)).toBe(true);
    expect(data.subarray(CLUSTER, 3 * CLUSTER).every((byte) => byte === 0)).toBe(true);
    expect(data.subarray(3 * CLUSTER).every((byte) => byte === 0x11)).toBe(true);
  } finally {
    await image.close();
  }
}

describe('discardFreedClusters', () => {
  it.each([
    ['discard', (image: Qcow2Image) => image.discard(CLUSTER, 2 * CLUSTER)],
    [
      'write zeroes that may unmap',
      (image: Qcow2Image) => image.writeZeroes(CLUSTER, 2 * CLUSTER, { mayUnmap: true }),
    ],
  ])('%s: the freed host clusters are discarded in the file, nothing else', async (_what, drop) => {
    const { storage, discards } = recorded(await imageWithData());
    const image = await Qcow2Image.open(storage, {
      readOnly: false,
      codecs: nodeCodecs,
      discardFreedClusters: true,
    });
    const hosts = [await hostOf(image, 1), await hostOf(image, 2)];
    expect(hosts.every((host) => host > 0)).toBe(true);
    await drop(image);
    await image.flush();
    const discarded = new Set<number>();
    for (const [offset, length] of discards) {
      expect(offset % CLUSTER).toBe(0);
      for (let at = offset; at < offset + length; at += CLUSTER) discarded.add(at);
    }
    expect([...discarded].sort((a, b) => a - b)).toEqual([...hosts].sort((a, b) => a - b));
    await image.close();
    await expectClean(storage);
  });

  it('is off by default: freed clusters stay in the file', async () => {
    const { storage, discards } = recorded(await imageWithData());
    const image = await Qcow2Image.open(storage, { readOnly: false, codecs: nodeCodecs });
    await image.discard(CLUSTER, 2 * CLUSTER);
    await image.close();
    expect(discards).toEqual([]);
    await expectClean(storage);
  });

  it('leaves the clusters a snapshot still holds', async () => {
    const device = await imageWithData();
    await createSnapshot(device, 'before');
    const { storage, discards } = recorded(device);
    const image = await Qcow2Image.open(storage, {
      readOnly: false,
      codecs: nodeCodecs,
      discardFreedClusters: true,
    });
    await image.discard(CLUSTER, 2 * CLUSTER);
    await image.close();
    // The snapshot's data clusters are shared (refcount 2 -> 1): none is discarded. (The active
    // L2 table, copied on the first change, frees nothing either: the snapshot keeps the old one.)
    expect(discards).toEqual([]);
    await expectClean(storage);
  });
});
