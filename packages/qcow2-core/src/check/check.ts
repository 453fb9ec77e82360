/**
 * The read-only consistency check of a qcow2 image, counted as `qemu-img check` counts.
 *
 * 1. Rebuild the reference counts from the metadata: the header cluster, the active L1 table and
 *    its L2 tables and data clusters (compressed ones by their byte range, which may span or share
 *    clusters), every snapshot's L1 and L2 tables, the snapshot table, the refcount table, the
 *    encryption header, the bitmap directory and tables, and the refcount blocks themselves.
 *    Broken entries (reserved bits, misalignment, references a cluster or more past the end of
 *    the file, invalid subcluster bitmaps) are reported on the way; for `check -r all`, a
 *    misaligned preallocated entry is planned for repair instead (preallocated-fixes.ts).
 * 2. Compare with the stored refcounts, cluster by cluster: stored lower is a corruption
 *    ("ERROR cluster N refcount=R reference=r"), stored higher a leak ("Leaked cluster ...").
 * 3. Check the COPIED flag of the active L1 and L2 entries against the stored refcounts.
 *
 * Memory: one counter per host cluster of the file (1, 2 or 4 bytes), one L1 chunk, a few L2
 * tables and refcount blocks. Nothing is sized by an offset read from the file.
 */

import { type BlockDevice, BlockDeviceError, type RequestOptions } from '@qcowkit/blockdev';
import {
  QCOW2_AUTOCLEAR_BITMAPS,
  QCOW2_INCOMPAT_DATA_FILE,
  QCOW2_INCOMPAT_EXTL2,
} from '../format/feature-bits.js';
import { decodeHeader, peekClusterSize, type Qcow2Header } from '../format/header.js';
import { l1EntryReservedBitsSet } from '../format/l1-entry.js';
import { classifyL2Entry, l2EntryReservedBitsSet } from '../format/l2-entry.js';
import { countBitmapReferences } from './bitmaps.js';
import { CheckLog } from './check-log.js';
import { ComputedRefcounts } from './computed-refcounts.js';
import {
  decodeCompressedDescriptor,
  entryHex,
  entryOffset,
  QCOW_OFLAG_COMPRESSED_HIGH,
  QCOW_OFLAG_COPIED_HIGH,
  reftableEntryAligned,
  reftableEntryOffset,
  reftableReservedBitsSet,
} from './entries.js';
import { L2TableReads } from './l2-reads.js';
import { Pacer } from './pacer.js';
import { PreallocatedFixes } from './preallocated-fixes.js';
import { readZeroPadded } from './read-padded.js';
import { repairQcow2Image } from './repair.js';
import { readSnapshotTableForCheck } from './snapshot-table.js';
import { decodeRefcount, type StoredRefcount, StoredRefcounts } from './stored-refcounts.js';
import type { Qcow2CheckOptions, Qcow2CheckResult } from './types.js';

/** What the check needs of an image: its file, and its decoded header when already known. */
export interface Qcow2CheckTarget {
  readonly file: BlockDevice;
  readonly header?: Qcow2Header;
}

/** L1 entries read at a time. */
const L1_CHUNK_ENTRIES = 64 * 1024;
/** QEMU's cap on an L1 table, in entries (32 MiB). */
const QCOW_MAX_L1_ENTRIES = (32 * 1024 * 1024) / 8;
/** QEMU refuses to check a file of more clusters than this. */
const MAX_FILE_CLUSTERS = 0x7fff_ffff;
/** Most memory the rebuilt refcounts may take (one counter per host cluster of the file). */
const MAX_COUNTER_BYTES = 1024 * 1024 * 1024;

/** Fixed facts about the image every step uses. */
export interface Geometry {
  file: BlockDevice;
  clusterSize: number;
  clusterBits: number;
  extendedL2: boolean;
  hasDataFile: boolean;
  /** Bytes of one L2 entry (8, or 16 with extended L2). */
  l2EntryBytes: number;
  request: RequestOptions;
  /** Repair mode `all`: misaligned preallocated entries are planned for repair here (and their
   * references not counted), as `qemu-img check -r all` repairs them while it counts. */
  fixes?: PreallocatedFixes | undefined;
}

/** Fragmentation counters, gathered on the active tables only. */
export interface FragInfo {
  allocated: number;
  fragmented: number;
  compressed: number;
}

/** Reads and decodes the header when the caller did not pass one. */
export async function loadHeader(file: BlockDevice, request: RequestOptions): Promise<Qcow2Header> {
  const head = await readZeroPadded(file, 0, Math.min(file.size, 4096), request);
  if (file.size < 72) {
    throw new BlockDeviceError('ECORRUPT', `qcow2 header: file too short (${file.size} bytes)`, {
      offset: 0,
    });
  }
  const clusterSize = peekClusterSize(head);
  const firstCluster =
    clusterSize <= head.length ? head : await file.read(0, Math.min(file.size, clusterSize), request);
  return decodeHeader(firstCluster);
}

/**
 * Checks a qcow2 image and returns what `qemu-img check` would report. With `repair`, fixes what
 * it found as `qemu-img check -r` does (the file must be writable) and reports the state after.
 */
export async function checkQcow2Image(
  image: Qcow2CheckTarget,
  options: Qcow2CheckOptions = {},
): Promise<Qcow2CheckResult> {
  if (options.repair !== undefined) return repairQcow2Image(image, options.repair, options);
  return (await inspectQcow2Image(image, options)).result;
}

/** What a read-only check found, with the rebuilt and the stored refcounts (for repair). */
export interface Qcow2Inspection {
  result: Qcow2CheckResult;
  header: Qcow2Header;
  computed: ComputedRefcounts;
  stored: StoredRefcounts;
  /** The snapshots' L1 tables and the bytes the snapshot table spans. */
  snapshotTable: { snapshots: readonly { l1TableOffset: number; l1Size: number }[]; size: number };
  /** With `fixPreallocated`: the entries planned for repair (`result` and `computed` leave them
   * out; written by {@link PreallocatedFixes.write}). */
  fixes?: PreallocatedFixes | undefined;
}

/** The read-only check, keeping what it rebuilt. */
export async function inspectQcow2Image(
  image: Qcow2CheckTarget,
  options: Omit<Qcow2CheckOptions, 'repair'> & {
    /** Refcount blocks read at once up to this many bytes (StoredRefcounts.load's default). */
    preloadMaxBytes?: number;
    /** Plan the repair of misaligned preallocated L2 entries (repair mode `all`; nothing is
     * written here): they are reported as being repaired and their references are not counted. */
    fixPreallocated?: boolean;
  } = {},
): Promise<Qcow2Inspection> {
  const request: RequestOptions = options.signal === undefined ? {} : { signal: options.signal };
  options.signal?.throwIfAborted();
  const { file } = image;
  const header = image.header ?? (await loadHeader(file, request));
  const clusterSize = header.clusterSize;
  const clusterBits = header.clusterBits;
  const refcountBits = 2 ** header.refcountOrder;
  const extendedL2 = (header.incompatibleFeatures.low & QCOW2_INCOMPAT_EXTL2) !== 0;
  const geometry: Geometry = {
    file,
    clusterSize,
    clusterBits,
    extendedL2,
    hasDataFile: (header.incompatibleFeatures.low & QCOW2_INCOMPAT_DATA_FILE) !== 0,
    l2EntryBytes: extendedL2 ? 16 : 8,
    request,
  };

  const fileSize = file.size;
  const nbClusters = Math.ceil(fileSize / clusterSize);
  if (nbClusters > MAX_FILE_CLUSTERS) {
    throw new BlockDeviceError(
      'EUNSUPPORTED',
      `qcow2 check: file of ${nbClusters} clusters is too large to check`,
    );
  }
  const counterBytes = (nbClusters + 1) * (refcountBits <= 8 ? 1 : refcountBits <= 16 ? 2 : 4);
  if (counterBytes > MAX_COUNTER_BYTES) {
    throw new BlockDeviceError(
      'EUNSUPPORTED',
      `qcow2 check: a file of ${nbClusters} clusters needs ${counterBytes} bytes of refcounts, more than ${MAX_COUNTER_BYTES}`,
    );
  }
  const log = new CheckLog();
  const totalClusters = Math.ceil((Math.ceil(header.size / 512) * 512) / clusterSize);

  const snapshotTable =
    header.nbSnapshots === 0
      ? { snapshots: [], size: 0 }
      : await readSnapshotTableForCheck(file, header.snapshotsOffset, header.nbSnapshots, request);
  const snapshotL1Entries = snapshotTable.snapshots.reduce(
    (sum, s) => sum + Math.min(s.l1Size, QCOW_MAX_L1_ENTRIES),
    0,
  );
  const pacer = new Pacer(header.l1Size + snapshotL1Entries + nbClusters, options.signal, options.onProgress);

  const refcounts = new ComputedRefcounts(fileSize, clusterSize, refcountBits, log);
  const frag: FragInfo = { allocated: 0, fragmented: 0, compressed: 0 };

  // v3 snapshot entries carry at least vm_state_size_large and disk_size (16 bytes of extra data).
  if (header.version === 3) {
    snapshotTable.snapshots.forEach((snapshot, index) => {
      if (snapshot.extraDataSize < 16)
        log.corruption(() => `ERROR snapshot table entry ${index} is incomplete`);
    });
  }

  const stored = await StoredRefcounts.load(file, {
    clusterSize,
    refcountBits,
    refcountTableOffset: header.refcountTableOffset,
    refcountTableClusters: header.refcountTableClusters,
    request,
    ...(options.preloadMaxBytes === undefined ? {} : { preloadMaxBytes: options.preloadMaxBytes }),
  });

  if (options.fixPreallocated === true) {
    geometry.fixes = planPreallocatedFixes(header, snapshotTable.snapshots, snapshotTable.size, stored);
  }

  // 1. References. Header cluster (with the extension area) first. The active tables' COPIED
  // flags are checked in the same pass (their lines are printed after the comparison's).
  refcounts.add(0, clusterSize);
  await countL1References(
    geometry,
    header.l1TableOffset,
    header.l1Size,
    { frag, stored },
    refcounts,
    log,
    pacer,
  );
  if (geometry.hasDataFile && header.nbSnapshots > 0) {
    log.corruption(() => `ERROR ${header.nbSnapshots} snapshots in image with data file`);
  }
  for (const snapshot of snapshotTable.snapshots) {
    if (snapshot.l1TableOffsetLow % clusterSize !== 0) {
      log.corruption(
        () =>
          `ERROR snapshot ${snapshot.id} (${snapshot.name}) l1_offset=${snapshot.l1TableOffset === 0 ? '0' : `0x${snapshot.l1TableOffsetHex}`}: ` +
          'L1 table is not cluster aligned; snapshot table entry corrupted',
      );
      continue;
    }
    if (snapshot.l1Size > QCOW_MAX_L1_ENTRIES) {
      log.corruption(
        () =>
          `ERROR snapshot ${snapshot.id} (${snapshot.name}) l1_size=${hashHex(snapshot.l1Size)}: ` +
          'L1 table is too large; snapshot table entry corrupted',
      );
      continue;
    }
    await countL1References(
      geometry,
      snapshot.l1TableOffset,
      snapshot.l1Size,
      undefined,
      refcounts,
      log,
      pacer,
      snapshot.l1TableOffsetHex,
    );
  }
  refcounts.add(header.snapshotsOffset, snapshotTable.size);
  refcounts.add(header.refcountTableOffset, header.refcountTableClusters * clusterSize);
  const crypto = header.extensions.cryptoHeader;
  if (crypto !== undefined && crypto.length > 0) refcounts.add(crypto.offset, crypto.length);
  const bitmaps = header.extensions.bitmaps;
  if (bitmaps !== undefined && (header.autoclearFeatures.low & QCOW2_AUTOCLEAR_BITMAPS) !== 0) {
    await countBitmapReferences(file, bitmaps, clusterSize, refcounts, log, request);
  }

  countRefcountBlocks(stored, clusterSize, refcounts, log);

  // 2. Compare.
  const highestCluster = await compareRefcounts(stored, refcounts, log, pacer, request);

  // 3. COPIED flags of the active tables, found in step 1.
  log.flushDeferred();

  pacer.finish();
  const result: Qcow2CheckResult = {
    totalClusters,
    allocatedClusters: frag.allocated,
    fragmentedClusters: frag.fragmented,
    compressedClusters: frag.compressed,
    imageEndOffset: (highestCluster + 1) * clusterSize,
    corruptions: log.corruptions,
    leaks: log.leaks,
    checkErrors: log.checkErrors,
    corruptionsFixed: 0,
    leaksFixed: 0,
    messages: log.finalMessages(),
  };
  return { result, header, computed: refcounts, stored, snapshotTable, fixes: geometry.fixes };
}

/** The repair of misaligned preallocated entries, with the metadata it must not write into. */
function planPreallocatedFixes(
  header: Qcow2Header,
  snapshots: readonly { l1TableOffset: number; l1Size: number }[],
  snapshotTableSize: number,
  stored: StoredRefcounts,
): PreallocatedFixes {
  const { clusterSize } = header;
  const extendedL2 = (header.incompatibleFeatures.low & QCOW2_INCOMPAT_EXTL2) !== 0;
  const refcountBlockClusters = new Set<number>();
  for (const index of stored.usedTableEntries()) {
    const blockOffset = reftableEntryOffset(stored.tableHigh(index), stored.tableLow(index));
    refcountBlockClusters.add(Math.floor(blockOffset / clusterSize));
    refcountBlockClusters.add(Math.floor((blockOffset + clusterSize - 1) / clusterSize));
  }
  return new PreallocatedFixes({
    clusterSize,
    l2EntryBytes: extendedL2 ? 16 : 8,
    // QEMU writes the zero flag, which a v2 image does not have (QEMU then fails to read the
    // cluster): there, without a backing file, an unallocated entry reads as the zeros meant.
    replacement:
      extendedL2 || (header.version === 2 && header.backingFileName === undefined)
        ? 'unallocated'
        : 'zero-flag',
    metadata: [
      [header.l1TableOffset, header.l1Size * 8],
      [header.refcountTableOffset, header.refcountTableClusters * clusterSize],
      [header.snapshotsOffset, snapshotTableSize],
      ...snapshots.map((snapshot) => [snapshot.l1TableOffset, snapshot.l1Size * 8] as const),
    ],
    refcountBlockClusters,
  });
}

/** QEMU's notice when it first meets a misaligned refcount block. */
function unalignedNotice(offsetHex: string, blockIndex: number): string {
  return (
    `qcow2: Image is corrupt: Refblock offset 0x${offsetHex} unaligned ` +
    `(reftable index: ${hashHex(blockIndex)}); further non-fatal corruption events will be suppressed`
  );
}

/** Gives the (deferred) notice for a refcount unreadable because its block is misaligned. */
function noticeUnaligned(refcount: Exclude<StoredRefcount, number>, log: CheckLog): void {
  const block = refcount.unalignedBlock;
  if (block !== undefined) log.corruptionNotice(() => unalignedNotice(block.offsetHex, block.index), true);
}

/** `%#x` of C: 0x-prefixed hex, except plain 0. */
function hashHex(value: number): string {
  return value === 0 ? '0' : `0x${value.toString(16)}`;
}

/**
 * Counts the references of one L1 table: the table itself, its L2 tables and what they map.
 * `active` is given for the active table only: qemu-img counts fragmentation there alone, and
 * checks COPIED flags there alone. The table is read in chunks; L2 tables are read a few ahead
 * of the one examined, and a table wholly past the end of the file (zeros) is not read at all.
 */
async function countL1References(
  geometry: Geometry,
  l1TableOffset: number,
  l1Size: number,
  active: { frag: FragInfo; stored: StoredRefcounts } | undefined,
  refcounts: ComputedRefcounts,
  log: CheckLog,
  pacer: Pacer,
  l1TableOffsetHex?: string,
): Promise<void> {
  if (l1TableOffsetHex !== undefined && refcounts.pastEnd(l1TableOffset, l1Size * 8)) {
    refcounts.reportPastEnd(l1TableOffsetHex, l1Size * 8, l1TableOffset);
  } else {
    refcounts.add(l1TableOffset, l1Size * 8);
  }
  const { clusterSize, file, request, hasDataFile } = geometry;
  // The data clusters' COPIED flags are checked in the counting pass itself when every refcount
  // block is in memory (no data file: the refcounts are this file's); otherwise in a pass of
  // their own that may read refcount blocks.
  const resident = active === undefined || hasDataFile ? undefined : active.stored.residentBlocks;
  const copiedInPass = active !== undefined && resident !== undefined ? active.stored : undefined;
  for (let first = 0; first < l1Size; first += L1_CHUNK_ENTRIES) {
    const count = Math.min(L1_CHUNK_ENTRIES, l1Size - first);
    const bytes = await readZeroPadded(file, l1TableOffset + first * 8, count * 8, request);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    // The non-zero entries: their index in the chunk and their L2 table's offset.
    const indexes: number[] = [];
    const l2Offsets: number[] = [];
    for (let i = 0; i < count; i++) {
      const high = view.getUint32(i * 8);
      const low = view.getUint32(i * 8 + 4);
      if (high !== 0 || low !== 0) {
        indexes.push(i);
        l2Offsets.push(entryOffset(high, low));
      }
    }
    const reads = new L2TableReads(file, clusterSize, l2Offsets, request);
    for (let k = 0; k < indexes.length; k++) {
      const i = indexes[k]!;
      const high = view.getUint32(i * 8);
      const low = view.getUint32(i * 8 + 4);
      const l2Offset = l2Offsets[k]!;
      if (l1EntryReservedBitsSet(high, low)) {
        log.corruption(() => `ERROR found L1 entry with reserved bits set: ${entryHex(high, low)}`);
      }
      // Like QEMU, a non-zero entry is followed even when its offset bits are zero (it then
      // names the header cluster as its L2 table, which the checks below report).
      refcounts.add(l2Offset, clusterSize);
      if (l2Offset % clusterSize !== 0) {
        log.corruption(
          () => `ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`,
        );
      }
      const table = await reads.table(k);
      if (geometry.fixes !== undefined && table !== undefined) {
        geometry.fixes.applyTo(table, l2Offset);
        geometry.fixes.beginTable(l2Offset, active !== undefined);
      }
      // The L2 table's own COPIED flag; its entries' flags are examined only when its refcount
      // could be read (as in QEMU).
      const checkEntries =
        active !== undefined &&
        l2Offset !== 0 &&
        (await checkL2TableCopied(geometry, first + i, high, low, l2Offset, active.stored, log));
      if (table !== undefined) {
        countL2References(
          geometry,
          table,
          active?.frag,
          refcounts,
          log,
          checkEntries ? copiedInPass : undefined,
        );
        if (checkEntries && copiedInPass === undefined) {
          await checkCopiedData(geometry, table, active!.stored, log);
        }
      }
      reads.release(k);
      if ((k & 255) === 255 && pacer.advance(0)) await pacer.pause();
    }
    if (pacer.advance(count)) await pacer.pause();
  }
}

/** High-half bits of a standard L2 entry that need a closer look: compressed (62), reserved (56-61). */
const PLAIN_HIGH_MASK = 0x7f00_0000;
/** Low-half bits that need a closer look: the zero flag (0) and reserved bits (1-8). */
const PLAIN_LOW_MASK = 0x1ff;

/**
 * Counts the references of one L2 table's entries and checks each entry. With `copied` (the
 * active table, every refcount block in memory, no data file), also checks each data cluster's
 * COPIED flag against its stored refcount, in the same pass.
 */
export function countL2References(
  geometry: Geometry,
  table: Uint8Array,
  frag: FragInfo | undefined,
  refcounts: ComputedRefcounts,
  log: CheckLog,
  copied: StoredRefcounts | undefined,
): void {
  const { clusterSize, clusterBits, extendedL2, hasDataFile, l2EntryBytes } = geometry;
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const entries = clusterSize / l2EntryBytes;
  // Standard entries without a data file that need no report are counted by the kernel
  // (countPlainEntries: most entries of most images); every other one here, the general way.
  const plain = !extendedL2 && !hasDataFile;
  const scan: PlainScan | undefined = plain
    ? {
        counts: refcounts.array,
        countable: refcounts.fileClusters,
        maxCount: refcounts.maxCount,
        clusterBits,
        clusterSize,
        blocks: copied?.residentBlocks,
        perBlock: copied?.entriesPerBlock ?? 1,
        refcountBits: copied?.refcountBits ?? 16,
        frag: frag !== undefined,
        allocated: 0,
        fragmented: 0,
        nextContiguousOffset: 0,
      }
    : undefined;
  let nextContiguousOffset = 0;
  let i = scan === undefined ? 0 : countPlainEntries(view, 0, scan);
  while (i < entries) {
    if (scan !== undefined) nextContiguousOffset = scan.nextContiguousOffset;
    const at = i * l2EntryBytes;
    nextContiguousOffset = countL2Entry(geometry, view, i, frag, nextContiguousOffset, refcounts, log);
    // Read after counting: a repair (geometry.fixes) may have replaced the entry.
    const high = view.getUint32(at);
    const low = view.getUint32(at + 4);
    if (copied !== undefined && (high & QCOW_OFLAG_COMPRESSED_HIGH) === 0) {
      // Not compressed, with a host offset: 'normal' or 'zero-alloc' (a data cluster).
      const hostOffset = entryOffset(high, low);
      if (hostOffset !== 0) checkDataCopied(copied, Math.floor(hostOffset / clusterSize), high, low, log);
    }
    i++;
    if (scan !== undefined) {
      scan.nextContiguousOffset = nextContiguousOffset;
      i = countPlainEntries(view, i, scan);
    }
  }
  if (frag !== undefined && scan !== undefined) {
    frag.allocated += scan.allocated;
    frag.fragmented += scan.fragmented;
  }
}

/** What {@link countPlainEntries} needs of a count, and what it counted. */
interface PlainScan {
  readonly counts: Uint8Array | Uint16Array | Uint32Array;
  /** Counters a loop may bump itself (see ComputedRefcounts.fileClusters). */
  readonly countable: number;
  readonly maxCount: number;
  readonly clusterBits: number;
  readonly clusterSize: number;
  /** The stored refcount blocks, for COPIED (the active tables, every block in memory). */
  readonly blocks: readonly (Uint8Array | undefined)[] | undefined;
  readonly perBlock: number;
  readonly refcountBits: number;
  /** Fragmentation counted (the active tables). */
  readonly frag: boolean;
  allocated: number;
  fragmented: number;
  nextContiguousOffset: number;
}

/**
 * Counts the references of the usual standard L2 entries (no data file) from entry `i` on:
 * unallocated ones, and normal clusters (neither compressed nor zero nor reserved bits, aligned)
 * below the counters' maximum whose COPIED flag agrees with their stored refcount when `blocks`
 * are given; returns the index of the first other entry (for the general path), or the table's end.
 *
 * In int32 arithmetic: the cluster index is `high`'s offset bits shifted up, or'ed with `low`'s
 * cluster bits, which stays below 2^31 while the offset's high bits are below 2^(clusterBits - 1)
 * (every cluster of a file that can be checked; an entry past that is past the end of the file: the
 * general path). A small loop of its own, without calls or closures: V8 optimizes it alone and
 * quickly (a check of a 1 GiB image with 64 KiB clusters walks only 16 384 entries, and optimizing
 * a larger function around them cost more CPU than walking them; see ops/tree-references.ts).
 */
function countPlainEntries(view: DataView, i: number, scan: PlainScan): number {
  const { counts, countable, maxCount, clusterBits, clusterSize, blocks, perBlock, refcountBits } = scan;
  const entries = view.byteLength / 8;
  const clusterMask = clusterSize - 1;
  const highShift = 32 - clusterBits;
  const intHigh = 2 ** (clusterBits - 1);
  const perBlockBits = Math.log2(perBlock);
  const wide16 = refcountBits === 16;
  const frag = scan.frag;
  let { allocated, fragmented, nextContiguousOffset: next } = scan;
  for (; i < entries; i++) {
    const high = view.getUint32(i * 8);
    const low = view.getUint32(i * 8 + 4);
    if (high === 0 && low === 0) continue;
    const offsetHigh = high & 0x00ff_ffff;
    if (
      (high & PLAIN_HIGH_MASK) !== 0 ||
      (low & (PLAIN_LOW_MASK | clusterMask)) !== 0 ||
      offsetHigh >= intHigh
    ) {
      break;
    }
    // Unallocated (offset 0, COPIED alone): nothing to count.
    if (offsetHigh === 0 && low === 0) continue;
    const clusterIndex = (offsetHigh << highShift) | (low >>> clusterBits);
    if (clusterIndex >= countable) break;
    const count = counts[clusterIndex]!;
    if (count >= maxCount) break;
    if (blocks !== undefined) {
      const block = blocks[clusterIndex >> perBlockBits];
      if (block === undefined) break;
      const index = clusterIndex & (perBlock - 1);
      const refcount = wide16
        ? (block[index * 2]! << 8) | block[index * 2 + 1]!
        : decodeRefcount(block, index, refcountBits);
      if ((refcount === 1) !== high >= QCOW_OFLAG_COPIED_HIGH) break;
    }
    if (frag) {
      allocated++;
      const hostOffset = clusterIndex * clusterSize;
      if (next !== 0 && hostOffset !== next) fragmented++;
      next = hostOffset + clusterSize;
    }
    counts[clusterIndex] = count + 1;
  }
  // In locals during the loop, which runs mostly unoptimized in a short process (a property of
  // `scan` costs the interpreter a lookup per access); stored back once here.
  scan.allocated = allocated;
  scan.fragmented = fragmented;
  scan.nextContiguousOffset = next;
  return i;
}

/**
 * Counts and checks entry `i` of an L2 table, the general way (every entry the fast path of
 * {@link countL2References} leaves: compressed, zero, extended, misaligned, with reserved bits or a
 * data file); returns the next contiguous host offset for the fragmentation count. Kept out of
 * the loop: its message closures would otherwise cost every iteration a context.
 */
export function countL2Entry(
  geometry: Geometry,
  view: DataView,
  i: number,
  frag: FragInfo | undefined,
  nextContiguousOffset: number,
  refcounts: ComputedRefcounts,
  log: CheckLog,
): number {
  const { clusterSize, clusterBits, extendedL2, hasDataFile, l2EntryBytes } = geometry;
  const at = i * l2EntryBytes;
  const high = view.getUint32(at);
  const low = view.getUint32(at + 4);
  // Extended L2: bits 0-31 of the second word say "allocated", bits 32-63 "reads as zero".
  const zeroBits = extendedL2 ? view.getUint32(at + 8) : 0;
  const allocBits = extendedL2 ? view.getUint32(at + 12) : 0;
  if (high === 0 && low === 0 && zeroBits === 0 && allocBits === 0) return nextContiguousOffset;
  const type = classifyL2Entry(high, low, hasDataFile, extendedL2);
  // As QEMU's check: the standard entry's reserved mask, with or without extended L2.
  if (type !== 'compressed' && l2EntryReservedBitsSet(high, low, false)) {
    log.corruption(() => `ERROR found l2 entry with reserved bits set: ${entryHex(high, low)}`);
  }
  switch (type) {
    case 'compressed': {
      if ((high & QCOW_OFLAG_COPIED_HIGH) !== 0) {
        const extent = decodeCompressedDescriptor(high, low, clusterBits);
        log.corruption(
          () =>
            `ERROR: coffset=0x${extent.hostOffsetHex()}: copied flag must never be set for compressed clusters`,
        );
      }
      // QEMU clears COPIED from the entry once reported, so later lines show it without.
      const shownHigh = high & ~QCOW_OFLAG_COPIED_HIGH;
      if (hasDataFile) {
        log.corruption(
          () => `ERROR compressed cluster ${i} with data file, entry=0x${entryHex(shownHigh, low)}`,
        );
        break;
      }
      if (zeroBits !== 0 || allocBits !== 0) {
        log.corruption(
          () =>
            `ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${entryHex(shownHigh, low)}`,
        );
        break;
      }
      const extent = decodeCompressedDescriptor(high & ~QCOW_OFLAG_COPIED_HIGH, low, clusterBits);
      if (refcounts.pastEnd(extent.hostOffset, extent.length)) {
        refcounts.reportPastEnd(extent.hostOffsetHex, extent.length, extent.hostOffset);
      } else {
        refcounts.add(extent.hostOffset, extent.length);
      }
      if (frag !== undefined) {
        // Compressed clusters count as fragmented: neighbours share sectors, not clusters.
        frag.allocated++;
        frag.compressed++;
        frag.fragmented++;
      }
      break;
    }
    case 'zero-alloc':
    case 'normal': {
      const hostOffset = entryOffset(high, low);
      if ((zeroBits & allocBits) !== 0) {
        log.corruption(
          () =>
            `ERROR offset=${hostOffset.toString(16)}: Allocated cluster has corrupted subcluster allocation bitmap`,
        );
      }
      if (hostOffset % clusterSize !== 0) {
        const containsData = extendedL2 ? allocBits !== 0 : type === 'normal';
        if (!containsData && geometry.fixes?.plan(view, i) === true) {
          // Repaired (see preallocated-fixes.ts): it names no cluster any more.
          log.message(
            () =>
              `Repairing offset=${hostOffset.toString(16)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
          );
          return nextContiguousOffset;
        }
        log.corruption(
          containsData
            ? `ERROR offset=${hostOffset.toString(16)}: Data cluster is not properly aligned; L2 entry corrupted.`
            : `ERROR offset=${hostOffset.toString(16)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
        );
      }
      if (frag !== undefined) {
        frag.allocated++;
        if (nextContiguousOffset !== 0 && hostOffset !== nextContiguousOffset) frag.fragmented++;
        nextContiguousOffset = hostOffset + clusterSize;
      }
      if (!hasDataFile) refcounts.add(hostOffset, clusterSize);
      break;
    }
    case 'zero-plain':
      break;
    case 'unallocated':
      if (allocBits !== 0) {
        log.corruption('ERROR: Unallocated cluster has non-zero subcluster allocation map');
      }
      break;
  }
  return nextContiguousOffset;
}

/** Counts each refcount block once and checks the refcount table's entries. */
function countRefcountBlocks(
  stored: StoredRefcounts,
  clusterSize: number,
  refcounts: ComputedRefcounts,
  log: CheckLog,
): void {
  for (const index of stored.usedTableEntries()) {
    const high = stored.tableHigh(index);
    const low = stored.tableLow(index);
    if (reftableReservedBitsSet(low)) {
      log.corruption(() => `ERROR refcount table entry ${index} has reserved bits set`);
      continue;
    }
    const hostOffset = reftableEntryOffset(high, low);
    if (!reftableEntryAligned(low, clusterSize)) {
      log.corruption(
        () => `ERROR refcount block ${index} is not cluster aligned; refcount table entry corrupted`,
      );
      continue;
    }
    const clusterIndex = Math.floor(hostOffset / clusterSize);
    if (clusterIndex >= refcounts.used) {
      log.corruption(() => `ERROR refcount block ${index} is outside image`);
      continue;
    }
    if (hostOffset === 0) continue;
    refcounts.add(hostOffset, clusterSize);
    const count = refcounts.get(clusterIndex);
    if (count !== 1) log.corruption(() => `ERROR refcount block ${index} refcount=${count}`);
  }
}

/** Compares stored and computed refcounts; returns the highest cluster either says is in use. */
async function compareRefcounts(
  stored: StoredRefcounts,
  refcounts: ComputedRefcounts,
  log: CheckLog,
  pacer: Pacer,
  request: RequestOptions,
): Promise<number> {
  let highestCluster = 0;
  const end = refcounts.used;
  const perBlock = stored.entriesPerBlock;
  for (let start = 0; start < end; ) {
    const blockIndex = Math.floor(start / perBlock);
    const blockEnd = Math.min(end, (blockIndex + 1) * perBlock);
    const block = await stored.block(blockIndex, request);
    if (block instanceof Uint8Array) {
      // The usual case, in one tight loop: only differences leave it.
      const highest = compareBlock(
        stored,
        block,
        blockIndex * perBlock,
        start,
        blockEnd,
        refcounts.array,
        log,
      );
      if (highest >= 0) highestCluster = highest;
      await pacer.step(blockEnd - start);
      start = blockEnd;
      continue;
    }
    for (let clusterIndex = start; clusterIndex < blockEnd; clusterIndex++) {
      const reference = refcounts.get(clusterIndex);
      let refcount: number;
      if (typeof block === 'string') {
        if (block === 'unaligned') {
          const { high, low } = stored.tableEntry(blockIndex);
          log.corruptionNotice(() => unalignedNotice(entryHex(high, low & 0xffff_fe00), blockIndex), false);
        }
        log.checkError(() => `Can't get refcount for cluster ${clusterIndex}: Input/output error`);
        continue;
      }
      if (block === undefined) {
        if (reference === 0) continue;
        refcount = 0;
      } else {
        refcount = stored.decode(block, clusterIndex - blockIndex * perBlock);
      }
      if (refcount > 0 || reference > 0) highestCluster = clusterIndex;
      if (refcount === reference) continue;
      reportMismatch(stored, log, clusterIndex, refcount, reference);
    }
    await pacer.step(blockEnd - start);
    start = blockEnd;
  }
  return highestCluster;
}

/**
 * Compares clusters `[start, end)` whose refcounts are in `block` (entry 0 is cluster `base`) with
 * the counted references; returns the highest cluster in use there, or -1.
 */
function compareBlock(
  stored: StoredRefcounts,
  block: Uint8Array,
  base: number,
  start: number,
  end: number,
  counts: Uint8Array | Uint16Array | Uint32Array,
  log: CheckLog,
): number {
  let highestCluster = -1;
  const wide16 = stored.refcountBits === 16;
  for (let clusterIndex = start; clusterIndex < end; clusterIndex++) {
    const reference = counts[clusterIndex]!;
    const index = clusterIndex - base;
    const refcount = wide16 ? (block[index * 2]! << 8) | block[index * 2 + 1]! : stored.decode(block, index);
    if (refcount === reference) {
      if (refcount > 0) highestCluster = clusterIndex;
      continue;
    }
    highestCluster = clusterIndex;
    reportMismatch(stored, log, clusterIndex, refcount, reference);
  }
  return highestCluster;
}

/** Logs a stored refcount that differs from the counted references: too low is corruption, too high a leak. */
function reportMismatch(
  stored: StoredRefcounts,
  log: CheckLog,
  clusterIndex: number,
  refcount: number,
  reference: number,
): void {
  if (refcount < reference) {
    log.corruption(
      () =>
        `ERROR cluster ${clusterIndex} refcount=${stored.exactText(clusterIndex, refcount)} reference=${reference}`,
    );
  } else {
    log.leak(
      () =>
        `Leaked cluster ${clusterIndex} refcount=${stored.exactText(clusterIndex, refcount)} reference=${reference}`,
    );
  }
}

/**
 * Checks that COPIED is set on an active L1 entry exactly when its L2 table's stored refcount is
 * 1; returns whether that refcount could be read (when not, QEMU does not examine the table's
 * entries either).
 */
async function checkL2TableCopied(
  geometry: Geometry,
  l1Index: number,
  high: number,
  low: number,
  l2Offset: number,
  stored: StoredRefcounts,
  log: CheckLog,
): Promise<boolean> {
  const l2Cluster = Math.floor(l2Offset / geometry.clusterSize);
  const l2Refcount = stored.peek(l2Cluster) ?? (await stored.get(l2Cluster, geometry.request));
  if (typeof l2Refcount !== 'number') {
    noticeUnaligned(l2Refcount, log);
    return false;
  }
  if ((l2Refcount === 1) !== ((high & QCOW_OFLAG_COPIED_HIGH) !== 0)) {
    log.deferredCorruption(
      () =>
        `ERROR OFLAG_COPIED L2 cluster: l1_index=${l1Index} l1_entry=${entryHex(high, low)} refcount=${stored.exactText(l2Cluster, l2Refcount)}`,
    );
  }
  return true;
}

/**
 * The COPIED flags of one active L2 table's data clusters, in a pass of its own: for images whose
 * refcount blocks are read on demand, and for images with a data file (whose data clusters count
 * as referenced once). Clusters whose refcount cannot be read are skipped, as in QEMU.
 */
async function checkCopiedData(
  geometry: Geometry,
  table: Uint8Array,
  stored: StoredRefcounts,
  log: CheckLog,
): Promise<void> {
  const { clusterSize, extendedL2, hasDataFile, l2EntryBytes, request } = geometry;
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const entries = clusterSize / l2EntryBytes;
  for (let i = 0; i < entries; i++) {
    const entryHigh = view.getUint32(i * l2EntryBytes);
    const entryLow = view.getUint32(i * l2EntryBytes + 4);
    if (entryHigh === 0 && entryLow === 0) continue;
    if (hasDataFile) {
      const type = classifyL2Entry(entryHigh, entryLow, hasDataFile, extendedL2);
      if (type !== 'normal' && type !== 'zero-alloc') continue;
    } else if ((entryHigh & QCOW_OFLAG_COMPRESSED_HIGH) !== 0) {
      continue;
    }
    // Without a data file, an entry is 'normal' or 'zero-alloc' exactly when it is not
    // compressed and has a host offset (what classifyL2Entry says, without the classification).
    const hostOffset = entryOffset(entryHigh, entryLow);
    if (hostOffset === 0 && !hasDataFile) continue;
    const dataCluster = Math.floor(hostOffset / clusterSize);
    const refcount = hasDataFile ? 1 : (stored.peek(dataCluster) ?? (await stored.get(dataCluster, request)));
    if (typeof refcount !== 'number') {
      noticeUnaligned(refcount, log);
      continue;
    }
    if ((refcount === 1) !== ((entryHigh & QCOW_OFLAG_COPIED_HIGH) !== 0)) {
      log.deferredCorruption(
        () =>
          `ERROR OFLAG_COPIED data cluster: l2_entry=${entryHex(entryHigh, entryLow)} refcount=${hasDataFile ? '1' : stored.exactText(dataCluster, refcount)}`,
      );
    }
  }
}

/**
 * Checks one data cluster's COPIED flag (in `high`) against its stored refcount, when every
 * refcount block is in memory; a cluster whose refcount cannot be read is skipped, as in QEMU.
 */
export function checkDataCopied(
  stored: StoredRefcounts,
  clusterIndex: number,
  high: number,
  low: number,
  log: CheckLog,
): void {
  const refcount = stored.peek(clusterIndex);
  if (typeof refcount !== 'number') {
    if (refcount !== undefined) noticeUnaligned(refcount, log);
    return;
  }
  if ((refcount === 1) !== ((high & QCOW_OFLAG_COPIED_HIGH) !== 0)) {
    reportDataCopied(stored, clusterIndex, refcount, high, low, log);
  }
}

/** Reports a data cluster whose COPIED flag disagrees with its stored refcount. */
function reportDataCopied(
  stored: StoredRefcounts,
  clusterIndex: number,
  refcount: number,
  high: number,
  low: number,
  log: CheckLog,
): void {
  log.deferredCorruption(
    () =>
      `ERROR OFLAG_COPIED data cluster: l2_entry=${entryHex(high, low)} refcount=${stored.exactText(clusterIndex, refcount)}`,
  );
}
