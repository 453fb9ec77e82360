/**
 * Repair of preallocated L2 entries whose host offset is not cluster aligned, as
 * `qemu-img check -r all` does (they become plain zero entries, the clusters they named are freed):
 * the same lines and verdict as qemu-img on the same image, the entries written and flushed before
 * any refcount changes (a crash at any point leaves no new corruption), and entries lying inside
 * other metadata left alone.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FaultInjectingBlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { describe, expect, it } from 'vitest';
import { runStatus } from '../../../tests-e2e/src/tools.js';
import { checkQcow2Image, checkResultToQemuJson } from '../src/check/index.js';
import { PreallocatedFixes } from '../src/check/preallocated-fixes.js';
import { keepOpen } from './keep-open.js';
import { qemuImg, qemuIo, requireTools, suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');
const COPIED = 1n << 63n;
const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;

/**
 * A 4 MiB image (4 KiB clusters, `options`) with data in its first 16 clusters and allocated
 * zeroes in clusters 4 and 5; `damage` gets the file's bytes and the first L2 table's offset.
 */
function damagedImage(
  dir: string,
  name: string,
  options: string,
  damage: (bytes: Buffer, l2: number) => void,
) {
  const path = join(dir, name);
  qemuImg(dir, 'create', '-q', '-f', 'qcow2', '-o', `cluster_size=4096,${options}`, name, '4M');
  qemuIo(dir, name, ['write -P 0x11 0 64k', 'write -z 16k 8k']);
  const bytes = readFileSync(path);
  const l1 = Number(bytes.readBigUInt64BE(40));
  damage(bytes, Number(bytes.readBigUInt64BE(l1) & OFFSET_MASK));
  writeFileSync(path, bytes);
  return { path, bytes };
}

/** Moves entry `index`'s offset 512 bytes into its cluster and sets the zero flag. */
function skewToPreallocated(bytes: Buffer, l2: number, index: number): void {
  const entry = bytes.readBigUInt64BE(l2 + index * 8);
  bytes.writeBigUInt64BE((entry & (OFFSET_MASK | COPIED)) + 0x200n + 1n, l2 + index * 8);
}

const findings = (stderr: string) =>
  stderr.split('\n').filter((line) => line !== '' && !line.startsWith('qemu-img:'));

describe.skipIf(!haveQemu)('misaligned preallocated entries: repair as qemu-img check -r all', () => {
  const dir = suiteTempDir('qcowkit-misaligned-');

  it.each([
    ['v3', 'compat=1.1'],
    ['v2 (no zero flag: made unallocated)', 'compat=0.10'],
  ])('%s: the same lines, counts and verdict after', async (_name, options) => {
    const { path, bytes } = damagedImage(dir.path, `lines-${options}.qcow2`, options, (b, l2) => {
      skewToPreallocated(b, l2, 1);
      skewToPreallocated(b, l2, 4);
      b.writeBigUInt64BE(COPIED | (1n << 40n) | 0x201n, l2 + 9 * 8); // past the end too
    });
    const qemu = runStatus('qemu-img', ['check', '-r', 'all', '--output=json', path]);
    const file = MemoryBlockDevice.from(bytes);
    const result = await checkQcow2Image({ file }, { repair: 'all' });
    expect(result.messages).toEqual(findings(qemu.stderr));
    expect(checkResultToQemuJson(result, { filename: path })).toEqual(JSON.parse(qemu.stdout));
    expect(result.corruptionsFixed).toBeGreaterThanOrEqual(3);
    expect(result.corruptions).toBe(0);

    const repaired = await file.read(0, file.size);
    const l1 = Number(Buffer.from(repaired).readBigUInt64BE(40));
    const l2 = Number(Buffer.from(repaired).readBigUInt64BE(l1) & OFFSET_MASK);
    const view = Buffer.from(repaired);
    // QEMU writes the zero flag alone; a v2 image has none, and without a backing file an
    // unallocated entry reads as the same zeros.
    const expected = options === 'compat=0.10' ? 0n : 1n;
    for (const index of [1, 4, 9]) expect(view.readBigUInt64BE(l2 + index * 8)).toBe(expected);
  });

  it('a crash at any point of the repair leaves no new corruption, and a repair after it finishes', async () => {
    const { bytes } = damagedImage(dir.path, 'crash.qcow2', 'compat=1.1', (b, l2) => {
      skewToPreallocated(b, l2, 1);
      skewToPreallocated(b, l2, 4);
      skewToPreallocated(b, l2, 7);
    });
    const before = await checkQcow2Image({ file: MemoryBlockDevice.from(bytes) });
    expect(before.corruptions).toBeGreaterThan(0);
    let completed = false;
    for (let crashAfter = 0; !completed; crashAfter++) {
      expect(crashAfter).toBeLessThan(500);
      const inner = MemoryBlockDevice.from(bytes);
      const fault = new FaultInjectingBlockDevice(keepOpen(inner), { crashAfter });
      completed = await checkQcow2Image({ file: fault }, { repair: 'all' }).then(
        () => true,
        () => false,
      );
      const disk = MemoryBlockDevice.from(await inner.read(0, inner.size));
      const after = await checkQcow2Image({ file: disk });
      // Refcounts never drop below the references (a repaired entry is durable first).
      expect(after.messages.filter((line) => /^ERROR cluster \d+ refcount=0/.test(line))).toEqual([]);
      expect(after.corruptions).toBeLessThanOrEqual(before.corruptions);
      const again = await checkQcow2Image({ file: disk }, { repair: 'all' });
      expect([again.corruptions, again.leaks, again.checkErrors]).toEqual([0, 0, 0]);
    }
  });
});

describe('PreallocatedFixes', () => {
  const CLUSTER = 4096;
  const fixes = () =>
    new PreallocatedFixes({
      clusterSize: CLUSTER,
      l2EntryBytes: 8,
      replacement: 'zero-flag',
      metadata: [[6 * CLUSTER, 16]],
      refcountBlockClusters: new Set([2]),
    });
  const tableWith = (index: number, entry: bigint) => {
    const table = new Uint8Array(CLUSTER);
    new DataView(table.buffer).setBigUint64(index * 8, entry);
    return new DataView(table.buffer);
  };

  it('plans an entry: replaced in the table walked, in later reads of its bytes, then written together', async () => {
    const plan = fixes();
    plan.beginTable(4 * CLUSTER + 0x200, true);
    const view = tableWith(3, 0x5201n);
    expect(plan.plan(view, 3)).toBe(true);
    expect(view.getBigUint64(3 * 8)).toBe(1n);
    expect(plan.plan(tableWith(4, 0x6201n), 4)).toBe(true);
    expect(plan.count).toBe(2);
    // The same bytes read again as an aligned table (entry 64 + 3 of it).
    const again = new Uint8Array(CLUSTER).fill(0xee);
    plan.applyTo(again, 4 * CLUSTER);
    expect(new DataView(again.buffer).getBigUint64((64 + 3) * 8)).toBe(1n);
    expect(new DataView(again.buffer).getBigUint64((64 + 5) * 8)).toBe(0xeeeeeeeeeeeeeeeen);

    const file = new MemoryBlockDevice(8 * CLUSTER);
    const writes: [number, number][] = [];
    const flushes: number[] = [];
    const recording = Object.assign(Object.create(file) as MemoryBlockDevice, {
      write: (offset: number, data: Uint8Array) => {
        writes.push([offset, data.length]);
        return file.write(offset, data);
      },
      flush: () => {
        flushes.push(writes.length);
        return file.flush();
      },
    });
    await plan.write(recording, {});
    expect(writes).toEqual([[4 * CLUSTER + 0x200 + 3 * 8, 16]]);
    expect(flushes).toEqual([1]);
  });

  it('leaves entries lying in the header, other metadata or (for snapshots) active L2 tables', () => {
    const plan = fixes();
    plan.beginTable(0x200, true); // the header cluster
    expect(plan.plan(tableWith(0, 0x5201n), 0)).toBe(false);
    plan.beginTable(2 * CLUSTER, true); // a refcount block
    expect(plan.plan(tableWith(0, 0x5201n), 0)).toBe(false);
    plan.beginTable(6 * CLUSTER - 0x200, true); // runs into the metadata's cluster
    expect(plan.plan(tableWith(0, 0x5201n), 0)).toBe(true);
    expect(plan.plan(tableWith(64, 0x5201n), 64)).toBe(false);
    plan.beginTable(5 * CLUSTER, true);
    plan.beginTable(5 * CLUSTER, false); // a snapshot's table that is also an active one
    const view = tableWith(1, 0x7201n);
    expect(plan.plan(view, 1)).toBe(false);
    expect(view.getBigUint64(8)).toBe(0x7201n);
    expect(plan.count).toBe(1);
  });
});
