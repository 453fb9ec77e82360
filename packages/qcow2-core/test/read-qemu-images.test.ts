/**
 * Reads images made by qemu-img / qemu-io over the matrix of cluster sizes, refcount widths,
 * extended L2, compat levels, compression, preallocation, chains, snapshots and data files, and
 * compares every byte with `qemu-img convert -O raw` and blockStatus with `qemu-img map`.
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../src/node/index.js';
import { convertToRaw, expectSameAsRaw, ourMap, qemuMap, runWorkload } from './corpus.js';
import { qemuImg, qemuIo, qemuIoUnchecked, requireTools, suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');

interface Case {
  name: string;
  /** Builds the image in `dir`; returns its file name. */
  build(dir: string): string;
  /** Compare with qemu-img map (default true). */
  map?: boolean;
  /** Compare sparse-aware (huge images). */
  sparse?: boolean;
}

const MiB = 1024 * 1024;

function plain(name: string, size: number, options: string, seed = 0): Case {
  return {
    name,
    build(dir) {
      const file = `${name}.qcow2`;
      qemuImg(dir, 'create', '-f', 'qcow2', ...(options ? ['-o', options] : []), file, String(size));
      runWorkload(dir, file, size, seed);
      return file;
    },
  };
}

const cases: Case[] = [
  plain('cluster-512', 4 * MiB, 'cluster_size=512'),
  plain('cluster-4k', 8 * MiB, 'cluster_size=4096', 1),
  plain('cluster-64k', 16 * MiB, 'cluster_size=65536', 2),
  plain('cluster-2m', 16 * MiB, 'cluster_size=2097152', 3),
  ...[1, 2, 4, 8, 16, 32, 64].map((bits) =>
    plain(`refcount-${bits}`, 4 * MiB, `refcount_bits=${bits}`, bits % 7),
  ),
  plain('extended-l2-64k', 8 * MiB, 'extended_l2=on,cluster_size=65536', 4),
  plain('extended-l2-128k', 8 * MiB, 'extended_l2=on,cluster_size=131072', 5),
  plain('compat-0.10', 4 * MiB, 'compat=0.10', 6),
  plain('size-1000001', 1_000_001, '', 7),
  plain('prealloc-metadata', 4 * MiB, 'preallocation=metadata', 8),
  plain('prealloc-falloc', 4 * MiB, 'preallocation=falloc', 9),
  {
    name: 'lazy-refcounts-dirty',
    build(dir) {
      qemuImg(dir, 'create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'dirty.qcow2', String(4 * MiB));
      qemuIoUnchecked(dir, 'dirty.qcow2', ['write -P 0x61 1000 300000', 'write -z 500000 7000', 'abort']);
      const info = JSON.parse(qemuImg(dir, 'info', '--output=json', 'dirty.qcow2')) as {
        'dirty-flag': boolean;
      };
      if (!info['dirty-flag']) throw new Error('qemu-io abort did not leave the image dirty');
      return 'dirty.qcow2';
    },
  },
  ...(['zlib', 'zstd'] as const).flatMap((type): Case[] => [
    {
      name: `compressed-${type}`,
      build(dir) {
        qemuImg(dir, 'create', '-f', 'raw', `src-${type}.raw`, String(4 * MiB));
        runWorkload(dir, `src-${type}.raw`, 4 * MiB, 10, 'raw');
        qemuImg(
          dir,
          'convert',
          '-c',
          '-O',
          'qcow2',
          '-o',
          `compression_type=${type}`,
          `src-${type}.raw`,
          `c-${type}.qcow2`,
        );
        return `c-${type}.qcow2`;
      },
    },
    {
      name: `compressed-${type}-rewritten`,
      build(dir) {
        qemuImg(dir, 'create', '-f', 'raw', `srw-${type}.raw`, String(4 * MiB));
        runWorkload(dir, `srw-${type}.raw`, 4 * MiB, 11, 'raw');
        qemuImg(
          dir,
          'convert',
          '-c',
          '-O',
          'qcow2',
          '-o',
          `compression_type=${type}`,
          `srw-${type}.raw`,
          `crw-${type}.qcow2`,
        );
        qemuIo(dir, `crw-${type}.qcow2`, [
          'write -P 0x99 3000 5000',
          'write -z 70000 1000',
          'write -c -P 0x77 1048576 65536',
        ]);
        return `crw-${type}.qcow2`;
      },
    },
  ]),
  {
    name: 'chain-raw-qcow2-qcow2-subfolder',
    build(dir) {
      mkdirSync(join(dir, 'chain'), { recursive: true });
      qemuImg(dir, 'create', '-f', 'raw', 'chain/base.raw', String(8 * MiB));
      qemuIo(
        dir,
        'chain/base.raw',
        ['write -P 0x11 0 3000000', 'write -P 0x12 7000000 100000'],
        ['-f', 'raw'],
      );
      qemuImg(dir, 'create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'chain/mid.qcow2');
      runWorkload(dir, 'chain/mid.qcow2', 8 * MiB, 12);
      qemuImg(dir, 'create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'chain/top.qcow2');
      qemuIo(dir, 'chain/top.qcow2', [
        'write -P 0x13 500000 123457',
        'write -z 2000000 100000',
        'discard 4194304 65536',
      ]);
      return 'chain/top.qcow2';
    },
  },
  {
    name: 'shorter-backing',
    build(dir) {
      qemuImg(dir, 'create', '-f', 'qcow2', 'short-base.qcow2', String(1 * MiB + 512));
      qemuIo(dir, 'short-base.qcow2', ['write -P 0x21 0 1049088']);
      qemuImg(
        dir,
        'create',
        '-f',
        'qcow2',
        '-b',
        'short-base.qcow2',
        '-F',
        'qcow2',
        'short-top.qcow2',
        String(4 * MiB),
      );
      qemuIo(dir, 'short-top.qcow2', ['write -P 0x22 1000000 100000']);
      return 'short-top.qcow2';
    },
  },
  {
    name: 'extended-l2-over-backing',
    build(dir) {
      qemuImg(dir, 'create', '-f', 'qcow2', 'x-base.qcow2', String(4 * MiB));
      qemuIo(dir, 'x-base.qcow2', ['write -P 0x31 0 4194304']);
      qemuImg(
        dir,
        'create',
        '-f',
        'qcow2',
        '-o',
        'extended_l2=on',
        '-b',
        'x-base.qcow2',
        '-F',
        'qcow2',
        'x-top.qcow2',
      );
      qemuIo(dir, 'x-top.qcow2', [
        'write -P 0x32 5000 3000',
        'write -z 70000 4096',
        'write -P 0x33 1000000 30000',
      ]);
      return 'x-top.qcow2';
    },
  },
  {
    name: 'external-data-file',
    build(dir) {
      // An absolute name: a relative one resolves against the working directory (as in QEMU).
      qemuImg(
        dir,
        'create',
        '-f',
        'qcow2',
        '-o',
        `data_file=${join(dir, 'ext.data')}`,
        'ext.qcow2',
        String(4 * MiB),
      );
      runWorkload(dir, 'ext.qcow2', 4 * MiB, 13);
      return 'ext.qcow2';
    },
  },
  {
    name: 'external-data-file-raw',
    build(dir) {
      const data = join(dir, 'extraw.data');
      qemuImg(
        dir,
        'create',
        '-f',
        'qcow2',
        '-o',
        `data_file=${data},data_file_raw=on`,
        'extraw.qcow2',
        String(4 * MiB),
      );
      runWorkload(dir, 'extraw.qcow2', 4 * MiB, 14);
      return 'extraw.qcow2';
    },
  },
  {
    name: 'qcow-v1',
    build(dir) {
      qemuImg(dir, 'create', '-f', 'qcow', 'v1.qcow', String(4 * MiB));
      runWorkload(dir, 'v1.qcow', 4 * MiB, 15, 'qcow');
      return 'v1.qcow';
    },
  },
  {
    name: 'qcow-v1-compressed',
    build(dir) {
      // qemu-img convert -c cannot write qcow; qemu-io writes whole compressed clusters (4 KiB).
      qemuImg(dir, 'create', '-f', 'qcow', 'v1c.qcow', String(2 * MiB));
      const commands = Array.from(
        { length: 16 },
        (_, index) => `write -c -P ${0x61 + index} ${index * 4096} 4096`,
      );
      qemuIo(
        dir,
        'v1c.qcow',
        [...commands, 'write -c -P 0x62 1048576 4096', 'write -P 0x63 1060000 3000'],
        ['-f', 'qcow'],
      );
      return 'v1c.qcow';
    },
  },
  {
    name: '8-tib-both-ends',
    sparse: true,
    build(dir) {
      const size = 8 * 1024 * 1024 * MiB;
      qemuImg(dir, 'create', '-f', 'qcow2', 'huge.qcow2', String(size));
      qemuIo(dir, 'huge.qcow2', ['write -P 0x41 1000 100000', `write -P 0x42 ${size - 1_000_000} 999999`]);
      return 'huge.qcow2';
    },
  },
];

describe.skipIf(!haveQemu)('reading images made by qemu-img', () => {
  const dir = suiteTempDir();

  for (const testCase of cases) {
    it(`${testCase.name}: bytes equal qemu-img convert, map equals qemu-img map`, async () => {
      const file = testCase.build(dir.path);
      const raw = convertToRaw(dir.path, file, `${testCase.name}.raw`);
      const opened = await openImage(join(dir.path, file));
      try {
        await expectSameAsRaw(opened.device, raw, testCase.sparse ?? false);
        if (testCase.map !== false) {
          expect(await ourMap(opened.device)).toEqual(qemuMap(dir.path, file));
        }
      } finally {
        await opened.close();
      }
    });
  }

  it('lists persistent dirty bitmaps as qemu-img info does', async () => {
    const d = dir.path;
    qemuImg(d, 'create', '-f', 'qcow2', 'bitmaps.qcow2', String(4 * MiB));
    qemuImg(d, 'bitmap', '--add', 'bitmaps.qcow2', 'first');
    qemuImg(d, 'bitmap', '--add', '-g', '131072', '--disable', 'bitmaps.qcow2', 'second');
    qemuIo(d, 'bitmaps.qcow2', ['write -P 0x77 0 65536']);
    const info = JSON.parse(qemuImg(d, 'info', '--output=json', 'bitmaps.qcow2')) as {
      'format-specific': { data: { bitmaps: unknown[] } };
    };
    const opened = await openImage(join(d, 'bitmaps.qcow2'));
    const image = opened.image as import('../src/image.js').Qcow2Image;
    expect(image.bitmaps.map((b) => ({ flags: b.flags, name: b.name, granularity: b.granularity }))).toEqual(
      info['format-specific'].data.bitmaps,
    );
    expect(image.bitmaps).toHaveLength(2);
    await opened.close();
  });

  it('internal snapshots: each snapshot reads like qemu-img convert -l', async () => {
    const d = dir.path;
    qemuImg(d, 'create', '-f', 'qcow2', 'snap.qcow2', String(4 * MiB));
    qemuIo(d, 'snap.qcow2', ['write -P 0x51 0 1000000']);
    qemuImg(d, 'snapshot', '-c', 'first', 'snap.qcow2');
    qemuIo(d, 'snap.qcow2', ['write -P 0x52 500000 1000000', 'write -z 0 4096']);
    qemuImg(d, 'snapshot', '-c', 'second', 'snap.qcow2');
    qemuImg(d, 'resize', 'snap.qcow2', String(6 * MiB));
    qemuIo(d, 'snap.qcow2', ['write -P 0x53 5000000 1000000']);
    const opened = await openImage(join(d, 'snap.qcow2'));
    const image = opened.image as import('../src/image.js').Qcow2Image;
    const info = JSON.parse(qemuImg(d, 'info', '--output=json', 'snap.qcow2')) as {
      snapshots: { id: string; name: string; 'vm-state-size': number; 'date-sec': number }[];
    };
    expect(image.snapshots.map((s) => [s.id, s.name, s.vmStateSize, s.dateSec])).toEqual(
      info.snapshots.map((s) => [s.id, s.name, s['vm-state-size'], s['date-sec']]),
    );
    expect(image.snapshots.map((s) => s.diskSize)).toEqual([4 * MiB, 4 * MiB]);
    await expectSameAsRaw(opened.device, convertToRaw(d, 'snap.qcow2', 'snap-active.raw'));
    await opened.close();
    for (const snapshot of image.snapshots) {
      const byName = await openImage(join(d, 'snap.qcow2'), { snapshot: { name: snapshot.name } });
      const raw = convertToRaw(d, 'snap.qcow2', `snap-${snapshot.id}.raw`, [
        '-l',
        `snapshot.name=${snapshot.name}`,
      ]);
      await expectSameAsRaw(byName.device, raw);
      await byName.close();
      const byId = await openImage(join(d, 'snap.qcow2'), { snapshot: { id: snapshot.id } });
      await expectSameAsRaw(byId.device, raw);
      await byId.close();
    }
    await expect(openImage(join(d, 'snap.qcow2'), { snapshot: { name: 'nope' } })).rejects.toMatchObject({
      code: 'ENOENT',
    });
  });
});
