/**
 * Qcow2Image.create / createImage against qemu-img create: for each option set the file we write
 * is byte for byte the file qemu-img writes (same layout, header, extensions, feature name table),
 * `qemu-img check` finds nothing and `qemu-img info` agrees; then the image takes writes.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../src/node/index.js';
import { qemuImg, requireTools, suiteTempDir, tempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img');

interface Case {
  name: string;
  qemu: string[];
  size: number;
  options: Parameters<typeof createImage>[1];
  /** Compare whole files (false when only info must agree). */
  bytes?: boolean;
}

const cases: Case[] = [
  { name: 'defaults, 1 GiB', qemu: [], size: 1 << 30, options: { size: 1 << 30 } },
  {
    name: '512 B clusters',
    qemu: ['-o', 'cluster_size=512'],
    size: 1 << 20,
    options: { size: 1 << 20, clusterSize: 512 },
  },
  {
    name: '4 KiB clusters, 1 byte',
    qemu: ['-o', 'cluster_size=4096'],
    size: 1,
    options: { size: 1, clusterSize: 4096 },
  },
  {
    name: '2 MiB clusters',
    qemu: ['-o', 'cluster_size=2M'],
    size: 5 * 2 ** 30,
    options: { size: 5 * 2 ** 30, clusterSize: 2 << 20 },
  },
  {
    name: 'v2',
    qemu: ['-o', 'compat=0.10'],
    size: 100 << 20,
    options: { size: 100 << 20, compat: '0.10' },
  },
  {
    name: 'refcount bits 1, lazy, extended L2, zstd',
    qemu: ['-o', 'refcount_bits=1,lazy_refcounts=on,extended_l2=on,compression_type=zstd'],
    size: 10 * 2 ** 30,
    options: {
      size: 10 * 2 ** 30,
      refcountBits: 1,
      lazyRefcounts: true,
      extendedL2: true,
      compressionType: 'zstd',
    },
  },
  {
    // Several refcount blocks for the L1 table: they follow it, one not covering itself counted
    // by the next.
    name: '64-bit refcounts, 512 B clusters, 4 GiB',
    qemu: ['-o', 'refcount_bits=64,cluster_size=512'],
    size: 4 * 2 ** 30,
    options: { size: 4 * 2 ** 30, refcountBits: 64, clusterSize: 512 },
  },
  {
    name: 'size 0 (no L1 table)',
    qemu: [],
    size: 0,
    options: { size: 0 },
  },
  {
    name: 'largest for 64 KiB clusters (2 PiB)',
    qemu: [],
    size: 2 ** 51,
    options: { size: 2 ** 51 },
  },
  {
    name: 'backing file with format',
    qemu: ['-b', 'base.raw', '-F', 'raw'],
    size: 1 << 20,
    options: { size: 1 << 20, backingFile: 'base.raw', backingFormat: 'raw' },
  },
  {
    name: 'v2 with a backing file',
    qemu: ['-o', 'compat=0.10', '-b', 'base.raw', '-F', 'raw'],
    size: 1 << 20,
    options: { size: 1 << 20, compat: '0.10', backingFile: 'base.raw', backingFormat: 'raw' },
  },
  {
    name: 'metadata preallocation',
    qemu: ['-o', 'preallocation=metadata,cluster_size=4096'],
    size: 3 << 20,
    options: { size: 3 << 20, clusterSize: 4096, preallocation: 'metadata' },
  },
  {
    name: 'metadata preallocation, extended L2 (empty subcluster bitmaps)',
    qemu: ['-o', 'preallocation=metadata,extended_l2=on,cluster_size=16k'],
    size: 9 << 20,
    options: { size: 9 << 20, clusterSize: 16384, extendedL2: true, preallocation: 'metadata' },
  },
  {
    name: 'falloc preallocation',
    qemu: ['-o', 'preallocation=falloc'],
    size: 1 << 20,
    options: { size: 1 << 20, preallocation: 'falloc' },
  },
  {
    // Five L2 tables: the first in the old refcount table's cluster, the others after the data.
    name: 'full preallocation, 4 KiB clusters, new refcount blocks',
    qemu: ['-o', 'preallocation=full,cluster_size=4k'],
    size: 9 << 20,
    options: { size: 9 << 20, clusterSize: 4096, preallocation: 'full' },
  },
  {
    name: 'falloc preallocation, v2, 512 B clusters',
    qemu: ['-o', 'preallocation=falloc,compat=0.10,cluster_size=512'],
    size: 3 << 20,
    options: { size: 3 << 20, compat: '0.10', clusterSize: 512, preallocation: 'falloc' },
  },
  {
    name: 'falloc preallocation, extended L2',
    qemu: ['-o', 'preallocation=falloc,extended_l2=on,cluster_size=16k'],
    size: 9 << 20,
    options: { size: 9 << 20, clusterSize: 16384, extendedL2: true, preallocation: 'falloc' },
  },
  {
    name: 'falloc preallocation, size 0',
    qemu: ['-o', 'preallocation=falloc'],
    size: 0,
    options: { size: 0, preallocation: 'falloc' },
  },
];

describe.skipIf(!haveQemu)('qcow2 create like qemu-img create', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir();
    qemuImg(dir.path, 'create', '-q', '-f', 'raw', 'base.raw', '1M');
  });
  afterAll(() => dir.remove());

  cases.forEach((testCase, index) => {
    it(testCase.name, async () => {
      const theirs = `qemu-${index}.qcow2`;
      const ours = `ours-${index}.qcow2`;
      qemuImg(dir.path, 'create', '-q', '-f', 'qcow2', ...testCase.qemu, theirs, String(testCase.size));
      const opened = await createImage(join(dir.path, ours), testCase.options);
      expect(opened.device.readOnly).toBe(false);
      await opened.close();
      if (testCase.bytes !== false) {
        const a = readFileSync(join(dir.path, theirs));
        const b = readFileSync(join(dir.path, ours));
        expect(b.length).toBe(a.length);
        expect(Buffer.compare(a, b)).toBe(0);
      }
      const info = (name: string): Record<string, unknown> => {
        const parsed = JSON.parse(qemuImg(dir.path, 'info', '--output=json', name)) as Record<
          string,
          unknown
        >;
        delete parsed.filename;
        delete parsed['actual-size'];
        return parsed;
      };
      expect(info(ours)).toEqual(info(theirs));
      expect(qemuImg(dir.path, 'check', ours)).toContain('No errors were found');
      // The new image takes writes, and qemu-img still finds it clean.
      const again = await createImage(join(dir.path, `w-${ours}`), { ...testCase.options, overwrite: true });
      const device = again.device;
      const at = Math.max(0, Math.min(device.size - 70_000, 123_456));
      const data = new Uint8Array(Math.min(70_000, device.size)).fill(0x5a);
      await device.write(at, data);
      await again.close();
      expect(qemuImg(dir.path, 'check', `w-${ours}`)).toContain('No errors were found');
      const reopened = await openImage(join(dir.path, `w-${ours}`));
      expect(Buffer.compare(await reopened.device.read(at, data.length), data)).toBe(0);
      await reopened.close();
    });
  });
});

describe.skipIf(!haveQemu)('createImage with an external data file like qemu-img create', () => {
  const dir = suiteTempDir();

  const modes = [
    { preallocation: 'off', raw: false },
    { preallocation: 'off', raw: true },
    { preallocation: 'metadata', raw: false },
    { preallocation: 'falloc', raw: false },
    { preallocation: 'full', raw: true },
  ] as const;
  it('maps (qemu-img map), data file sizes and a clean check for each preallocation mode', async () => {
    const size = 3 << 20;
    for (const { preallocation, raw } of modes) {
      const tag = `${preallocation}-${raw ? 'raw' : 'plain'}`;
      qemuImg(
        dir.path,
        'create',
        '-q',
        '-f',
        'qcow2',
        '-o',
        `data_file=${join(dir.path, `qemu-${tag}.data`)},data_file_raw=${raw ? 'on' : 'off'},preallocation=${preallocation},cluster_size=65536`,
        `qemu-${tag}.qcow2`,
        String(size),
      );
      const opened = await createImage(join(dir.path, `ours-${tag}.qcow2`), {
        size,
        dataFile: join(dir.path, `ours-${tag}.data`),
        dataFileRaw: raw,
        preallocation,
      });
      await opened.close();
      const map = (name: string): unknown => JSON.parse(qemuImg(dir.path, 'map', '--output=json', name));
      expect(map(`ours-${tag}.qcow2`), tag).toEqual(map(`qemu-${tag}.qcow2`));
      expect(readFileSync(join(dir.path, `ours-${tag}.data`)).length, tag).toBe(size);
      expect(qemuImg(dir.path, 'check', `ours-${tag}.qcow2`), tag).toContain('No errors were found');
    }
  });
});
