/**
 * The offline edits' bulk steps: counting a whole L1/L2 tree in one batched pass plans the counts
 * a plain per-table walk (a model here) plans, committing them writes the same bytes whether the
 * refcount blocks are held in memory or read on demand, the preloaded stored refcounts read as
 * the on-demand ones, and both paths of snapshot create (one walk, or counting first when a
 * refcount could overflow) agree with qemu-img.
 */

import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { describe, expect, it } from 'vitest';
import { requireTools, run, runStatus } from '../../../tests-e2e/src/tools.js';
import { checkQcow2Image, loadHeader } from '../src/check/check.js';
import { decodeCompressedDescriptor, entryOffset } from '../src/check/entries.js';
import { StoredRefcounts } from '../src/check/stored-refcounts.js';
import { classifyL2Entry } from '../src/format/l2-entry.js';
import { ImageEdit } from '../src/ops/image-edit.js';
import { addTreeReferences, canShareTree } from '../src/ops/tree-references.js';
import { createSnapshot } from '../src/snapshot/index.js';
import { suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');

/** The model: one table at a time, each entry classified, `delta` added to what it names. */
async function modelTreeReferences(edit: ImageEdit, l1TableOffset: number, l1Size: number, delta: number) {
  const { clusterSize, extendedL2, hasDataFile, file } = edit;
  const l1 = new DataView((await file.read(l1TableOffset, l1Size * 8)).buffer);
  for (let i = 0; i < l1Size; i++) {
    const l2Offset = entryOffset(l1.getUint32(i * 8), l1.getUint32(i * 8 + 4));
    if (l2Offset === 0) continue;
    edit.addReferences(l2Offset, clusterSize, delta);
    const table = new DataView((await file.read(l2Offset, clusterSize)).buffer);
    for (let at = 0; at < clusterSize; at += extendedL2 ? 16 : 8) {
      const high = table.getUint32(at);
      const low = table.getUint32(at + 4);
      const type = classifyL2Entry(high, low, hasDataFile, extendedL2);
      if ((type === 'normal' || type === 'zero-alloc') && !hasDataFile) {
        edit.addReferences(entryOffset(high, low), clusterSize, delta);
      } else if (type === 'compressed') {
        const extent = decodeCompressedDescriptor(high, low, edit.header.clusterBits);
        edit.addReferences(extent.hostOffset, extent.length, delta);
      }
    }
  }
}

describe.skipIf(!haveQemu)('snapshot bulk steps', () => {
  const dir = suiteTempDir('qcowkit-snapshot-tree-');

  /** An image with data, compressed and zero clusters and one snapshot, made by QEMU. */
  function image(name: string, options: string[], compressed = true): Buffer {
    const path = join(dir.path, `${name}.qcow2`);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ...options, path, '64M']);
    const writes = ['write -P 1 0 3M', 'write -z 12M 64k', 'write -P 2 40M 1M'];
    if (compressed) writes.push('write -c 8M 256k');
    run('qemu-io', [...writes.flatMap((c) => ['-c', c]), path]);
    run('qemu-img', ['snapshot', '-c', 'old', path]);
    run('qemu-io', ['-c', 'write -P 3 512k 1M', '-c', 'write -P 4 60M 8k', path]);
    return readFileSync(path);
  }

  it.each([
    [
      '4k clusters, L2 tables side by side (preallocated metadata)',
      ['-o', 'cluster_size=4k,preallocation=metadata'],
    ],
    ['4k clusters', ['-o', 'cluster_size=4k']],
    ['extended L2', ['-o', 'extended_l2=on']],
    ['512-byte clusters, 8-bit refcounts', ['-o', 'cluster_size=512,refcount_bits=8']],
  ])('counting a tree plans what the per-table walk plans (%s)', async (name, options) => {
    // QEMU writes no compressed cluster over preallocated space.
    const bytes = image(name.replace(/\W+/g, '-'), options, !name.includes('preallocated'));
    for (const delta of [1, -1] as const) {
      const model = await ImageEdit.open(MemoryBlockDevice.from(bytes));
      const batched = await ImageEdit.open(MemoryBlockDevice.from(bytes));
      const { l1TableOffset, l1Size } = model.header;
      const before = [...batched.counts];
      await modelTreeReferences(model, l1TableOffset, l1Size, delta);
      await addTreeReferences(batched, l1TableOffset, l1Size, delta);
      expect(batched.counts).toEqual(model.counts);
      expect(batched.counts).not.toEqual(before);
    }
  });

  it('clearing COPIED in the same pass leaves every active entry without it', async () => {
    const bytes = image('clear-copied', ['-o', 'cluster_size=4k']);
    const file = MemoryBlockDevice.from(bytes);
    const edit = await ImageEdit.open(file);
    expect(canShareTree(edit)).toBe(true);
    await addTreeReferences(edit, edit.header.l1TableOffset, edit.header.l1Size, 1, { clearCopied: true });
    // Nothing committed: every COPIED flag the check expects (refcount 1) is now missing, and
    // nothing else is wrong.
    const result = await checkQcow2Image({ file });
    expect(result.corruptions).toBeGreaterThan(0);
    expect(
      result.messages.every((line) => /^ERROR OFLAG_COPIED (L2|data) cluster: .* refcount=1$/.test(line)),
    ).toBe(true);
    expect(result.leaks).toBe(0);
  });

  it.each([
    ['within the refcount blocks there are', 3],
    ['past them (the structures rebuilt)', 3000],
  ])(
    'committing the plan writes the same bytes with refcount blocks in memory or read on demand (%s)',
    async (_name, clusters) => {
      const bytes = image(`commit-${clusters}`, ['-o', 'cluster_size=4k']);
      const files = [MemoryBlockDevice.from(bytes), MemoryBlockDevice.from(bytes)];
      const edits = await Promise.all([
        ImageEdit.open(files[0]!),
        ImageEdit.open(files[1]!, {}, { preloadMaxBytes: 0 }),
      ]);
      for (const edit of edits) {
        await addTreeReferences(edit, edit.header.l1TableOffset, edit.header.l1Size, 1);
        edit.allocate(clusters);
        await edit.commitRefcounts();
      }
      const [a, b] = await Promise.all(files.map((file) => file.read(0, file.size)));
      expect(Buffer.from(b!).equals(Buffer.from(a!))).toBe(true);
      expect(Buffer.from(a!).equals(bytes)).toBe(false);
      // The file's refcounts are the plan's: the tree's clusters counted twice (leaks, and COPIED
      // flags now wrong), the allocated ones once (leaks): nothing counted too low.
      const result = await checkQcow2Image({ file: files[1]! });
      expect(result.messages.filter((line) => /^ERROR cluster /.test(line))).toEqual([]);
      expect(result.leaks).toBeGreaterThanOrEqual(clusters);
      const moved =
        (await loadHeader(files[1]!, {})).refcountTableOffset !== Number(bytes.readBigUInt64BE(48));
      expect(moved).toBe(clusters > 2048); // 2048 16-bit refcounts a 4 KiB block
    },
  );

  it('commits reuse the refcount blocks the opening check read', async () => {
    const bytes = image('commit-reads', ['-o', 'cluster_size=4k']);
    const file = MemoryBlockDevice.from(bytes);
    const edit = await ImageEdit.open(file);
    const reads: number[] = [];
    const readInto = file.readInto.bind(file);
    file.readInto = (buffer, offset, options) => {
      reads.push(offset);
      return readInto(buffer, offset, options);
    };
    const read = file.read.bind(file);
    file.read = (offset, length, options) => {
      reads.push(offset);
      return read(offset, length, options);
    };
    for (let round = 0; round < 3; round++) {
      edit.allocate(2);
      await edit.ensureFileSize();
      await edit.commitRefcounts();
    }
    expect(reads).toEqual([]);
    // What the commits wrote: six clusters in use that nothing references yet.
    const result = await checkQcow2Image({ file });
    expect(result.corruptions + result.checkErrors).toBe(0);
    expect(result.leaks).toBe(6);
  });

  it.each([2, 16, 64])('preloaded refcount blocks read as blocks read on demand (%i-bit)', async (bits) => {
    const bytes = image(`stored-${bits}`, ['-o', `cluster_size=512,refcount_bits=${bits}`], false);
    const file = MemoryBlockDevice.from(bytes);
    const header = await loadHeader(file, {});
    const options = {
      clusterSize: header.clusterSize,
      refcountBits: bits,
      refcountTableOffset: header.refcountTableOffset,
      refcountTableClusters: header.refcountTableClusters,
    };
    const preloaded = await StoredRefcounts.load(file, options);
    const onDemand = await StoredRefcounts.load(file, { ...options, preloadMaxBytes: 0 });
    expect(preloaded.residentBlocks).toBeDefined();
    expect(onDemand.residentBlocks).toBeUndefined();
    const clusters = Math.ceil(file.size / header.clusterSize) + 2 * preloaded.entriesPerBlock;
    let nonZero = 0;
    for (let clusterIndex = 0; clusterIndex < clusters; clusterIndex++) {
      const expected = await onDemand.get(clusterIndex);
      expect(preloaded.peek(clusterIndex)).toEqual(expected);
      if (expected !== 0) nonZero++;
    }
    expect(nonZero).toBeGreaterThan(100);
  });

  it('snapshot create takes one walk or counts first, as overflow allows (2-bit refcounts)', async () => {
    const ours = join(dir.path, 'two-bit.qcow2');
    const theirs = `${ours}.qemu`;
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k,refcount_bits=2', ours, '8M']);
    run('qemu-io', ['-c', 'write -P 1 0 300k', '-c', 'write -P 2 1M 8k', ours]);
    copyFileSync(ours, theirs);
    const withFile = async <T>(action: (file: FileBlockDevice) => Promise<T>): Promise<T> => {
      const file = await FileBlockDevice.open(ours);
      try {
        return await action(file);
      } finally {
        await file.close();
      }
    };
    // Counts at most 1: one walk. Then at most 2, and 2 x 2 > 3: counting first.
    expect(await withFile(async (file) => canShareTree(await ImageEdit.open(file)))).toBe(true);
    await withFile((file) => createSnapshot(file, 's1'));
    run('qemu-img', ['snapshot', '-c', 's1', theirs]);
    expect(await withFile(async (file) => canShareTree(await ImageEdit.open(file)))).toBe(false);
    await withFile((file) => createSnapshot(file, 's2'));
    run('qemu-img', ['snapshot', '-c', 's2', theirs]);
    for (const path of [ours, theirs]) {
      const check = runStatus('qemu-img', ['check', path]);
      expect(check.stdout + check.stderr).toContain('No errors were found');
    }
    const dump = (path: string) =>
      run('qemu-img', ['map', '--output=json', path]) +
      run('qemu-img', ['snapshot', '-l', path]).replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, '');
    expect(dump(ours)).toEqual(dump(theirs));
    // A third would need refcount 3 + 1: refused before anything is written.
    const before = readFileSync(ours);
    await expect(withFile((file) => createSnapshot(file, 's3'))).rejects.toMatchObject({
      code: 'EUNSUPPORTED',
    });
    expect(readFileSync(ours).equals(before)).toBe(true);
  });
});
