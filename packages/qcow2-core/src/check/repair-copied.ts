/**
 * Repairing the COPIED flags of the active L1 and L2 tables against the stored refcounts (after
 * those are repaired), as `qemu-img check -r all` does: set exactly when the refcount is 1. A
 * compressed entry never carries COPIED. Tables that cannot be read or written safely (misaligned,
 * past the end of the file) are left alone: the check after the repair still reports them.
 */

import type { BlockDevice, RequestOptions } from '@qcowkit/blockdev';
import { classifyL2Entry } from '../format/l2-entry.js';
import { entryHex, entryOffset, QCOW_OFLAG_COMPRESSED_HIGH, QCOW_OFLAG_COPIED_HIGH } from './entries.js';
import { L2TableReads } from './l2-reads.js';
import type { StoredRefcount } from './stored-refcounts.js';
import { WriteBehind } from './write-behind.js';

/** Where the refcounts come from: the stored ones, or a plan not yet written. */
export interface RefcountSource {
  get(clusterIndex: number, request?: RequestOptions): Promise<StoredRefcount>;
  /** The refcount when known without I/O, else undefined. */
  peek?(clusterIndex: number): StoredRefcount | undefined;
}

const L1_CHUNK_ENTRIES = 64 * 1024;

export interface CopiedRepairGeometry {
  clusterSize: number;
  l1TableOffset: number;
  l1Size: number;
  extendedL2: boolean;
  hasDataFile: boolean;
}

/** Sets `high`'s COPIED bit to `copied`. */
function withCopied(high: number, copied: boolean): number {
  return (copied ? high | QCOW_OFLAG_COPIED_HIGH : high & ~QCOW_OFLAG_COPIED_HIGH) >>> 0;
}

/** Fixed tables being written at once. */
const L2_WRITES_IN_FLIGHT = 16;

/**
 * Fixes COPIED flags; returns the lines and how many entries were fixed. Tables are examined one
 * after another (the lines come in table order), while the next few are read ahead and fixed ones
 * are written behind; one flush at the end.
 */
export async function repairCopiedFlags(
  file: BlockDevice,
  stored: RefcountSource,
  geometry: CopiedRepairGeometry,
  request: RequestOptions,
  /** Keep a line per fix (false for the offline operations, which fix many on purpose). */
  collectLines = true,
): Promise<{ lines: string[]; fixed: number }> {
  const { clusterSize, l1TableOffset, l1Size, extendedL2, hasDataFile } = geometry;
  const lines: string[] = [];
  let fixed = 0;
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const refcountOf = async (hostOffset: number): Promise<number | undefined> => {
    const clusterIndex = Math.floor(hostOffset / clusterSize);
    const refcount = stored.peek?.(clusterIndex) ?? (await stored.get(clusterIndex, request));
    return typeof refcount === 'number' ? refcount : undefined;
  };
  const note = (line: () => string): void => {
    if (collectLines) lines.push(line());
  };
  const fits = (hostOffset: number, length: number): boolean =>
    hostOffset !== 0 && hostOffset % clusterSize === 0 && hostOffset + length <= file.size;
  if (l1TableOffset % clusterSize !== 0) return { lines, fixed };
  const writes = new WriteBehind(L2_WRITES_IN_FLIGHT);
  // Two L1 entries naming one L2 table (a damaged image) must see each other's fixes: then no
  // table is read ahead.
  const seen = new Set<number>();
  let readAhead = true;
  try {
    for (let first = 0; first < l1Size; first += L1_CHUNK_ENTRIES) {
      const count = Math.min(L1_CHUNK_ENTRIES, l1Size - first);
      const l1At = l1TableOffset + first * 8;
      if (l1At + count * 8 > file.size) break;
      const l1 = await file.read(l1At, count * 8, request);
      const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
      const items: number[] = [];
      for (let i = 0; i < count; i++) {
        const l2Offset = entryOffset(l1View.getUint32(i * 8), l1View.getUint32(i * 8 + 4));
        if (!fits(l2Offset, clusterSize)) continue;
        items.push(i);
        if (seen.has(l2Offset)) readAhead = false;
        seen.add(l2Offset);
      }
      // Read ahead (tables side by side in one read) unless a table may come twice (serial mode).
      const reads = readAhead
        ? new L2TableReads(
            file,
            clusterSize,
            items.map((i) => entryOffset(l1View.getUint32(i * 8), l1View.getUint32(i * 8 + 4))),
            request,
          )
        : undefined;
      let l1Dirty = false;
      for (let k = 0; k < items.length; k++) {
        const i = items[k]!;
        const high = l1View.getUint32(i * 8);
        const low = l1View.getUint32(i * 8 + 4);
        const l2Offset = entryOffset(high, low);
        const l2Refcount = await refcountOf(l2Offset);
        if (l2Refcount === undefined) {
          reads?.release(k);
          continue;
        }
        if ((l2Refcount === 1) !== ((high & QCOW_OFLAG_COPIED_HIGH) !== 0)) {
          note(
            () =>
              `Repairing OFLAG_COPIED L2 cluster: l1_index=${first + i} l1_entry=${entryHex(high, low)} refcount=${l2Refcount}`,
          );
          l1View.setUint32(i * 8, withCopied(high, l2Refcount === 1));
          l1Dirty = true;
          fixed++;
        }
        let table: Uint8Array | undefined;
        if (reads !== undefined) {
          table = await reads.table(k);
        } else {
          // Serial mode: the table may have been written just before (same table twice).
          await writes.drain();
          table = await file.read(l2Offset, clusterSize, request);
        }
        if (table === undefined) continue;
        const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
        let l2Dirty = false;
        for (let at = 0; at < clusterSize; at += l2EntryBytes) {
          const entryHigh = view.getUint32(at);
          const entryLow = view.getUint32(at + 4);
          if (entryHigh === 0 && entryLow === 0) continue;
          const compressed = (entryHigh & QCOW_OFLAG_COMPRESSED_HIGH) !== 0;
          const hostOffset = entryOffset(entryHigh, entryLow);
          // A data cluster ('normal' or 'zero-alloc') is one not compressed with a host offset;
          // with a data file also offset 0 with COPIED (the classification says it, for those alone).
          const dataCluster =
            !compressed &&
            (hostOffset !== 0 ||
              (hasDataFile && classifyL2Entry(entryHigh, entryLow, true, extendedL2) === 'normal'));
          let want: boolean;
          if (compressed) {
            want = false;
          } else if (dataCluster) {
            if (hostOffset % clusterSize !== 0) continue;
            let refcount: number | undefined;
            if (hasDataFile) refcount = 1;
            else {
              // Without awaiting when the source knows the refcount (the usual case).
              const known = stored.peek?.(Math.floor(hostOffset / clusterSize));
              refcount =
                known === undefined
                  ? await refcountOf(hostOffset)
                  : typeof known === 'number'
                    ? known
                    : undefined;
            }
            if (refcount === undefined) continue;
            want = refcount === 1;
            if (want !== ((entryHigh & QCOW_OFLAG_COPIED_HIGH) !== 0)) {
              note(
                () =>
                  `Repairing OFLAG_COPIED data cluster: l2_entry=${entryHex(entryHigh, entryLow)} refcount=${refcount}`,
              );
            }
          } else {
            continue;
          }
          if (want !== ((entryHigh & QCOW_OFLAG_COPIED_HIGH) !== 0)) {
            if (compressed) {
              note(
                () =>
                  `Repairing compressed cluster entry with the copied flag: l2_entry=${entryHex(entryHigh, entryLow)}`,
              );
            }
            view.setUint32(at, withCopied(entryHigh, want));
            l2Dirty = true;
            fixed++;
          }
        }
        // A table written back keeps its buffer (the write may still read it).
        if (l2Dirty) await writes.add(file.write(l2Offset, table, request));
        else reads?.release(k);
      }
      await writes.drain();
      if (l1Dirty) await file.write(l1At, l1, request);
    }
    await writes.drain();
  } finally {
    await writes.settle();
  }
  if (fixed > 0) await file.flush(request);
  return { lines, fixed };
}
