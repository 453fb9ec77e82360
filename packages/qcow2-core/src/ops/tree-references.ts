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
  const max = maxRefcount(edit.header.refcountOrder);
  let highest = 0;
  const counts = edit.counts;
  for (let clusterIndex = 0; clusterIndex < counts.length; clusterIndex++) {
    const count = counts[clusterIndex] ?? 0;
    if (count > highest) highest = count;
  }
  return highest * 2 <= max;
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
      let dirty = false;
      for (let at = 0; at < clusterSize; at += l2EntryBytes) {
        const high = view.getUint32(at);
        const low = view.getUint32(at + 4);
        if (high === 0 && low === 0) continue;
        if (!hasDataFile && (high & QCOW_OFLAG_COMPRESSED_HIGH) === 0) {
          // Not compressed, no data file: 'normal' or 'zero-alloc' when it has a host offset (an
          // entry without one references nothing, but may still carry COPIED: cleared below).
          const hostOffset = entryOffset(high, low);
          if (hostOffset !== 0) {
            const clusterIndex = hostOffset / clusterSize;
            const count = hostOffset % clusterSize === 0 ? (counts[clusterIndex] ?? 0) + delta : -1;
            // The usual entry inline; out of range or misaligned: the general path (which throws
            // in its words: freed too often, or an overflow).
            if (count >= 0 && count <= max) counts[clusterIndex] = count;
            else edit.addReferences(hostOffset, clusterSize, delta);
          }
        } else {
          switch (classifyL2Entry(high, low, hasDataFile, extendedL2)) {
            case 'compressed': {
              const extent = decodeCompressedDescriptor(high, low, clusterBits);
              edit.addReferences(extent.hostOffset, extent.length, delta);
              break;
            }
            default:
              // With a data file the data clusters are not in this file's refcounts.
              break;
          }
        }
        if (clearCopied && (high & QCOW_OFLAG_COPIED_HIGH) !== 0) {
          view.setUint32(at, (high & ~QCOW_OFLAG_COPIED_HIGH) >>> 0);
          dirty = true;
        }
      }
      // A table written back keeps its buffer (the write may still read it).
      if (dirty) await writes.add(file.write(l2Offset, table, request));
      else reads.release(k);
    }
    await writes.drain();
  } finally {
    await writes.settle();
  }
  if (l1Dirty) await file.write(l1TableOffset, l1, request);
}
