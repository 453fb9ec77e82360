/**
 * resize, amend, rebase and commit on images made by qemu-img, side by side with qemu-img doing
 * the same on a copy: same guest data, same reported geometry, both checks clean.
 */
import { copyFileSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { MemoryBlockDevice, OverlayBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { describe, expect, it } from 'vitest';
import { requireTools, run, runStatus } from '../../../tests-e2e/src/tools.js';
import { checkQcow2Image } from '../src/check/index.js';
import { Qcow2Image } from '../src/image.js';
import { openImage } from '../src/node/open-image.js';
import {
  amendImage,
  commitToBacking,
  copyBackingDifferences,
  emptyImage,
  resizeImage,
  setBackingFile,
} from '../src/ops/index.js';
import { RawImage } from '../src/raw-image.js';
import { createSnapshot } from '../src/snapshot/index.js';
import { suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');

async function onFile<T>(path: string, action: (file: FileBlockDevice) => Promise<T>): Promise<T> {
  const file = await FileBlockDevice.open(path);
  try {
    return await action(file);
  } finally {
    await file.close();
  }
}

function io(path: string, ...commands: string[]): void {
  run('qemu-io', [...commands.flatMap((c) => ['-c', c]), path]);
}

function info(path: string): Record<string, unknown> {
  return JSON.parse(run('qemu-img', ['info', '--output=json', path])) as Record<string, unknown>;
}

async function expectBothChecksClean(path: string): Promise<void> {
  const check = runStatus('qemu-img', ['check', path]);
  expect(check.stdout + check.stderr).toContain('No errors were found');
  const ours = await checkQcow2Image({ file: MemoryBlockDevice.from(readFileSync(path)) });
  expect(ours.messages).toEqual([]);
  expect(ours.corruptions + ours.leaks + ours.checkErrors).toBe(0);
}

function expectSameGuest(a: string, b: string): void {
  expect(runStatus('qemu-img', ['compare', a, b]).status).toBe(0);
}

describe.skipIf(!haveQemu)('ops agree with qemu-img', () => {
  const dir = suiteTempDir('qcowkit-ops-');
  let n = 0;

  /** An image by qemu-img and a copy for qemu-img to work on. */
  function pair(create: string[], size: string, writes: string[]): [string, string] {
    const ours = join(dir.path, `img${n++}.qcow2`);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ...create, ours, size]);
    if (writes.length > 0) io(ours, ...writes);
    const theirs = `${ours}.qemu`;
    copyFileSync(ours, theirs);
    return [ours, theirs];
  }

  it.each([
    ['4k clusters, L1 moves', ['-o', 'cluster_size=4k'], '1M', 64 * 1024 * 1024],
    ['512-byte clusters, L1 over several clusters', ['-o', 'cluster_size=512'], '1M', 300 * 1024 * 1024],
    ['64k clusters, L1 stays', [], '8M', 100 * 1024 * 1024 + 512],
  ])('resize grows (%s)', async (_name, create, size, newSize) => {
    const [ours, theirs] = pair(create, size, ['write -P 1 0 200k', 'write -z 512k 64k']);
    await onFile(ours, (file) => resizeImage(file, newSize));
    run('qemu-img', ['resize', '-q', theirs, String(newSize)]);
    expect(info(ours)['virtual-size']).toBe(info(theirs)['virtual-size']);
    for (const path of [ours, theirs]) io(path, `write -P 2 ${newSize - 4096} 4096`);
    await expectBothChecksClean(ours);
    expectSameGuest(ours, theirs);
  });

  it('resize shrinks only when asked, freeing what falls off', async () => {
    const [ours, theirs] = pair(['-o', 'cluster_size=4k'], '64M', [
      'write -P 1 0 200k',
      'write -P 2 10M 1M',
      'write -c 40M 4k',
      'write -P 3 63M 1M',
    ]);
    await expect(onFile(ours, (file) => resizeImage(file, 12 * 1024 * 1024))).rejects.toMatchObject({
      code: 'EINVAL',
    });
    await expect(onFile(ours, (file) => resizeImage(file, 80 * 1024 * 1024 + 1))).rejects.toMatchObject({
      code: 'EINVAL',
    });
    const before = statSync(ours).size;
    await onFile(ours, (file) => resizeImage(file, 10 * 1024 * 1024 + 512 * 1024 + 1024, { shrink: true }));
    run('qemu-img', ['resize', '-q', '--shrink', theirs, String(10 * 1024 * 1024 + 512 * 1024 + 1024)]);
    expect(info(ours)['virtual-size']).toBe(info(theirs)['virtual-size']);
    expect(statSync(ours).size).toBeLessThan(before);
    await expectBothChecksClean(ours);
    expectSameGuest(ours, theirs);
  });

  it.each([
    ['refcount_bits=64', { refcountBits: 64 }, 'refcount_bits=64'],
    ['refcount_bits=2', { refcountBits: 2 }, 'refcount_bits=2'],
    ['lazy_refcounts=on', { lazyRefcounts: true }, 'lazy_refcounts=on'],
    ['compat=0.10', { compat: '0.10' as const }, 'compat=0.10'],
  ])('amend %s', async (_name, options, qemuOptions) => {
    const [ours, theirs] = pair(['-o', 'cluster_size=4k'], '8M', [
      'write -P 1 0 200k',
      'write -z 1M 64k',
      'write -c 2M 4k',
      'write -P 3 5M 64k',
      'write -z 5M 8k',
    ]);
    await onFile(ours, (file) => amendImage(file, options));
    run('qemu-img', ['amend', '-o', qemuOptions, theirs]);
    const a = info(ours)['format-specific'] as { data: Record<string, unknown> };
    const b = info(theirs)['format-specific'] as { data: Record<string, unknown> };
    expect(a.data.compat).toBe(b.data.compat);
    expect(a.data['refcount-bits']).toBe(b.data['refcount-bits']);
    expect(a.data['lazy-refcounts']).toBe(b.data['lazy-refcounts']);
    await expectBothChecksClean(ours);
    expectSameGuest(ours, theirs);
  });

  it('amend compat=0.10 over a backing file keeps zeroed ranges zero, then back to 1.1', async () => {
    const base = join(dir.path, 'amend-base.raw');
    run('qemu-img', ['create', '-q', '-f', 'raw', base, '4M']);
    io(base, 'write -P 9 0 4M');
    const [ours, theirs] = [join(dir.path, 'amend-top.qcow2'), join(dir.path, 'amend-top.qemu.qcow2')];
    for (const path of [ours, theirs]) {
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', path]);
      io(path, 'write -z 0 128k', 'write -P 4 1M 64k');
    }
    await onFile(ours, (file) => amendImage(file, { compat: '0.10' }));
    run('qemu-img', ['amend', '-o', 'compat=0.10', theirs]);
    await expectBothChecksClean(ours);
    expectSameGuest(ours, theirs);
    await onFile(ours, (file) => amendImage(file, { compat: '1.1', lazyRefcounts: true }));
    const data = (info(ours)['format-specific'] as { data: Record<string, unknown> }).data;
    expect(data.compat).toBe('1.1');
    expect(data['lazy-refcounts']).toBe(true);
    await expectBothChecksClean(ours);
    expectSameGuest(ours, theirs);
  });

  it('amend refuses refcounts that do not fit, leaving the image unchanged', async () => {
    const [ours] = pair([], '1M', ['write 0 64k']);
    await onFile(ours, (file) => createSnapshot(file, 's'));
    const before = readFileSync(ours);
    await expect(onFile(ours, (file) => amendImage(file, { refcountBits: 1 }))).rejects.toMatchObject({
      code: 'EUNSUPPORTED',
    });
    expect(readFileSync(ours).equals(before)).toBe(true);
  });

  it('rebase -u rewrites the backing name and format as qemu-img does', async () => {
    const base = join(dir.path, 'rebase-base.qcow2');
    const other = join(dir.path, 'rebase-other.raw');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
    run('qemu-img', ['create', '-q', '-f', 'raw', other, '4M']);
    const [ours, theirs] = [join(dir.path, 'rebase-top.qcow2'), join(dir.path, 'rebase-top.qemu.qcow2')];
    for (const path of [ours, theirs]) {
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', path]);
      io(path, 'write -P 4 1M 64k');
    }
    await onFile(ours, (file) => setBackingFile(file, { backingFile: other, backingFormat: 'raw' }));
    run('qemu-img', ['rebase', '-u', '-b', other, '-F', 'raw', theirs]);
    for (const key of ['backing-filename', 'backing-filename-format', 'full-backing-filename']) {
      expect(info(ours)[key]).toBe(info(theirs)[key]);
    }
    await expectBothChecksClean(ours);
    expectSameGuest(ours, theirs);
    await onFile(ours, (file) => setBackingFile(file, { backingFile: undefined }));
    expect(info(ours)['backing-filename']).toBeUndefined();
    await expectBothChecksClean(ours);
  });

  it('commit writes the overlay into its backing file and empties the overlay, as qemu-img commit', async () => {
    const [ourBase, theirBase] = [join(dir.path, 'commit-base.raw'), join(dir.path, 'commit-base.qemu.raw')];
    const [ours, theirs] = [join(dir.path, 'commit-top.qcow2'), join(dir.path, 'commit-top.qemu.qcow2')];
    for (const [base, top] of [
      [ourBase, ours],
      [theirBase, theirs],
    ] as const) {
      run('qemu-img', ['create', '-q', '-f', 'raw', base, '4M']);
      io(base, 'write -P 9 0 4M');
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top]);
      io(top, 'write -P 4 1M 64k', 'write -z 2M 128k', 'write -P 5 4000k 96k');
    }
    const expected = join(dir.path, 'commit-expected.raw');
    run('qemu-img', ['convert', '-O', 'raw', ours, expected]);

    const overlay = await openImage(ours, { forceShare: true });
    try {
      const backing = await FileBlockDevice.open(ourBase);
      try {
        // 64 KiB clusters: the write at 4000k covers two clusters (copy-on-write of the rest).
        expect(await commitToBacking({ overlay: overlay.device, backing })).toBe((64 + 128 + 128) * 1024);
      } finally {
        await backing.close();
      }
    } finally {
      await overlay.close();
    }
    await onFile(ours, (file) => emptyImage(file));
    run('qemu-img', ['commit', '-q', theirs]);

    expect(runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', expected, ourBase]).status).toBe(0);
    expect(readFileSync(ourBase).equals(readFileSync(theirBase))).toBe(true);
    await expectBothChecksClean(ours);
    const map = JSON.parse(run('qemu-img', ['map', '--output=json', ours])) as { depth: number }[];
    expect(map.every((extent) => extent.depth === 1)).toBe(true);
    expectSameGuest(ours, theirs);
  });
});

describe.skipIf(!haveQemu)('safe rebase and commit into qcow2 through the write path', () => {
  const dir = suiteTempDir('qcowkit-ops-rw-');

  it('safe rebase keeps the guest view, as qemu-img rebase', async () => {
    const oldBase = join(dir.path, 'old.qcow2');
    const newBase = join(dir.path, 'new.raw');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', oldBase, '4M']);
    io(oldBase, 'write -P 1 0 4M');
    run('qemu-img', ['create', '-q', '-f', 'raw', newBase, '3M']);
    io(newBase, 'write -P 1 0 1M', 'write -P 2 1M 1M');
    const [ours, theirs] = [join(dir.path, 'top.qcow2'), join(dir.path, 'top.qemu.qcow2')];
    for (const path of [ours, theirs]) {
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', oldBase, '-F', 'qcow2', path]);
      io(path, 'write -P 3 512k 640k', 'write -z 3M 64k');
    }
    const before = join(dir.path, 'before.raw');
    run('qemu-img', ['convert', '-O', 'raw', ours, before]);

    const oldImage = await Qcow2Image.open(await FileBlockDevice.open(oldBase, { readOnly: true }));
    const newDevice = new RawImage(await FileBlockDevice.open(newBase, { readOnly: true }));
    const overlay = await Qcow2Image.open(await FileBlockDevice.open(ours), {
      readOnly: false,
      resolveBacking: async () => oldImage,
    });
    try {
      await copyBackingDifferences({ overlay, oldBacking: oldImage, newBacking: newDevice });
    } finally {
      await overlay.close();
      await oldImage.close().catch(() => undefined);
      await newDevice.close();
    }
    await onFile(ours, (file) => setBackingFile(file, { backingFile: newBase, backingFormat: 'raw' }));
    run('qemu-img', ['rebase', '-q', '-b', newBase, '-F', 'raw', theirs]);

    expect(info(ours)['backing-filename']).toBe(newBase);
    expect(runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', before, ours]).status).toBe(0);
    expectSameGuest(ours, theirs);
    await expectBothChecksClean(ours);
  });

  it('commit into a qcow2 backing file, as qemu-img commit', async () => {
    const [ourBase, theirBase] = [join(dir.path, 'cbase.qcow2'), join(dir.path, 'cbase.qemu.qcow2')];
    const [ours, theirs] = [join(dir.path, 'ctop.qcow2'), join(dir.path, 'ctop.qemu.qcow2')];
    for (const [base, top] of [
      [ourBase, ours],
      [theirBase, theirs],
    ] as const) {
      run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4M']);
      io(base, 'write -P 9 0 1M', 'write -c 2M 64k');
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '6M']);
      io(top, 'write -P 4 512k 640k', 'write -z 2M 64k', 'write -P 5 5M 64k');
    }
    const expected = join(dir.path, 'commit-expected.raw');
    run('qemu-img', ['convert', '-O', 'raw', ours, expected]);

    const overlay = await openImage(ours, { forceShare: true });
    try {
      const backing = await Qcow2Image.open(await FileBlockDevice.open(ourBase), { readOnly: false });
      try {
        await commitToBacking({ overlay: overlay.device, backing });
      } finally {
        await backing.close();
      }
    } finally {
      await overlay.close();
    }
    await onFile(ours, (file) => emptyImage(file));
    run('qemu-img', ['commit', '-q', theirs]);

    expect(info(ourBase)['virtual-size']).toBe(6 * 1024 * 1024);
    expect(runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', expected, ourBase]).status).toBe(0);
    expectSameGuest(ourBase, theirBase);
    expectSameGuest(ours, theirs);
    await expectBothChecksClean(ourBase);
    await expectBothChecksClean(ours);
  });
});

describe('copyBackingDifferences (safe rebase, data part)', () => {
  it('keeps the guest view when the overlay moves to another backing', async () => {
    const size = 1024 * 1024;
    const oldBacking = new MemoryBlockDevice(size);
    const newBacking = new MemoryBlockDevice(size / 2);
    await oldBacking.write(0, new Uint8Array(size).fill(1));
    await newBacking.write(0, new Uint8Array(128 * 1024).fill(1));
    await newBacking.write(200 * 1024, new Uint8Array(10).fill(2));
    const overlay = new OverlayBlockDevice(oldBacking, { granularity: 4096 });
    await overlay.write(64 * 1024, new Uint8Array(100 * 1024).fill(3));
    const view = await overlay.read(0, size);

    const copied = await copyBackingDifferences({ overlay, oldBacking, newBacking, granularity: 16 * 1024 });
    expect(copied).toBeGreaterThan(0);
    expect(copied).toBeLessThan(size);
    // The guest view over the new backing: the overlay's own data, else the new backing (zeros past its end).
    const moved = new Uint8Array(size);
    for (const extent of await overlay.blockStatus(0, size)) {
      const own = extent.present && extent.depth === 0;
      const end = extent.offset + extent.length;
      if (own) moved.set(await overlay.read(extent.offset, extent.length), extent.offset);
      else if (extent.offset < newBacking.size) {
        const available = Math.min(end, newBacking.size) - extent.offset;
        moved.set(await newBacking.read(extent.offset, available), extent.offset);
      }
    }
    expect(Buffer.from(moved).equals(Buffer.from(view))).toBe(true);
  });
});
