/**
 * One more, or one fewer, reference to everything an L1 table reaches (its L2 tables and the
 * clusters they map), planned in an offline edit's counts: the bulk step of the snapshot
 * operations and of emptying an image.
 *
 * One pass over the tree: the L1 table in one read, the L2 tables through L2TableReads (tables
 * lying next to each other in the file read together, several reads ahead of the table being
 * counted); each entry bumps a counter in place, with no object per entry. With `clearCopied` (the
 * active table, when a snapshot is taken) the same pass clears COPIED in the L1 and L2 entries
 * (every cluster they reach is about to be shared) and writes the tables it changed behind the
 * walk; call it so only when the planned counts cannot overflow (see {@link canShareTree}),
 * because then nothing can fail half-way for a reason other than I/O.
 */

import {
  decodeCompressedDescriptor,
  entryOffset,
  QCOW_OFLAG_COMPRESSED_HIGH,
  QCOW_OFLAG_COPIED_HIGH,
  TWO_POW_32,
} from '../check/entries.js';
import { L2TableReads } from '../check/l2-reads.js';
import { WriteBehind } from '../check/write-behind.js';
import { classifyL2Entry } from '../format/l2-entry.js';
import { maxRefcount } from '../format/refcount.js';
import type { ImageEdit } from './image-edit.js';

/** Changed tables being written at once (with `clearCopied`). */
const WRITES_IN_FLIGHT = 16;

export interface TreeReferenceOptions {
  /** Clear COPIED in the L1 and L2 entries and write the tables changed (the active table only). */
  readonly clearCopied?: boolean;
}

/**
 * True when adding one reference to everything one tree reaches cannot overflow any refcount: a
 * cluster a tree reaches k times already has at least k references, so at most doubles.
 */
export function canShareTree(edit: ImageEdit): boolean {
  return edit.highestCount() * 2 <= maxRefcount(edit.header.refcountOrder);
}

/** Adds `delta` references to every L2 table and cluster the L1 table reaches (not the L1 table itself). */
export async function addTreeReferences(
  edit: ImageEdit,
  l1TableOffset: number,
  l1Size: number,
  delta: 1 | -1,
  options: TreeReferenceOptions = {},
): Promise<void> {
  if (l1Size === 0) return;
  // Counts change below without ImageEdit's methods.
  edit.countsChanged();
  const { file, request, clusterSize, extendedL2, hasDataFile } = edit;
  const clusterBits = edit.header.clusterBits;
  const counts = edit.counts as number[];
  const max = maxRefcount(edit.header.refcountOrder);
  const clearCopied = options.clearCopied === true;
  const l2EntryBytes = extendedL2 ? 16 : 8;

  const bump = (clusterIndex: number): void => {
    const count = (counts[clusterIndex] ?? 0) + delta;
    // Out of range: the general path throws, in its words (freed too often, or an overflow).
    if (count < 0 || count > max) edit.addReferences(clusterIndex * clusterSize, clusterSize, delta);
    else counts[clusterIndex] = count;
  };

  const l1 = await file.read(l1TableOffset, l1Size * 8, request);
  const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const l2Offsets: number[] = [];
  let l1Dirty = false;
  for (let i = 0; i < l1Size; i++) {
    const high = l1View.getUint32(i * 8);
    const l2Offset = entryOffset(high, l1View.getUint32(i * 8 + 4));
    if (l2Offset === 0) continue;
    l2Offsets.push(l2Offset);
    if (clearCopied && (high & QCOW_OFLAG_COPIED_HIGH) !== 0) {
      l1View.setUint32(i * 8, (high & ~QCOW_OFLAG_COPIED_HIGH) >>> 0);
      l1Dirty = true;
    }
  }

  const walk: PlainWalk = {
    counts,
    delta,
    max,
    clusterSize,
    step: l2EntryBytes,
    clearCopied,
    dirty: false,
  };
  const reads = new L2TableReads(file, clusterSize, l2Offsets, request);
  const writes = new WriteBehind(WRITES_IN_FLIGHT);
  try {
    for (let k = 0; k < l2Offsets.length; k++) {
      const l2Offset = l2Offsets[k]!;
      if (l2Offset % clusterSize === 0) bump(l2Offset / clusterSize);
      else edit.addReferences(l2Offset, clusterSize, delta);
      const table = await reads.table(k);
      // Past the end of the file (the edit's check has reported it): nothing to count.
      if (table === undefined) continue;
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      walk.dirty = false;
      // The usual entries in the kernel; each other one here, then the kernel again after it.
      for (let at = hasDataFile ? 0 : countPlainEntries(view, 0, walk); at < clusterSize; ) {
        const high = view.getUint32(at);
        const low = view.getUint32(at + 4);
        if (!hasDataFile && (high & QCOW_OFLAG_COMPRESSED_HIGH) === 0) {
          // Not compressed, no data file: 'normal' or 'zero-alloc' when it has a host offset.
          // Out of range or misaligned: the general path (which throws in its words: freed too
          // often, or an overflow).
          edit.addReferences(entryOffset(high, low), clusterSize, delta);
        } else if (classifyL2Entry(high, low, hasDataFile, extendedL2) === 'compressed') {
          const extent = decodeCompressedDescriptor(high, low, clusterBits);
          edit.addReferences(extent.hostOffset, extent.length, delta);
        }
        // (With a data file the data clusters are not in this file's refcounts.)
        if (clearCopied && (high & QCOW_OFLAG_COPIED_HIGH) !== 0) {
          view.setUint32(at, (high & ~QCOW_OFLAG_COPIED_HIGH) >>> 0);
          walk.dirty = true;
        }
        at += l2EntryBytes;
        if (!hasDataFile) at = countPlainEntries(view, at, walk);
      }
      // A table written back keeps its buffer (the write may still read it).
      if (walk.dirty) await writes.add(file.write(l2Offset, table, request));
      else reads.release(k);
    }
    await writes.drain();
  } finally {
    await writes.settle();
  }
  if (l1Dirty) await file.write(l1TableOffset, l1, request);
}

/** What {@link countPlainEntries} needs of a walk, and whether it changed the table. */
interface PlainWalk {
  readonly counts: number[];
  readonly delta: 1 | -1;
  readonly max: number;
  readonly clusterSize: number;
  /** Bytes of one L2 entry (8, or 16 with extended L2). */
  readonly step: number;
  readonly clearCopied: boolean;
  /** Set when a COPIED flag was cleared in the table. */
  dirty: boolean;
}

/**
 * Counts the usual entries of an L2 table (no data file) from byte `at` on: unallocated ones, and
 * those not compressed whose host offset is 0 or a cluster whose count stays within 0..max (COPIED
 * cleared with `clearCopied`); returns the byte offset of the first other entry (compressed,
 * misaligned, out of range), or the table's end.
 *
 * Why a function of its own: the walk is async and long, and a hot loop inside it made V8 optimize
 * all of it (on-stack replacement, then again on the next call, deoptimized and optimized again as
 * the entry kinds changed): in `qcow2 snapshot -a` on a 1 GiB image (64 KiB clusters), that
 * optimizing took more CPU than the rest of the command together. This loop alone compiles in a
 * fraction of that, once for every walk of the process.
 */
function countPlainEntries(view: DataView, at: number, walk: PlainWalk): number {
  const { counts, delta, max, clusterSize, step, clearCopied } = walk;
  const end = view.byteLength;
  // A local during the loop (see check.ts countPlainEntries), set in `walk` on the way out.
  let dirty = false;
  for (; at < end; at += step) {
    const high = view.getUint32(at);
    const low = view.getUint32(at + 4);
    if (high === 0 && low === 0) continue;
    if ((high & QCOW_OFLAG_COMPRESSED_HIGH) !== 0) break;
    // The host offset (entryOffset, written out: one function less for V8 to optimize apart).
    const hostOffset = (high & 0x00ff_ffff) * TWO_POW_32 + ((low & 0xffff_fe00) >>> 0);
    if (hostOffset !== 0) {
      if (hostOffset % clusterSize !== 0) break;
      const clusterIndex = hostOffset / clusterSize;
      const count = (counts[clusterIndex] ?? 0) + delta;
      if (count < 0 || count > max) break;
      counts[clusterIndex] = count;
    }
    if (clearCopied && (high & QCOW_OFLAG_COPIED_HIGH) !== 0) {
      view.setUint32(at, (high & ~QCOW_OFLAG_COPIED_HIGH) >>> 0);
      dirty = true;
    }
  }
  if (dirty) walk.dirty = true;
  return at;
}
