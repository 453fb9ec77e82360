/**
 * Damaged images: random byte mutations of real images (header, extensions, L1/L2 tables,
 * snapshot table, compressed data) either open and read, or fail with a typed BlockDeviceError;
 * never another exception, never a hang.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { blockStatusAll, isBlockDeviceError, MemoryBlockDevice } from '@qcowkit/blockdev';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Image, QcowImage } from '../src/index.js';
import { qemuImg, qemuIo, requireTools, tempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');

describe.skipIf(!haveQemu)('mutated images end in a typed error or a read', () => {
  let dir: { path: string; remove: () => void };
  const images: { name: string; bytes: Uint8Array; qcow: boolean }[] = [];
  beforeAll(() => {
    dir = tempDir();
    const d = dir.path;
    qemuImg(d, 'create', '-f', 'qcow2', '-o', 'cluster_size=4096', 'a.qcow2', '1M');
    qemuIo(d, 'a.qcow2', ['write -P 1 0 100000', 'write -z 200000 8192', 'write -c -P 2 524288 4096']);
    qemuImg(d, 'snapshot', '-c', 'snap', 'a.qcow2');
    qemuImg(
      d,
      'create',
      '-f',
      'qcow2',
      '-o',
      'cluster_size=16384,extended_l2=on,compression_type=zstd',
      'b.qcow2',
      '1M',
    );
    qemuIo(d, 'b.qcow2', ['write -P 3 1000 5000', 'write -c -P 4 65536 16384']);
    qemuImg(d, 'create', '-f', 'qcow', 'c.qcow', '1M');
    qemuIo(d, 'c.qcow', ['write -P 5 0 9000', 'write -c -P 6 65536 4096'], ['-f', 'qcow']);
    for (const name of ['a.qcow2', 'b.qcow2', 'c.qcow']) {
      images.push({ name, bytes: new Uint8Array(readFileSync(join(d, name))), qcow: name.endsWith('.qcow') });
    }
  });
  afterAll(() => dir.remove());

  it('survives random mutations', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 0, max: 2 }),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 }), fc.boolean()), {
          minLength: 1,
          maxLength: 6,
        }),
        fc.nat(),
        async (which, mutations, truncateSeed) => {
          const image = images[which]!;
          const bytes = image.bytes.slice();
          for (const [position, value, nearStart] of mutations) {
            // Half the mutations hit the first 8 KiB (header, extensions, tables), half anywhere.
            const span = nearStart ? Math.min(8192, bytes.length) : bytes.length;
            bytes[position % span] = value;
          }
          const length = truncateSeed % 5 === 0 ? truncateSeed % bytes.length : bytes.length;
          const file = MemoryBlockDevice.from(bytes.subarray(0, length));
          try {
            const opened = image.qcow
              ? await QcowImage.open(file)
              : await Qcow2Image.open(file, { openBacking: false });
            try {
              if (opened.size <= 64 * 1024 * 1024) await opened.read(0, opened.size);
              else await opened.read(0, 1024 * 1024);
              await blockStatusAll(opened, 0, Math.min(opened.size, 64 * 1024 * 1024));
            } finally {
              await opened.close();
            }
          } catch (error) {
            if (!isBlockDeviceError(error)) throw error;
            expect(error.code).toMatch(/^(ECORRUPT|EUNSUPPORTED|EINVAL|ENOENT)$/);
          }
        },
      ),
      { numRuns: 500 },
    );
  });
});
