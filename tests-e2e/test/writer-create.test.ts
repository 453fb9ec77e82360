/**
 * @qcowkit/qcow2-writer empty images against `qemu-img create`: byte-identical files for the option
 * sets where qemu-img's layout is the writer's, and a clean `qemu-img check` with the right virtual
 * size for every power of two from 1 KiB to 1 PiB, alone and over a backing file.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createEmptyImage } from '@qcowkit/qcow2-writer/node';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img');

const OPTION_SETS: { name: string; options: Record<string, unknown>; qemu: string[]; size: number }[] = [
  { name: 'default', options: {}, qemu: [], size: 2 ** 30 },
  { name: 'compat 0.10', options: { version: 2 }, qemu: ['-o', 'compat=0.10'], size: 2 ** 30 },
  {
    name: '512 B clusters, 1-bit refcounts',
    options: { clusterSize: 512, refcountBits: 1 },
    qemu: ['-o', 'cluster_size=512,refcount_bits=1'],
    size: 2 ** 20,
  },
  {
    name: '4 KiB clusters, 64-bit refcounts',
    options: { clusterSize: 4096, refcountBits: 64 },
    qemu: ['-o', 'cluster_size=4096,refcount_bits=64'],
    size: 2 ** 30,
  },
  {
    name: '2 MiB clusters',
    options: { clusterSize: 2 ** 21 },
    qemu: ['-o', 'cluster_size=2M'],
    size: 2 ** 40,
  },
  { name: 'extended L2', options: { extendedL2: true }, qemu: ['-o', 'extended_l2=on'], size: 2 ** 30 },
  {
    name: 'lazy refcounts, zstd',
    options: { lazyRefcounts: true, compressionType: 'zstd' },
    qemu: ['-o', 'lazy_refcounts=on,compression_type=zstd'],
    size: 2 ** 30,
  },
  {
    name: 'preallocation metadata',
    options: { preallocation: 'metadata', clusterSize: 4096 },
    qemu: ['-o', 'preallocation=metadata,cluster_size=4096'],
    size: 5 * 2 ** 20,
  },
  {
    name: 'preallocation metadata, extended L2',
    options: { preallocation: 'metadata', clusterSize: 16384, extendedL2: true },
    qemu: ['-o', 'preallocation=metadata,cluster_size=16k,extended_l2=on'],
    size: 2 ** 20,
  },
  {
    name: 'backing file',
    options: { backingFile: 'base.qcow2', backingFormat: 'qcow2' },
    qemu: ['-b', 'base.qcow2', '-F', 'qcow2'],
    size: 2 ** 30,
  },
  {
    name: 'external data file',
    options: { dataFile: 'data.raw' },
    qemu: ['-o', 'data_file=data.raw'],
    size: 2 ** 30,
  },
  { name: '1 PiB', options: {}, qemu: [], size: 2 ** 50 },
  { name: 'odd size', options: {}, qemu: [], size: 1000 },
];

describe.skipIf(!haveTools)('qcow2-writer empty images', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-writer-create-');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], { cwd: dir.path });
  });
  afterAll(() => dir.remove());

  for (const { name, options, qemu, size } of OPTION_SETS) {
    test(`${name}: byte-identical to qemu-img create`, async () => {
      const ours = join(dir.path, 'ours.qcow2');
      const theirs = join(dir.path, 'theirs.qcow2');
      run('qemu-img', ['create', '-q', '-f', 'qcow2', ...qemu, theirs, String(size)], { cwd: dir.path });
      const written = await createEmptyImage(ours, { ...options, size });
      const mine = readFileSync(ours);
      expect(mine.length).toBe(written);
      expect(Buffer.compare(mine, readFileSync(theirs))).toBe(0);
    });
  }

  test('every power of two from 2^10 to 2^50 bytes, alone and over a backing file: check clean, right size', async () => {
    const failures: string[] = [];
    for (let bits = 10; bits <= 50; bits++) {
      for (const backing of [false, true]) {
        const path = join(dir.path, `p${bits}${backing ? 'b' : ''}.qcow2`);
        await createEmptyImage(path, {
          size: 2 ** bits,
          ...(backing ? { backingFile: 'base.qcow2', backingFormat: 'qcow2' } : {}),
        });
        const check = runStatus('qemu-img', ['check', '-q', path]);
        const info = JSON.parse(run('qemu-img', ['info', '--output=json', path])) as {
          'virtual-size': number;
          'backing-filename'?: string;
        };
        if (check.status !== 0)
          failures.push(`2^${bits}${backing ? ' over base' : ''}: check ${check.status}`);
        if (info['virtual-size'] !== 2 ** bits)
          failures.push(`2^${bits}: virtual size ${info['virtual-size']}`);
        if (backing && info['backing-filename'] !== 'base.qcow2') failures.push(`2^${bits}: backing name`);
      }
    }
    expect(failures).toEqual([]);
  });
});
