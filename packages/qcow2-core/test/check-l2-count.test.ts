/**
 * The check's inline L2 counting (countL2References: the usual entry counted without a call)
 * against a plain model: every non-empty entry through the general path (the data cluster's
 * COPIED flag, then countL2Entry), as the check counted before the inline path. Random sparse
 * tables of every entry kind (normal, misaligned, zero, zero-alloc, compressed, reserved bits,
 * COPIED alone, past the end of the file, offsets past 2^31 clusters, extended L2 bitmaps), with
 * and without a data file, active (fragmentation, COPIED checks) or not, against stored refcounts
 * of 2 or 16 bits (one refcount block, aligned or not): the same counts, findings and fragmentation.
 */
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  checkDataCopied,
  countL2Entry,
  countL2References,
  type FragInfo,
  type Geometry,
} from '../src/check/check.js';
import { CheckLog } from '../src/check/check-log.js';
import { ComputedRefcounts } from '../src/check/computed-refcounts.js';
import { entryOffset, QCOW_OFLAG_COMPRESSED_HIGH } from '../src/check/entries.js';
import { StoredRefcounts } from '../src/check/stored-refcounts.js';
import { encodeRefcount } from '../src/format/refcount.js';

const TWO_POW_32 = 0x1_0000_0000;

/** One entry's words: a host cluster (maybe past the file), flags and noise on top. */
const entryArbitrary = fc.record({
  index: fc.nat(),
  cluster: fc.nat({ max: 48 }),
  copied: fc.boolean(),
  // Low-half noise: zero flag, reserved bits, misalignment (for clusters above 512 bytes), any.
  // Mostly none: the usual entry, the one counted inline.
  lowNoise: fc.oneof(
    { arbitrary: fc.constant(0), weight: 6 },
    { arbitrary: fc.constantFrom(1, 2, 0x100, 0x200, 0x400), weight: 2 },
    { arbitrary: fc.nat({ max: 0xffff_ffff }), weight: 1 },
  ),
  // High-half noise: compressed, reserved bits, offsets far past the file (2^31 clusters), any.
  highNoise: fc.oneof(
    { arbitrary: fc.constant(0), weight: 6 },
    {
      // Compressed, reserved, offsets at 2^31 clusters (of 512 B, 4 KiB, 64 KiB) and far beyond.
      arbitrary: fc.constantFrom(
        QCOW_OFLAG_COMPRESSED_HIGH,
        0x0100_0000,
        0x2000_0000,
        0x100,
        0x800,
        0x8000,
        0x0080_0000,
        0x00ff_ffff,
      ),
      weight: 2,
    },
    { arbitrary: fc.nat({ max: 0xffff_ffff }), weight: 1 },
  ),
  zeroBits: fc.constantFrom(0, 0, 1, 0x8000_0000, 0xffff_ffff),
  allocBits: fc.constantFrom(0, 0, 1, 3, 0xffff_ffff),
});

const caseArbitrary = fc
  .record({
    clusterBits: fc.constantFrom(9, 12, 16),
    extendedL2: fc.boolean(),
    hasDataFile: fc.boolean(),
    active: fc.boolean(),
    refcountOrder: fc.constantFrom(1, 4),
    fileClusters: fc.integer({ min: 8, max: 40 }),
    tail: fc.constantFrom(0, 0, 100),
    unalignedBlock: fc.boolean(),
    refcounts: fc.array(fc.nat({ max: 3 }), { minLength: 40, maxLength: 40 }),
    entries: fc.array(entryArbitrary, { maxLength: 40 }),
  })
  .map((c) => ({ ...c, extendedL2: c.extendedL2 && c.clusterBits >= 14 }));

type Case = typeof caseArbitrary extends fc.Arbitrary<infer T> ? T : never;

/** A file whose cluster 1 is a refcount table naming one block (cluster 2, or misaligned). */
async function storedRefcounts(c: Case): Promise<{ file: MemoryBlockDevice; stored: StoredRefcounts }> {
  const clusterSize = 2 ** c.clusterBits;
  const bytes = new Uint8Array(c.fileClusters * clusterSize + c.tail);
  const view = new DataView(bytes.buffer);
  view.setUint32(clusterSize + 4, 2 * clusterSize + (c.unalignedBlock ? 512 : 0));
  const block = bytes.subarray(2 * clusterSize, 3 * clusterSize);
  c.refcounts.forEach((count, clusterIndex) => {
    encodeRefcount(block, clusterIndex, c.refcountOrder, count);
  });
  const file = MemoryBlockDevice.from(bytes);
  const stored = await StoredRefcounts.load(file, {
    clusterSize,
    refcountBits: 2 ** c.refcountOrder,
    refcountTableOffset: clusterSize,
    refcountTableClusters: 1,
  });
  return { file, stored };
}

function l2Table(c: Case): Uint8Array {
  const clusterSize = 2 ** c.clusterBits;
  const entryBytes = c.extendedL2 ? 16 : 8;
  const table = new Uint8Array(clusterSize);
  const view = new DataView(table.buffer);
  for (const e of c.entries) {
    const at = (e.index % (clusterSize / entryBytes)) * entryBytes;
    const hostOffset = e.cluster * clusterSize;
    const high = (Math.floor(hostOffset / TWO_POW_32) | (e.copied ? 0x8000_0000 : 0) | e.highNoise) >>> 0;
    view.setUint32(at, high);
    view.setUint32(at + 4, ((hostOffset >>> 0) | e.lowNoise) >>> 0);
    if (c.extendedL2) {
      view.setUint32(at + 8, e.zeroBits);
      view.setUint32(at + 12, e.allocBits);
    }
  }
  return table;
}

/** What one count leaves behind, for comparison. */
function outcome(refcounts: ComputedRefcounts, log: CheckLog, frag: FragInfo | undefined) {
  log.flushDeferred();
  return {
    counts: Array.from(refcounts.array),
    used: refcounts.used,
    corruptions: log.corruptions,
    leaks: log.leaks,
    checkErrors: log.checkErrors,
    messages: log.finalMessages(),
    frag,
  };
}

describe('check: inline L2 counting', () => {
  it('counts, finds and measures fragmentation as the entry-by-entry general path', async () => {
    await fc.assert(
      fc.asyncProperty(caseArbitrary, async (c) => {
        const { file, stored } = await storedRefcounts(c);
        const clusterSize = 2 ** c.clusterBits;
        const geometry: Geometry = {
          file,
          clusterSize,
          clusterBits: c.clusterBits,
          extendedL2: c.extendedL2,
          hasDataFile: c.hasDataFile,
          l2EntryBytes: c.extendedL2 ? 16 : 8,
          request: {},
        };
        const table = l2Table(c);
        // As countL1References passes it: the active table without a data file, blocks in memory.
        const copied = c.active && !c.hasDataFile ? stored : undefined;
        const run = () => {
          const log = new CheckLog();
          const refcounts = new ComputedRefcounts(file.size, clusterSize, 2 ** c.refcountOrder, log);
          const frag: FragInfo | undefined = c.active
            ? { allocated: 0, fragmented: 0, compressed: 0 }
            : undefined;
          return { log, refcounts, frag };
        };

        const inline = run();
        countL2References(geometry, table, inline.frag, inline.refcounts, inline.log, copied);

        const model = run();
        const view = new DataView(table.buffer);
        let nextContiguousOffset = 0;
        for (let i = 0; i < clusterSize / geometry.l2EntryBytes; i++) {
          const at = i * geometry.l2EntryBytes;
          const words = [0, 4, ...(c.extendedL2 ? [8, 12] : [])].map((k) => view.getUint32(at + k));
          if (words.every((word) => word === 0)) continue;
          const [high, low] = words as [number, number];
          if (copied !== undefined && (high & QCOW_OFLAG_COMPRESSED_HIGH) === 0) {
            const hostOffset = entryOffset(high, low);
            if (hostOffset !== 0) {
              checkDataCopied(copied, Math.floor(hostOffset / clusterSize), high, low, model.log);
            }
          }
          nextContiguousOffset = countL2Entry(
            geometry,
            view,
            i,
            model.frag,
            nextContiguousOffset,
            model.refcounts,
            model.log,
          );
        }

        expect(outcome(inline.refcounts, inline.log, inline.frag)).toEqual(
          outcome(model.refcounts, model.log, model.frag),
        );
      }),
      { numRuns: 300 },
    );
  });
});
