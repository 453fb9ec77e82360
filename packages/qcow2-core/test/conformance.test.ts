/**
 * Qcow2Image and QcowImage as read-only BlockDevices: the conformance kit's read-only checks
 * (content, EROFS for every change, blockStatus consistent with the content) on images made by
 * qemu-img from known content, plus random and concurrent ranged reads against that content.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type BlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { checkReadOnly, patternBytes } from '@qcowkit/blockdev/testing';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Qcow2Image, QcowImage } from '../src/index.js';
import { openImage } from '../src/node/index.js';
import { qemuImg, requireTools, suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img');

/** Content with data, runs of zeros and an unaligned size. */
function content(size: number): Uint8Array {
  const bytes = patternBytes(17, size);
  bytes.fill(0, Math.floor(size * 0.2), Math.floor(size * 0.45));
  bytes.fill(0, size - 3000, size - 100);
  return bytes;
}

type Variant = { name: string; convert: string[]; format?: 'qcow' };
const variants: Variant[] = [
  { name: 'qcow2 64 KiB', convert: ['-O', 'qcow2'] },
  { name: 'qcow2 4 KiB', convert: ['-O', 'qcow2', '-o', 'cluster_size=4096'] },
  {
    name: 'qcow2 compressed zstd',
    convert: ['-c', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=4096'],
  },
  { name: 'qcow2 extended L2', convert: ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=32768'] },
  { name: 'qcow v1', convert: ['-O', 'qcow'], format: 'qcow' },
];

describe.skipIf(!haveQemu)('read-only BlockDevice conformance', () => {
  const dir = suiteTempDir();
  let counter = 0;

  /** An image of `variant` holding `bytes`, opened from memory (no Node in the engine). */
  async function build(variant: Variant, bytes: Uint8Array): Promise<BlockDevice> {
    const name = `img-${counter++}`;
    writeFileSync(join(dir.path, `${name}.raw`), bytes);
    qemuImg(dir.path, 'convert', '-f', 'raw', ...variant.convert, `${name}.raw`, `${name}.img`);
    const file = MemoryBlockDevice.from(new Uint8Array(readFileSync(join(dir.path, `${name}.img`))));
    const image = variant.format === 'qcow' ? await QcowImage.open(file) : await Qcow2Image.open(file);
    // qemu-img rounds the size up to 512: the extra tail reads as zeros.
    expect(image.size).toBe(Math.ceil(bytes.length / 512) * 512);
    return image;
  }

  for (const variant of variants) {
    describe(variant.name, () => {
      it('passes the kit read-only checks', async () => {
        const bytes = content(70_003);
        const padded = new Uint8Array(Math.ceil(bytes.length / 512) * 512);
        padded.set(bytes);
        const device = await build(variant, bytes);
        try {
          await checkReadOnly(device, padded);
          await expect(device.write(device.size, new Uint8Array(1))).rejects.toMatchObject({
            code: 'ENOSPC',
          });
          await expect(device.read(device.size, 1)).rejects.toMatchObject({ code: 'EINVAL' });
        } finally {
          await device.close();
        }
        await expect(device.read(0, 1)).rejects.toMatchObject({ code: 'ECLOSED' });
        await expect(device.blockStatus(0, 1)).rejects.toMatchObject({ code: 'ECLOSED' });
      });

      it('random and concurrent ranged reads equal the content', async () => {
        const bytes = content(1_000_000);
        const device = await build(variant, bytes);
        try {
          await fc.assert(
            fc.asyncProperty(
              fc.array(
                fc.tuple(fc.integer({ min: 0, max: bytes.length - 1 }), fc.integer({ min: 0, max: 300_000 })),
                { minLength: 1, maxLength: 8 },
              ),
              async (requests) => {
                const results = await Promise.all(
                  requests.map(([offset, length]) => {
                    const clipped = Math.min(length, bytes.length - offset);
                    return device.read(offset, clipped).then((data) => ({ offset, data }));
                  }),
                );
                for (const { offset, data } of results) {
                  expect(
                    Buffer.from(data).equals(Buffer.from(bytes.subarray(offset, offset + data.length))),
                  ).toBe(true);
                }
              },
            ),
            { numRuns: 25 },
          );
        } finally {
          await device.close();
        }
      });
    });
  }

  it('reads correctly through a tiny L2 cache under concurrency (eviction and shared misses)', async () => {
    const bytes = content(600_000);
    writeFileSync(join(dir.path, 'tiny-cache.raw'), bytes);
    qemuImg(
      dir.path,
      'convert',
      '-f',
      'raw',
      '-O',
      'qcow2',
      '-o',
      'cluster_size=512',
      'tiny-cache.raw',
      'tiny-cache.qcow2',
    );
    const file = MemoryBlockDevice.from(new Uint8Array(readFileSync(join(dir.path, 'tiny-cache.qcow2'))));
    const image = await Qcow2Image.open(file, { l2CacheBytes: 1024, concurrency: 3 });
    try {
      const reads = Array.from({ length: 40 }, (_, index) => {
        const offset = (index * 15_013) % (bytes.length - 20_000);
        return image.read(offset, 20_000).then((data) => ({ offset, data }));
      });
      for (const { offset, data } of await Promise.all(reads)) {
        expect(Buffer.from(data).equals(Buffer.from(bytes.subarray(offset, offset + data.length)))).toBe(
          true,
        );
      }
      expect(image.l2CacheStats.bytes).toBeLessThanOrEqual(1024);
      expect(image.l2CacheStats.misses).toBeGreaterThan(2);
    } finally {
      await image.close();
    }
  });

  it('close waits for reads in flight', async () => {
    const bytes = content(500_000);
    const device = await build(variants[0]!, bytes);
    const reading = device.read(0, bytes.length);
    const closing = device.close();
    expect(Buffer.from(await reading).equals(Buffer.from(bytes))).toBe(true);
    await closing;
  });

  it('a chain through openImage reads its content (raw base, empty qcow2 overlay)', async () => {
    const bytes = content(300_000);
    writeFileSync(join(dir.path, 'chain-base.raw'), bytes);
    qemuImg(dir.path, 'create', '-f', 'qcow2', '-b', 'chain-base.raw', '-F', 'raw', 'chain-top.qcow2');
    const opened = await openImage(join(dir.path, 'chain-top.qcow2'));
    try {
      await checkReadOnly(opened.device, bytes);
    } finally {
      await opened.close();
    }
  });
});
