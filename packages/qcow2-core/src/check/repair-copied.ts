/**
 * Repairing the COPIED flags of the active L1 and L2 tables against the stored refcounts (after
 * those are repaired), as `qemu-img check -r all` does: set exactly when the refcount is 1. A
 * compressed entry never carries COPIED. As in QEMU, a misaligned entry's flag follows the refcount
 * of the cluster its offset falls in, and a table an L1 entry names at a misaligned offset is read
 * and written there. Tables that cannot be read or written safely (past the end of the file, over
 * other metadata) are left alone: the check after the repair still reports them.
 */

import type { BlockDevice, RequestOptions } from '@qcowkit/blockdev';
import { classifyL2Entry } from '../format/l2-entry.js';
import {
  entryHex,
  entryOffset,
  QCOW_OFLAG_COMPRESSED_HIGH,
  QCOW_OFLAG_COPIED_HIGH,
  TWO_POW_32,
} from './entries.js';
import { L2TableReads } from './l2-reads.js';
import { decodeRefcount, type StoredRefcount } from './stored-refcounts.js';
import { WriteBehind } from './write-behind.js';

/** Where the refcounts come from: the stored ones, or a plan not yet written. */
export interface RefcountSource {
  get(clusterIndex: number, request?: RequestOptions): Promise<StoredRefcount>;
  /** The refcount when known without I/O, else undefined. */
  peek?(clusterIndex: number): StoredRefcount | undefined;
  /** Stored refcounts (StoredRefcounts has these): the blocks in memory by table index, when all
   * are; the entries of a block and their width. What `peek` decodes, read in the walk's loop. */
  readonly residentBlocks?: readonly (Uint8Array | undefined)[] | undefined;
  readonly entriesPerBlock?: number;
  readonly refcountBits?: number;
  /** A plan: the refcount of every cluster (0 past the end), what `peek` returns. */
  readonly plannedCounts?: readonly number[];
}

const L1_CHUNK_ENTRIES = 64 * 1024;

export interface CopiedRepairGeometry {
  clusterSize: number;
  l1TableOffset: number;
  l1Size: number;
  extendedL2: boolean;
  hasDataFile: boolean;
  /**
   * Host ranges of other metadata ([offset, length]: the header, the refcount table and blocks,
   * the L1 table, the snapshot table and snapshots' L1 tables): an L1 entry naming a table whose
   * clusters hold any of it (a damaged image) gets its own flag fixed, but that "table" is never
   * written, as QEMU's overlap check (by whole clusters) refuses such a write. Without it, every
   * table is written as needed.
   */
  metadata?: readonly (readonly [number, number])[];
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
  const overlapsMetadata = (hostOffset: number, length: number): boolean => {
    // Whole clusters, as QEMU's overlap check.
    const start = Math.floor(hostOffset / clusterSize) * clusterSize;
    const end = Math.ceil((hostOffset + length) / clusterSize) * clusterSize;
    return (
      geometry.metadata?.some(([offset, size]) => size > 0 && start < offset + size && offset < end) ?? false
    );
  };
  const fits = (hostOffset: number, length: number): boolean =>
    hostOffset !== 0 && hostOffset + length <= file.size && !overlapsMetadata(hostOffset, length);
  /**
   * What entry (entryHigh, entryLow)'s COPIED flag should be, its line noted when it is not so;
   * undefined for an entry left alone (no data cluster, refcount unreadable).
   */
  const wantedCopied = async (entryHigh: number, entryLow: number): Promise<boolean | undefined> => {
    if (entryHigh === 0 && entryLow === 0) return undefined;
    const compressed = (entryHigh & QCOW_OFLAG_COMPRESSED_HIGH) !== 0;
    const hostOffset = entryOffset(entryHigh, entryLow);
    if (compressed) {
      if ((entryHigh & QCOW_OFLAG_COPIED_HIGH) !== 0) {
        note(
          () =>
            `Repairing compressed cluster entry with the copied flag: l2_entry=${entryHex(entryHigh, entryLow)}`,
        );
      }
      return false;
    }
    // A data cluster ('normal' or 'zero-alloc') is one not compressed with a host offset;
    // with a data file also offset 0 with COPIED (the classification says it, for those alone).
    const dataCluster =
      hostOffset !== 0 ||
      (hasDataFile && classifyL2Entry(entryHigh, entryLow, true, extendedL2) === 'normal');
    if (!dataCluster) return undefined;
    let refcount: number | undefined;
    if (hasDataFile) refcount = 1;
    else {
      // Without awaiting when the source knows the refcount (the usual case).
      const known = stored.peek?.(Math.floor(hostOffset / clusterSize));
      refcount =
        known === undefined ? await refcountOf(hostOffset) : typeof known === 'number' ? known : undefined;
    }
    if (refcount === undefined) return undefined;
    const want = refcount === 1;
    if (want !== ((entryHigh & QCOW_OFLAG_COPIED_HIGH) !== 0)) {
      note(
        () =>
          `Repairing OFLAG_COPIED data cluster: l2_entry=${entryHex(entryHigh, entryLow)} refcount=${refcount}`,
      );
    }
    return want;
  };
  /**
   * Sets the COPIED flag of the L1 entry at `at` in `l1View` (L1 index `index`) from the refcount
   * of the cluster it names; true when it changed. An unreadable refcount leaves it alone.
   */
  const fixL1Copied = async (index: number, l1View: DataView, at: number): Promise<boolean> => {
    const high = l1View.getUint32(at);
    const low = l1View.getUint32(at + 4);
    const l2Refcount = await refcountOf(entryOffset(high, low));
    if (l2Refcount === undefined || (l2Refcount === 1) === ((high & QCOW_OFLAG_COPIED_HIGH) !== 0))
      return false;
    note(
      () =>
        `Repairing OFLAG_COPIED L2 cluster: l1_index=${index} l1_entry=${entryHex(high, low)} refcount=${l2Refcount}`,
    );
    l1View.setUint32(at, withCopied(high, l2Refcount === 1));
    fixed++;
    return true;
  };
  // The kernel serves the usual case: no data file, refcounts known without I/O, no lines kept.
  const plainKernel = !hasDataFile && !collectLines && stored.peek !== undefined;
  const walk: PlainRepair = {
    source: stored,
    blocks: stored.residentBlocks,
    perBlock: stored.entriesPerBlock ?? 1,
    refcountBits: stored.refcountBits ?? 16,
    planned: stored.plannedCounts,
    clusterSize,
    step: l2EntryBytes,
    dirty: false,
    fixed: 0,
  };
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
      let l1Dirty = false;
      for (let i = 0; i < count; i++) {
        const high = l1View.getUint32(i * 8);
        const low = l1View.getUint32(i * 8 + 4);
        const l2Offset = entryOffset(high, low);
        if (l2Offset === 0) continue;
        if (!fits(l2Offset, clusterSize)) {
          // A table that cannot be read (past the end, over metadata) still gets its L1 entry's
          // COPIED flag set from the refcount of the cluster it names, as QEMU does: a leak repair
          // may just have dropped that refcount, and a stale flag would be a new corruption.
          if (await fixL1Copied(first + i, l1View, i * 8)) l1Dirty = true;
          continue;
        }
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
      for (let k = 0; k < items.length; k++) {
        const i = items[k]!;
        const l2Offset = entryOffset(l1View.getUint32(i * 8), l1View.getUint32(i * 8 + 4));
        if ((await refcountOf(l2Offset)) === undefined) {
          reads?.release(k);
          continue;
        }
        if (await fixL1Copied(first + i, l1View, i * 8)) l1Dirty = true;
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
        // The usual entries in the kernel (see repairPlainEntries); each other one here.
        walk.dirty = false;
        walk.fixed = 0;
        for (let at = plainKernel ? repairPlainEntries(view, 0, walk) : 0; at < clusterSize; ) {
          const entryHigh = view.getUint32(at);
          const entryLow = view.getUint32(at + 4);
          const fix = await wantedCopied(entryHigh, entryLow);
          if (fix !== undefined && fix !== ((entryHigh & QCOW_OFLAG_COPIED_HIGH) !== 0)) {
            view.setUint32(at, withCopied(entryHigh, fix));
            l2Dirty = true;
            fixed++;
          }
          at += l2EntryBytes;
          if (plainKernel) at = repairPlainEntries(view, at, walk);
        }
        fixed += walk.fixed;
        l2Dirty ||= walk.dirty;
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

/** What {@link repairPlainEntries} needs of a repair, and what it fixed in the table. */
interface PlainRepair {
  /** Asked when neither `blocks` nor `planned` is given. */
  readonly source: RefcountSource;
  readonly blocks: readonly (Uint8Array | undefined)[] | undefined;
  readonly perBlock: number;
  readonly refcountBits: number;
  readonly planned: readonly number[] | undefined;
  readonly clusterSize: number;
  /** Bytes of one L2 entry (8, or 16 with extended L2). */
  readonly step: number;
  /** Set when a flag was fixed in the table; `fixed` counts them. */
  dirty: boolean;
  fixed: number;
}

/**
 * Fixes the COPIED flags of the usual L2 entries (no data file, no lines kept) from byte `at` on:
 * unallocated ones, entries without a host offset, and data clusters whose refcount is known
 * without I/O; returns the byte offset of the first other entry (compressed, misaligned, refcount
 * unknown or unreadable), or the table's end. A loop of its own, out of the async walk, so that V8
 * optimizes this small loop alone (see ops/tree-references.ts).
 */
function repairPlainEntries(view: DataView, at: number, walk: PlainRepair): number {
  const { source, blocks, perBlock, refcountBits, planned, clusterSize, step } = walk;
  const wide16 = refcountBits === 16;
  const end = view.byteLength;
  // Locals during the loop (see check.ts countPlainEntries), added to `walk` on the way out.
  let dirty = false;
  let fixed = 0;
  for (; at < end; at += step) {
    const high = view.getUint32(at);
    const low = view.getUint32(at + 4);
    if (high === 0 && low === 0) continue;
    if ((high & QCOW_OFLAG_COMPRESSED_HIGH) !== 0) break;
    // The host offset (entryOffset, written out: one function less for V8 to optimize apart).
    const hostOffset = (high & 0x00ff_ffff) * TWO_POW_32 + ((low & 0xffff_fe00) >>> 0);
    if (hostOffset === 0) continue;
    if (hostOffset % clusterSize !== 0) break;
    const clusterIndex = hostOffset / clusterSize;
    let refcount: number;
    if (blocks !== undefined) {
      // What StoredRefcounts.peek decodes, read here; a block not in memory: the general path.
      const blockIndex = Math.floor(clusterIndex / perBlock);
      const block = blocks[blockIndex];
      if (block === undefined) break;
      const index = clusterIndex - blockIndex * perBlock;
      refcount = wide16
        ? (block[index * 2]! << 8) | block[index * 2 + 1]!
        : decodeRefcount(block, index, refcountBits);
    } else if (planned !== undefined) {
      refcount = planned[clusterIndex] ?? 0;
    } else {
      const known = source.peek?.(clusterIndex);
      if (typeof known !== 'number') break;
      refcount = known;
    }
    const want = refcount === 1;
    if (want !== ((high & QCOW_OFLAG_COPIED_HIGH) !== 0)) {
      view.setUint32(at, withCopied(high, want));
      dirty = true;
      fixed++;
    }
  }
  if (dirty) walk.dirty = true;
  walk.fixed += fixed;
  return at;
}
