/**
 * commitToBacking into a deeper base (`qemu-img commit -b`), its progress reports, and
 * preallocateData (create -o preallocation=falloc|full) checked against qemu-img.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { MemoryBlockDevice, OverlayBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { describe, expect, it } from 'vitest';
import { requireTools, run, runStatus } from '../../../tests-e2e/src/tools.js';
import { checkQcow2Image } from '../src/check/index.js';
import { planQcow2Create, writeQcow2Layout } from '../src/create.js';
import { Qcow2Image } from '../src/image.js';
import { commitToBacking, preallocateData } from '../src/ops/index.js';
import { refcountBlocksCovering } from '../src/ops/preallocate.js';
import { suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img');

describe('commitToBacking with a base deeper in the chain', () => {
  const KiB = 1024;
  async function chain() {
    const base = new MemoryBlockDevice(256 * KiB);
    await base.write(0, new Uint8Array(256 * KiB).fill(1));
    const mid = new OverlayBlockDevice(base, { granularity: 4 * KiB });
    await mid.write(16 * KiB, new Uint8Array(32 * KiB).fill(2));
    await mid.writeZeroes(100 * KiB, 8 * KiB);
    const top = new OverlayBlockDevice(mid, { granularity: 4 * KiB });
    await top.write(40 * KiB, new Uint8Array(24 * KiB).fill(3));
    await top.write(200 * KiB, new Uint8Array(4 * KiB).fill(4));
    return { base, mid, top };
  }

  it('baseDepth 2 writes what the top and the middle layer hold into the base', async () => {
    const { base, mid, top } = await chain();
    const view = await top.read(0, top.size);
    const seen: Array<[number, number]> = [];
    const written = await commitToBacking({
      overlay: top,
      backing: base,
      baseDepth: 2,
      onProgress: (done, total) => seen.push([done, total]),
    });
    expect(Buffer.from(await base.read(0, base.size)).equals(Buffer.from(view))).toBe(true);
    // The middle layer keeps its own data (what it shows from the base now includes the commit).
    expect((await mid.read(16 * KiB, 32 * KiB)).every((byte) => byte === 2)).toBe(true);
    expect((await mid.read(100 * KiB, 8 * KiB)).every((byte) => byte === 0)).toBe(true);
    expect(seen[0]).toEqual([0, written]);
    expect(seen.at(-1)).toEqual([written, written]);
    for (let i = 1; i < seen.length; i++) expect(seen[i]![0]).toBeGreaterThanOrEqual(seen[i - 1]![0]);
  });

  it('baseDepth 1 leaves out what only the middle layer holds', async () => {
    const { base, mid, top } = await chain();
    await commitToBacking({ overlay: top, backing: mid });
    const bytes = await base.read(0, base.size);
    expect(bytes[20 * KiB]).toBe(1);
    expect((await mid.read(40 * KiB, 1))[0]).toBe(3);
  });

  it('refuses a base depth below 1', async () => {
    const { base, top } = await chain();
    await expect(commitToBacking({ overlay: top, backing: base, baseDepth: 0 })).rejects.toMatchObject({
      code: 'EINVAL',
    });
  });
});

describe.skipIf(!haveQemu)('preallocateData against qemu-img create -o preallocation', () => {
  const dir = suiteTempDir('qcowkit-prealloc-');

  it.each([
    ['falloc', {}, 'cluster_size=65536'],
    ['full', { clusterSize: 4096 }, 'cluster_size=4096'],
    ['falloc', { compat: '0.10' as const }, 'compat=0.10'],
    ['full', { extendedL2: true, clusterSize: 32768 }, 'extended_l2=on,cluster_size=32768'],
    ['full', { clusterSize: 512, refcountBits: 64 }, 'cluster_size=512,refcount_bits=64'],
  ] as const)('%s with %j: the file qemu-img writes, clean, zeros', async (mode, options, qemuOptions) => {
    const ours = join(dir.path, `ours-${mode}-${qemuOptions}.qcow2`);
    const theirs = join(dir.path, `theirs-${mode}-${qemuOptions}.qcow2`);
    const size = 3 * 1024 * 1024 + 4096;
    run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-o',
      `preallocation=${mode},${qemuOptions}`,
      theirs,
      String(size),
    ]);
    const file = await FileBlockDevice.create(ours, 0);
    const seen: number[] = [];
    try {
      await writeQcow2Layout(file, planQcow2Create({ size, ...options }));
      await preallocateData(file, mode, { onProgress: (done) => seen.push(done) });
    } finally {
      await file.close();
    }
    expect(seen.at(-1)).toBeGreaterThanOrEqual(size);
    // Same host offsets, and the same bytes.
    expect(run('qemu-img', ['map', '--output=json', ours])).toBe(
      run('qemu-img', ['map', '--output=json', theirs]),
    );
    expect(Buffer.compare(readFileSync(ours), readFileSync(theirs))).toBe(0);
    expect(runStatus('qemu-img', ['check', ours]).status).toBe(0);
    expect(runStatus('qemu-img', ['compare', ours, theirs]).status).toBe(0);
    const checked = await checkQcow2Image({ file: MemoryBlockDevice.from(readFileSync(ours)) });
    expect(checked.corruptions + checked.leaks + checked.checkErrors).toBe(0);
  });

  it('refuses an image that already has L2 tables', async () => {
    const path = join(dir.path, 'used.qcow2');
    const image = await Qcow2Image.create(await FileBlockDevice.create(path, 0), { size: 1 << 20 });
    await image.write(0, new Uint8Array(512).fill(1));
    await image.close();
    const file = await FileBlockDevice.open(path, { readOnly: false });
    try {
      await expect(preallocateData(file, 'falloc')).rejects.toMatchObject({ code: 'EINVAL' });
    } finally {
      await file.close();
    }
  });
});

describe('refcountBlocksCovering (the fixed point QEMU computes)', () => {
  it('covers the clusters, the blocks and the table', () => {
    // 64 KiB clusters, 16-bit refcounts: a block covers 32768 clusters.
    expect(refcountBlocksCovering(1, 65536, 4)).toBe(1);
    expect(refcountBlocksCovering(32767, 65536, 4)).toBe(2);
    expect(refcountBlocksCovering(32766, 65536, 4)).toBe(1);
    // 512 B clusters, 64-bit refcounts: 64 per block.
    expect(refcountBlocksCovering(100, 512, 6)).toBe(2);
  });
});
