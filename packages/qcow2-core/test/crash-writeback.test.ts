/**
 * Crashes inside the metadata write-back: a fixed workload (allocating and copy-on-write writes,
 * discards, zeroes, over more L2 tables than a tiny L2 cache holds, so dirty slices are written
 * back under cache pressure) on FaultInjectingBlockDevice, crashed at every request in turn. The
 * write-back's requests are: refcount blocks, flush, L2 slices, flush (then frees, written with the
 * next one), so the crash points cover "after the refcounts, before the L2 slices", "during an
 * eviction write-back" and "after the L2 slices, before the frees". After each crash: no corruption
 * (ours and qemu-img check exit 0 or 3) and every byte flushed and not touched since reads back.
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type BlockDevice, FaultInjectingBlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { patternBytes } from '@qcowkit/blockdev/testing';
import { describe, expect, it } from 'vitest';
import { Qcow2Image } from '../src/index.js';
import { keepOpen } from './keep-open.js';
import { requireTools, suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img');
const CLUSTER = 4096;
const TABLES = 5;
/** L2 tables of 2 MiB each (one 4 KiB slice per table). */
const SIZE = TABLES * (2 << 20);
/** Room for 4 slices: more than 2 dirty ones are written back. */
const L2_CACHE = 4 * CLUSTER;

type Op =
  | { kind: 'write'; offset: number; length: number; seed: number }
  | { kind: 'zero' | 'discard'; offset: number; length: number }
  | { kind: 'flush' };

/** Touches every L2 table twice, with partial (copy-on-write) and whole-cluster writes, frees. */
function workload(): Op[] {
  const ops: Op[] = [];
  for (let table = 0; table < TABLES; table++) {
    const base = table * (2 << 20);
    ops.push({ kind: 'write', offset: base + 1000, length: 3 * CLUSTER, seed: table });
    ops.push({ kind: 'discard', offset: base + 64 * CLUSTER, length: 4 * CLUSTER });
  }
  ops.push({ kind: 'flush' });
  for (let table = TABLES - 1; table >= 0; table--) {
    const base = table * (2 << 20);
    ops.push({ kind: 'write', offset: base + 65 * CLUSTER + 7, length: 2 * CLUSTER, seed: 100 + table });
    ops.push({ kind: 'zero', offset: base + 2 * CLUSTER, length: CLUSTER });
    ops.push({ kind: 'write', offset: base + 300 * CLUSTER, length: 3 * CLUSTER, seed: 200 + table });
  }
  return ops;
}

/** Setup: data flushed in every table (so the workload copies on write and frees). */
async function setup(inner: MemoryBlockDevice): Promise<Uint8Array> {
  // 64-bit refcounts: a block covers 2 MiB of the file, so the workload makes new blocks (above the L2
  // tables, which a crash applying writes in address order would otherwise favour).
  const image = await Qcow2Image.create(keepOpen(inner), {
    size: SIZE,
    clusterSize: CLUSTER,
    refcountBits: 64,
  });
  const content = new Uint8Array(SIZE);
  for (let table = 0; table < TABLES; table++) {
    const at = table * (2 << 20);
    const bytes = patternBytes(1000 + table, 72 * CLUSTER);
    await image.write(at, bytes);
    content.set(bytes, at);
  }
  await image.close();
  return content;
}

interface Outcome {
  durable: Uint8Array;
  /** Ranges changed since the last completed flush (their content is not promised). */
  touched: [number, number][];
  crashed: boolean;
}

async function runWorkload(
  device: BlockDevice,
  initial: Uint8Array,
  beforeFlush: () => void = () => {},
): Promise<Outcome> {
  let durable = initial.slice();
  const model = initial.slice();
  let touched: [number, number][] = [];
  try {
    const image = await Qcow2Image.open(device, { readOnly: false, l2CacheBytes: L2_CACHE });
    for (const op of workload()) {
      switch (op.kind) {
        case 'write': {
          const data = patternBytes(op.seed, op.length);
          touched.push([op.offset, op.offset + op.length]);
          await image.write(op.offset, data);
          model.set(data, op.offset);
          break;
        }
        case 'zero':
        case 'discard':
          touched.push([op.offset, op.offset + op.length]);
          if (op.kind === 'zero') await image.writeZeroes(op.offset, op.length);
          else await image.discard(op.offset, op.length);
          model.fill(0, op.offset, op.offset + op.length);
          break;
        case 'flush':
          beforeFlush();
          await image.flush();
          durable = model.slice();
          touched = [];
          break;
      }
    }
    await image.close();
    return { durable: model, touched: [], crashed: false };
  } catch (error) {
    if (!(device instanceof FaultInjectingBlockDevice) || !device.crashed) throw error;
    return { durable, touched, crashed: true };
  }
}

describe.skipIf(!haveQemu)('crashes inside the metadata write-back', () => {
  const dir = suiteTempDir();

  it('a crash at any request of the workload leaves no corruption and every flushed byte', async () => {
    // A dry run counts the requests and checks the workload does write back under cache pressure.
    const dryInner = new MemoryBlockDevice(0);
    const initial = await setup(dryInner);
    const startImage = await dryInner.read(0, dryInner.size);
    const kinds: string[] = [];
    const dry = new FaultInjectingBlockDevice(keepOpen(dryInner), {
      failWhen: (request) => {
        kinds.push(request.kind);
        return false;
      },
    });
    let explicitFlushAt = -1;
    await runWorkload(dry, initial, () => {
      explicitFlushAt = kinds.length;
    });
    // Write-backs before the workload's own flush: cache pressure made them.
    const pressureFlushes = kinds.slice(0, explicitFlushAt).filter((kind) => kind === 'flush').length;
    expect(pressureFlushes).toBeGreaterThanOrEqual(1);

    let checkedByQemu = 0;
    for (let crashAfter = 1; crashAfter <= kinds.length; crashAfter++) {
      const inner = MemoryBlockDevice.from(startImage.slice());
      const fault = new FaultInjectingBlockDevice(keepOpen(inner), { crashAfter });
      const { durable, touched, crashed } = await runWorkload(fault, initial);
      const reopened = await Qcow2Image.open(keepOpen(inner));
      const ours = await reopened.check();
      expect(ours.corruptions, `crash after ${crashAfter}: ${ours.messages.join('\n')}`).toBe(0);
      const content = await reopened.read(0, SIZE);
      let from = 0;
      const ranges: [number, number][] = [...touched.sort((a, b) => a[0] - b[0]), [SIZE, SIZE]];
      for (const [start, end] of ranges) {
        if (
          start > from &&
          Buffer.compare(content.subarray(from, start), durable.subarray(from, start)) !== 0
        ) {
          expect.fail(
            `crash after ${crashAfter} (crashed: ${crashed}): flushed bytes in [${from}, ${start}) differ`,
          );
        }
        from = Math.max(from, end);
      }
      await reopened.close();
      // QEMU's check at the phase boundaries (around every flush) and on every tenth crash point.
      if (crashAfter % 10 === 0 || kinds[crashAfter - 1] === 'flush' || kinds[crashAfter] === 'flush') {
        const name = join(dir.path, `wb-${crashAfter}.qcow2`);
        writeFileSync(name, await inner.read(0, inner.size));
        const status = spawnSync('qemu-img', ['check', name], { encoding: 'utf8' });
        expect([0, 3], `crash after ${crashAfter}: ${status.stdout}${status.stderr}`).toContain(
          status.status,
        );
        checkedByQemu++;
      }
    }
    expect(checkedByQemu).toBeGreaterThan(0);
  }, 120_000);
});
