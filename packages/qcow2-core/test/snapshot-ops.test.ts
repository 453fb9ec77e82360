/**
 * Internal snapshots made, applied and deleted by us and by qemu-img on copies of one image:
 * the same lists, the same data in every snapshot and in the active layer, both checks clean.
 */
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { describe, expect, it } from 'vitest';
import { requireTools, run, runStatus } from '../../../tests-e2e/src/tools.js';
import { checkQcow2Image } from '../src/check/index.js';
import { Qcow2Image } from '../src/image.js';
import { amendImage, resizeImage } from '../src/ops/index.js';
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots } from '../src/snapshot/index.js';
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

/** qemu-img snapshot -l without the date column (dates differ between the two copies). */
function snapshotList(path: string): string[] {
  return run('qemu-img', ['snapshot', '-l', path])
    .split('\n')
    .slice(2)
    .filter((line) => line !== '')
    .map((line) => {
      const f = line.split(/\s+/);
      return `${f[0]} ${f[1]} ${f[2]} ${f[3]} ${f[6]} ${f[7]}`;
    });
}

function expectClean(path: string): void {
  const check = runStatus('qemu-img', ['check', path]);
  expect(check.stdout + check.stderr).toContain('No errors were found');
  expect(check.status).toBe(0);
}

async function expectOurCheckClean(path: string): Promise<void> {
  const result = await checkQcow2Image({ file: MemoryBlockDevice.from(readFileSync(path)) });
  expect(result.messages).toEqual([]);
  expect(result.corruptions + result.leaks + result.checkErrors).toBe(0);
}

/** The guest view of the active layer or of a snapshot equals between the two images. */
function expectSameData(dir: string, ours: string, theirs: string, snapshot?: string): void {
  const a = join(dir, 'a.raw');
  const b = join(dir, 'b.raw');
  const pick = snapshot === undefined ? [] : ['-l', `snapshot.name=${snapshot}`];
  run('qemu-img', ['convert', ...pick, '-O', 'raw', ours, a]);
  run('qemu-img', ['convert', ...pick, '-O', 'raw', theirs, b]);
  expect(runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]).status).toBe(0);
}

function io(path: string, ...commands: string[]): void {
  run('qemu-io', [...commands.flatMap((c) => ['-c', c]), path]);
}

describe.skipIf(!haveQemu)('snapshots agree with qemu-img snapshot', () => {
  const dir = suiteTempDir('qcowkit-snapshot-');

  it.each([
    ['64k clusters', [] as string[], 64 * 1024],
    ['512-byte clusters (refcount structures grow)', ['-o', 'cluster_size=512'], 512],
    ['extended L2', ['-o', 'extended_l2=on'], 64 * 1024],
    ['compat 0.10', ['-o', 'compat=0.10'], 64 * 1024],
  ])('create, write, create, apply, delete (%s)', async (name, create) => {
    const ours = join(dir.path, `${name.replace(/\W+/g, '-')}.qcow2`);
    const theirs = `${ours}.qemu`;
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ...create, ours, '8M']);
    io(ours, 'write -P 1 0 200k', 'write -c 1M 64k', 'write -z 2M 64k', 'write -P 3 4M 100k');
    copyFileSync(ours, theirs);

    await onFile(ours, (file) => createSnapshot(file, 's1'));
    run('qemu-img', ['snapshot', '-c', 's1', theirs]);
    for (const path of [ours, theirs]) io(path, 'write -P 5 64k 64k', 'write -P 6 6M 8k', 'write -z 4M 4k');
    await onFile(ours, (file) => createSnapshot(file, 's2'));
    run('qemu-img', ['snapshot', '-c', 's2', theirs]);
    io(ours, 'write -P 7 0 4k');
    io(theirs, 'write -P 7 0 4k');

    expect(snapshotList(ours)).toEqual(snapshotList(theirs));
    expect((await onFile(ours, listSnapshots)).map((s) => s.name)).toEqual(['s1', 's2']);
    expectClean(ours);
    await expectOurCheckClean(ours);
    for (const snapshot of [undefined, 's1', 's2']) expectSameData(dir.path, ours, theirs, snapshot);

    await onFile(ours, (file) => applySnapshot(file, 's1'));
    run('qemu-img', ['snapshot', '-a', 's1', theirs]);
    expectClean(ours);
    await expectOurCheckClean(ours);
    expectSameData(dir.path, ours, theirs);

    await onFile(ours, (file) => deleteSnapshot(file, 's1'));
    run('qemu-img', ['snapshot', '-d', 's1', theirs]);
    expect(snapshotList(ours)).toEqual(snapshotList(theirs));
    expectClean(ours);
    await expectOurCheckClean(ours);
    expectSameData(dir.path, ours, theirs);
    expectSameData(dir.path, ours, theirs, 's2');

    // Writes after the operations still copy on write correctly (QEMU writes our image).
    io(ours, 'write -P 9 0 300k');
    io(theirs, 'write -P 9 0 300k');
    await onFile(ours, (file) => deleteSnapshot(file, '2'));
    run('qemu-img', ['snapshot', '-d', 's2', theirs]);
    expect(snapshotList(ours)).toEqual([]);
    expectClean(ours);
    await expectOurCheckClean(ours);
    expectSameData(dir.path, ours, theirs);
  });

  it('a dirty image (lazy refcounts, crashed) is repaired before the snapshot, as QEMU does', async () => {
    const ours = join(dir.path, 'dirty.qcow2');
    const theirs = `${ours}.qemu`;
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', ours, '4M']);
    runStatus('qemu-io', ['-c', 'write -P 7 0 300k', '-c', 'write -P 8 3M 64k', '-c', 'abort', ours]);
    expect(runStatus('qemu-img', ['check', ours]).status).toBe(2);
    copyFileSync(ours, theirs);
    await onFile(ours, (file) => createSnapshot(file, 's1'));
    run('qemu-img', ['snapshot', '-c', 's1', theirs]);
    expect(snapshotList(ours)).toEqual(snapshotList(theirs));
    expectClean(ours);
    await expectOurCheckClean(ours);
    expectSameData(dir.path, ours, theirs);
    expectSameData(dir.path, ours, theirs, 's1');
  });

  it('on an image our engine created and wrote: snapshots, resize and amend, checked by qemu-img', async () => {
    const ours = join(dir.path, 'ours-made.qcow2');
    const theirs = `${ours}.qemu`;
    const image = await Qcow2Image.create(await FileBlockDevice.create(ours, 0), {
      size: 8 * 1024 * 1024,
      clusterSize: 4096,
    });
    await image.write(0, new Uint8Array(100 * 1024).fill(1));
    await image.write(5 * 1024 * 1024 + 100, new Uint8Array(9000).fill(2));
    await image.close();
    copyFileSync(ours, theirs);
    await onFile(ours, (file) => createSnapshot(file, 'a'));
    run('qemu-img', ['snapshot', '-c', 'a', theirs]);
    for (const path of [ours, theirs]) io(path, 'write -P 3 0 8k');
    await onFile(ours, (file) => resizeImage(file, 32 * 1024 * 1024));
    run('qemu-img', ['resize', '-q', theirs, '32M']);
    await onFile(ours, (file) => amendImage(file, { refcountBits: 8 }));
    run('qemu-img', ['amend', '-o', 'refcount_bits=8', theirs]);
    await onFile(ours, (file) => applySnapshot(file, 'a'));
    run('qemu-img', ['snapshot', '-a', 'a', theirs]);
    expect(snapshotList(ours)).toEqual(snapshotList(theirs));
    expectClean(ours);
    await expectOurCheckClean(ours);
    expectSameData(dir.path, ours, theirs);
  });

  it('apply restores the guest size the snapshot had', async () => {
    const ours = join(dir.path, 'resized.qcow2');
    const theirs = `${ours}.qemu`;
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', ours, '1M']);
    io(ours, 'write -P 1 0 200k');
    copyFileSync(ours, theirs);
    await onFile(ours, (file) => createSnapshot(file, 'small'));
    run('qemu-img', ['snapshot', '-c', 'small', theirs]);
    for (const path of [ours, theirs]) {
      run('qemu-img', ['resize', '-q', path, '64M']);
      io(path, 'write -P 2 60M 64k');
    }
    await onFile(ours, (file) => applySnapshot(file, 'small'));
    run('qemu-img', ['snapshot', '-a', 'small', theirs]);
    const info = (path: string) =>
      JSON.parse(run('qemu-img', ['info', '--output=json', path]))['virtual-size'];
    expect(info(ours)).toBe(1024 * 1024);
    expect(info(ours)).toBe(info(theirs));
    expectClean(ours);
    await expectOurCheckClean(ours);
    expectSameData(dir.path, ours, theirs);
  });

  it('refuses what does not fit or does not exist, leaving the image unchanged', async () => {
    const path = join(dir.path, 'one-bit.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', path, '1M']);
    io(path, 'write 0 64k');
    const before = readFileSync(path);
    await expect(onFile(path, (file) => createSnapshot(file, 's'))).rejects.toMatchObject({
      code: 'EUNSUPPORTED',
    });
    await expect(onFile(path, (file) => deleteSnapshot(file, 'nope'))).rejects.toMatchObject({
      code: 'ENOENT',
    });
    expect(readFileSync(path).equals(before)).toBe(true);

    const withDataFile = join(dir.path, 'data-file.qcow2');
    run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-o',
      `data_file=${withDataFile}.data`,
      withDataFile,
      '1M',
    ]);
    await expect(onFile(withDataFile, (file) => createSnapshot(file, 's'))).rejects.toMatchObject({
      code: 'EUNSUPPORTED',
    });
  });
});
