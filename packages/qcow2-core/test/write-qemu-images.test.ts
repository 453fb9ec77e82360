/**
 * Images QEMU made (internal snapshots, compressed clusters, a backing file, extended L2), written
 * into by us (writes, partial writes, zeroes, discards over shared, compressed and backing-file
 * clusters), then checked by qemu-img: `check` clean, the active state equal to the same changes
 * applied to a raw copy, and the snapshot still equal to what it held.
 */
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { patternBytes } from '@qcowkit/blockdev/testing';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/node/index.js';
import { qemuImg, qemuIo, requireTools, suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');
const SIZE = 4 << 20;

interface Variant {
  name: string;
  create: string[];
  backing?: boolean;
}

const variants: Variant[] = [
  { name: '64 KiB clusters with a snapshot and compressed clusters', create: ['-o', 'cluster_size=65536'] },
  { name: '4 KiB clusters, 8-bit refcounts, snapshot', create: ['-o', 'cluster_size=4096,refcount_bits=8'] },
  { name: 'extended L2 with a snapshot', create: ['-o', 'cluster_size=32768,extended_l2=on'] },
  { name: 'v2 with a snapshot', create: ['-o', 'compat=0.10,cluster_size=4096'] },
  { name: 'over a backing file', create: ['-o', 'cluster_size=16384'], backing: true },
];

describe.skipIf(!haveQemu)('writing into images QEMU made', () => {
  const dir = suiteTempDir();

  variants.forEach((variant, index) => {
    it(variant.name, async () => {
      const image = `q-${index}.qcow2`;
      const raw = `q-${index}.raw`;
      const snapshotRaw = `q-${index}-snap.raw`;
      const backingArgs = variant.backing ? ['-b', `base-${index}.raw`, '-F', 'raw'] : [];
      if (variant.backing) writeFileSync(join(dir.path, `base-${index}.raw`), patternBytes(index + 50, SIZE));
      qemuImg(
        dir.path,
        'create',
        '-q',
        '-f',
        'qcow2',
        ...variant.create,
        ...backingArgs,
        image,
        String(SIZE),
      );
      qemuIo(dir.path, image, [
        'write -P 0x11 0 1M',
        'write -c -P 0x22 1M 256k',
        'write -z 2M 128k',
        'write -P 0x33 3M 64k',
      ]);
      if (!variant.backing) qemuImg(dir.path, 'snapshot', '-c', 'before', image);
      qemuImg(dir.path, 'convert', '-O', 'raw', image, raw);
      copyFileSync(join(dir.path, raw), join(dir.path, snapshotRaw));

      const expected = new Uint8Array(readFileSync(join(dir.path, raw)));
      const opened = await openImage(join(dir.path, image), { readOnly: false });
      const device = opened.device;
      const changes: [number, Uint8Array | number][] = [
        [100, patternBytes(1, 5000)], // partial, over a snapshot-shared cluster
        [1_000_000, patternBytes(2, 200_000)], // across shared and compressed clusters
        [(1 << 20) + 70_000, patternBytes(3, 3)], // inside a compressed cluster
        [(2 << 20) + 1000, patternBytes(4, 9000)], // over zero clusters
        [(3 << 20) + 500, 300_000], // zeroes over data and unallocated clusters
        [SIZE - 7000, patternBytes(5, 7000)], // unallocated (backing file) cluster, partial
      ];
      for (const [at, change] of changes) {
        if (typeof change === 'number') {
          await device.writeZeroes(at, change);
          expected.fill(0, at, at + change);
        } else {
          await device.write(at, change);
          expected.set(change, at);
        }
      }
      await device.discard(0, 65536);
      // A v3 image reads zeros after a discard, a backing file or not (QEMU sets the zero flag).
      expected.fill(0, 0, 65536);
      expect(Buffer.compare(await device.read(0, SIZE), expected)).toBe(0);
      await opened.close();

      expect(qemuImg(dir.path, 'check', image)).toContain('No errors were found');
      writeFileSync(join(dir.path, raw), expected);
      qemuImg(dir.path, 'compare', '-f', 'qcow2', '-F', 'raw', image, raw);
      if (!variant.backing) {
        qemuImg(dir.path, 'convert', '-l', 'snapshot.name=before', '-O', 'raw', image, `${snapshotRaw}.now`);
        expect(
          Buffer.compare(
            readFileSync(join(dir.path, `${snapshotRaw}.now`)),
            readFileSync(join(dir.path, snapshotRaw)),
          ),
        ).toBe(0);
      }
    });
  });
});
