/**
 * The allocating write path of a qcow2 image: writes, zeroing and discard over the L1/L2 tables.
 *
 * Metadata is written back, as QEMU's qcow2 driver does: changed L2 slices stay dirty in the L2
 * cache and changed refcounts in the refcount store until {@link WritePath.flush} (or until the
 * dirty slices pass their cap), which writes them in an order that keeps every crash harmless:
 * 1. refcount blocks (and a grown refcount table) are written, then the file is flushed: every
 *    cluster an L2 entry is about to point at is counted on disk, and the data (copied bytes of a
 *    copy-on-write included) is durable;
 * 2. the dirty L2 slices are written and the file is flushed again;
 * 3. clusters that lost their last reference by those L2 changes are freed only now (in memory;
 *    they reach the disk with the next refcount write-back), so a freed cluster is never reused
 *    while a table on disk still points at it.
 * A new L2 table is written and flushed before its L1 entry (eagerly: rare). A newly allocated
 * cluster's L2 entry changes in the cache only after its data write has completed, so a reader never
 * sees a mapping to bytes not written yet. Every metadata and data write is first checked against
 * the metadata map (overlap check).
 *
 * The caller serialises calls that change the mapping (one at a time, flush included) and runs
 * in-place writes (see `tryWriteInPlace`) under a shared lock.
 *
 * Speed: a request's data goes out in as few writes as its host layout allows (in-place clusters
 * contiguous on the host merge too: `qcow2 commit` of 256 MiB into a base holding data went from
 * 1895 writes of 64 KiB to 263 of 1 MiB, qemu-img commit's 256), and planning and finishing a
 * request are synchronous passes over cached L2 slices (an await per cluster cost a promise and a
 * microtask each, and made these the write path's costliest functions for TurboFan to compile:
 * #planInTable alone ~52 ms during a 0.5 s run of fresh 1 MiB writes).
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import type { MetadataMap } from '../alloc/metadata-map.js';
import type { RefcountStore } from '../alloc/refcount-store.js';
import type { TableCache } from '../cache/table-cache.js';
import { decodeCompressedDescriptor, encodeCompressedDescriptor } from '../format/compressed-descriptor.js';
import { encodeL1Entry, QCOW_OFLAG_COPIED_HIGH } from '../format/l1-entry.js';
import { classifyL2Entry, encodeL2Entry, l2EntryHostOffset } from '../format/l2-entry.js';
import type { Qcow2Mapper } from './qcow2-mapper.js';

const ALL_SUBCLUSTERS = 0xffffffff;
/** Host writes of one request in flight at once. */
const WRITE_CONCURRENCY = 8;

export interface WritePathOptions {
  readonly file: BlockDevice;
  /**
   * The external data file, when the image has one: data clusters live there at their guest
   * offset (host offset = guest offset), are not refcounted, and every L2 entry pointing there
   * carries COPIED (their refcount is implicitly one).
   */
  readonly dataFile?: BlockDevice | undefined;
  /** The data file is kept a valid raw image (autoclear bit data_file_raw): what the guest reads
   * as zeros reads as zeros there too. */
  readonly dataFileRaw?: boolean;
  readonly clusterBits: number;
  readonly extendedL2: boolean;
  readonly version: 2 | 3;
  /** The image names a backing file (unallocated clusters show it). */
  readonly hasBacking: boolean;
  readonly mapper: Qcow2Mapper;
  readonly cache: TableCache<DataView>;
  readonly sliceBytes: number;
  readonly refcounts: RefcountStore;
  readonly metadata: MetadataMap;
  /** Current L1 table (mutated in place by this class) and its host offset. */
  readonly l1: () => { high: Uint32Array; low: Uint32Array; offset: number };
  /** Guest size. */
  readonly size: () => number;
  /** Reads the current guest view (no lock: the caller holds it). */
  readonly readGuest: (buffer: Uint8Array, guestOffset: number) => Promise<void>;
  /** Forgets a decompressed cluster cached for `hostOffset`. */
  readonly forgetCompressed: (hostOffset: number) => void;
  /** Dirty L2 bytes that trigger a write-back (default: half the cache's budget). */
  readonly maxDirtyBytes?: number;
  /** Host clusters whose refcount drops to 0 are discarded in `file` too (see
   * `Qcow2OpenOptions.discardFreedClusters`). */
  readonly discardFreed?: boolean;
}

/** One L2 entry as read for writing. */
interface EntryRef {
  readonly slice: DataView;
  readonly sliceHostOffset: number;
  readonly at: number;
}

/** An allocating write between its planning and its mapping change (see `beginWrite`). */
export interface WritePlan {
  /** Guest clusters `[firstCluster, endCluster)` of the request, in flight until settled. */
  readonly firstCluster: number;
  readonly endCluster: number;
  /** Data writes (host offset, bytes). */
  readonly pieces: { hostOffset: number; bytes: Uint8Array }[];
  /** Data file ranges zeroed (fast) before the pieces are written (new clusters reading as zeros). */
  readonly dataZeroes: { hostOffset: number; length: number }[];
  readonly tables: PlannedTable[];
  /** Runs of clusters allocated for it. */
  readonly allocated: Release[];
  settle: () => void;
}

/** The L2 changes of a planned write in one L2 table. */
interface PlannedTable {
  readonly l1Index: number;
  readonly allocations: { l2Index: number; hostCluster: number; old: Release[] }[];
  readonly subUpdates: { l2Index: number; allocBits: number }[];
}

/** A guest cluster of a write to (re)map; `reuse`: a zero-allocated cluster of its own (COPIED)
 * written in place. */
interface ToAllocate {
  readonly clusterIndex: number;
  readonly old: Release[];
  readonly readsZeros: boolean;
  readonly reuse?: number;
}

/** A copy-on-write buffer of a planned write: `target` gets the guest's bytes at `guestOffset`,
 * then `bytes` (the request's) go into `into` at `at`. */
interface GuestFill {
  readonly target: Uint8Array;
  readonly guestOffset: number;
  readonly into: Uint8Array;
  readonly bytes: Uint8Array;
  readonly at: number;
}

/** A host range freed once the L2 change that dropped it is durable. */
interface Release {
  readonly clusterIndex: number;
  readonly count: number;
}

export class WritePath {
  readonly #o: WritePathOptions;
  readonly #clusterSize: number;
  readonly #entrySize: number;
  readonly #entriesPerSlice: number;
  readonly #bytesPerL1: number;
  readonly #subclusterSize: number;
  readonly #maxDirtyBytes: number;
  readonly #loadSlice: (key: number) => Promise<DataView>;
  /** Where data clusters live: the external data file, else the image file. */
  readonly #data: BlockDevice;
  readonly #hasDataFile: boolean;
  /** The data file grows one resize at a time (see {@link #growDataFile}). */
  #dataGrowth: Promise<void> = Promise.resolve();
  /** Byte allocator for compressed clusters: next free byte in the last compressed cluster. */
  #compressedTail = -1;
  /** Clusters to free once the dirty L2 slices that dropped them are durable. */
  #pendingFrees: Release[] = [];
  /** Guest clusters with an allocating write in flight, and when it settles. */
  readonly #inFlight = new Map<number, Promise<void>>();

  constructor(options: WritePathOptions) {
    this.#o = options;
    this.#clusterSize = 2 ** options.clusterBits;
    this.#entrySize = options.extendedL2 ? 16 : 8;
    this.#entriesPerSlice = options.sliceBytes / this.#entrySize;
    this.#bytesPerL1 = (this.#clusterSize / this.#entrySize) * this.#clusterSize;
    this.#subclusterSize = this.#clusterSize / 32;
    this.#maxDirtyBytes = Math.max(
      options.sliceBytes,
      options.maxDirtyBytes ?? Math.floor(options.cache.maxBytes / 2),
    );
    this.#data = options.dataFile ?? options.file;
    this.#hasDataFile = options.dataFile !== undefined;
    this.#loadSlice = async (key) => {
      const bytes = await this.#o.file.read(key, this.#o.sliceBytes);
      return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    };
  }

  async #entry(l2Offset: number, l2Index: number): Promise<EntryRef> {
    return (
      this.#cachedEntry(l2Offset, l2Index) ??
      this.#refIn(
        l2Offset,
        l2Index,
        await this.#o.cache.get(this.#sliceOffset(l2Offset, l2Index), this.#loadSlice),
      )
    );
  }

  /**
   * The L2 entry when its slice is cached, else undefined: the loops over a request's clusters take
   * this synchronous path first, so a cached slice costs no await (no promise, no microtask) per
   * cluster.
   */
  #cachedEntry(l2Offset: number, l2Index: number): EntryRef | undefined {
    const slice = this.#o.cache.lookup(this.#sliceOffset(l2Offset, l2Index));
    return slice === undefined ? undefined : this.#refIn(l2Offset, l2Index, slice);
  }

  #sliceOffset(l2Offset: number, l2Index: number): number {
    return l2Offset + Math.floor(l2Index / this.#entriesPerSlice) * this.#o.sliceBytes;
  }

  #refIn(l2Offset: number, l2Index: number, slice: DataView): EntryRef {
    const sliceIndex = Math.floor(l2Index / this.#entriesPerSlice);
    return {
      slice,
      sliceHostOffset: l2Offset + sliceIndex * this.#o.sliceBytes,
      at: (l2Index - sliceIndex * this.#entriesPerSlice) * this.#entrySize,
    };
  }

  /** Metadata changes not written yet (dirty L2 slices, refcounts, frees). */
  get pending(): boolean {
    return this.#o.cache.dirtyCount > 0 || this.#o.refcounts.pending || this.#pendingFrees.length > 0;
  }

  /** Host ranges waiting to be freed until the L2 changes that dropped them are durable. */
  get pendingFreeCount(): number {
    return this.#pendingFrees.length;
  }

  /**
   * Writes every metadata change back in the safe order (see the file comment) and leaves data and
   * metadata durable. With `final`, the frees it applies are written and flushed too (a clean image
   * on disk, as on close); otherwise they reach the disk with the next write-back.
   */
  async flush(final = false): Promise<void> {
    const { file, cache, refcounts, metadata } = this.#o;
    await refcounts.commit({ flush: false });
    // Data (in the data file too) durable before any L2 entry pointing at it.
    await (this.#hasDataFile ? Promise.all([file.flush(), this.#data.flush()]) : file.flush());
    const dirty = cache.dirtyEntries();
    if (dirty.length > 0) {
      for (const [hostOffset] of dirty) {
        metadata.check(hostOffset, this.#o.sliceBytes, 'l2-table', 'L2 table write');
      }
      await runBounded(dirty, ([hostOffset, slice]) =>
        file.write(hostOffset, new Uint8Array(slice.buffer, slice.byteOffset, slice.byteLength)),
      );
      await file.flush();
      for (const [hostOffset] of dirty) cache.markClean(hostOffset);
    }
    if (this.#pendingFrees.length > 0) {
      await this.#applyFrees();
      // Decrements may reach the disk in any order now: losing them only leaks.
      await refcounts.writeBack();
    }
    if (final) {
      await refcounts.trimFile();
      await refcounts.commit({ flush: false });
      await file.flush();
    }
  }

  /** Writes back when the dirty L2 slices pass their cap (the cache stays bounded). */
  async #writeBackIfFull(): Promise<void> {
    if (this.#o.cache.dirtyBytes > this.#maxDirtyBytes) await this.flush();
  }

  /** Marks the slice holding `ref` changed (it is written back by {@link flush}). */
  #dirty(ref: EntryRef): void {
    this.#o.cache.markDirty(ref.sliceHostOffset, ref.slice);
  }

  /** Applies the frees whose L2 changes are durable now. */
  async #applyFrees(): Promise<void> {
    const releases = this.#pendingFrees;
    this.#pendingFrees = [];
    const tailCluster = this.#compressedTail >= 0 ? Math.floor(this.#compressedTail / this.#clusterSize) : -1;
    for (const release of releases) {
      await this.#o.refcounts.adjust(release.clusterIndex, release.count, -1);
      // The packing cluster may be freed and reused for other data: pack no more into it.
      if (tailCluster >= release.clusterIndex && tailCluster < release.clusterIndex + release.count) {
        this.#compressedTail = -1;
      }
    }
    if (this.#o.discardFreed === true) await this.#discardFreed(releases);
  }

  /**
   * Discards in the image file the host clusters of `releases` that nothing references any more
   * (a snapshot may still hold some: those stay), in runs. Safe at any time after the L2 changes
   * that dropped them are durable, which {@link flush} ensures before applying frees: a crash
   * before the refcounts reach the disk leaves clusters counted as used that read as zeros, a leak
   * `check -r` repairs, never a mapping onto a discarded cluster.
   */
  async #discardFreed(releases: readonly Release[]): Promise<void> {
    const clusters: number[] = [];
    for (const { clusterIndex, count } of releases) {
      for (let cluster = clusterIndex; cluster < clusterIndex + count; cluster++) {
        if ((await this.#o.refcounts.get(cluster)) === 0) clusters.push(cluster);
      }
    }
    clusters.sort((a, b) => a - b);
    const fileSize = this.#o.file.size;
    let index = 0;
    while (index < clusters.length) {
      const start = clusters[index]!;
      let end = start + 1;
      while (index + 1 < clusters.length && clusters[index + 1]! <= end) {
        end = Math.max(end, clusters[index + 1]! + 1);
        index++;
      }
      index++;
      const offset = start * this.#clusterSize;
      const length = Math.min(end * this.#clusterSize, fileSize) - offset;
      if (length > 0) await this.#o.file.discard(offset, length);
    }
  }

  /** Guest clusters of `[guestOffset, guestOffset + length)` (first index, end index). */
  #clusterSpan(guestOffset: number, length: number): [number, number] {
    return [
      Math.floor(guestOffset / this.#clusterSize),
      Math.ceil((guestOffset + length) / this.#clusterSize),
    ];
  }

  /** Bytes of guest cluster `clusterIndex` inside the image (the last one may be short). */
  #clusterLength(clusterIndex: number): number {
    return Math.min(this.#clusterSize, this.#o.size() - clusterIndex * this.#clusterSize);
  }

  /**
   * Writes `data` when every cluster it touches is allocated here with refcount 1 (COPIED) and,
   * with extended L2, every touched subcluster is allocated: no metadata changes. Returns false
   * (having written nothing) otherwise.
   */
  async tryWriteInPlace(guestOffset: number, data: Uint8Array): Promise<boolean> {
    const end = guestOffset + data.length;
    const l1High = this.#o.mapper.l1.high;
    const cache = this.#o.cache;
    const sliceBytes = this.#o.sliceBytes;
    const clustersPerTable = this.#bytesPerL1 / this.#clusterSize;
    let pieces: { hostOffset: number; bytes: Uint8Array }[] | undefined;
    let single: { hostOffset: number; bytes: Uint8Array } | undefined;
    let position = guestOffset;
    while (position < end) {
      const l1Index = Math.floor(position / this.#bytesPerL1);
      const l2Offset = this.#o.mapper.l2TableOffset(l1Index);
      if (l2Offset === 0 || (l1High[l1Index]! & QCOW_OFLAG_COPIED_HIGH) === 0) return false;
      const clusterIndex = Math.floor(position / this.#clusterSize);
      const l2Index = clusterIndex - l1Index * clustersPerTable;
      const sliceIndex = Math.floor(l2Index / this.#entriesPerSlice);
      const sliceHostOffset = l2Offset + sliceIndex * sliceBytes;
      // A cache hit costs no await.
      const slice = cache.lookup(sliceHostOffset) ?? (await cache.get(sliceHostOffset, this.#loadSlice));
      const at = (l2Index - sliceIndex * this.#entriesPerSlice) * this.#entrySize;
      const entryHigh = slice.getUint32(at);
      const entryLow = slice.getUint32(at + 4);
      if ((entryHigh & QCOW_OFLAG_COPIED_HIGH) === 0) return false;
      if (classifyL2Entry(entryHigh, entryLow, this.#hasDataFile, this.#o.extendedL2) !== 'normal')
        return false;
      const clusterStart = clusterIndex * this.#clusterSize;
      const pieceEnd = Math.min(end, clusterStart + this.#clusterSize);
      if (this.#o.extendedL2) {
        const allocBits = slice.getUint32(at + 12);
        const first = Math.floor((position - clusterStart) / this.#subclusterSize);
        const last = Math.floor((pieceEnd - 1 - clusterStart) / this.#subclusterSize);
        for (let sub = first; sub <= last; sub++) if (((allocBits >>> sub) & 1) === 0) return false;
      }
      const hostOffset = l2EntryHostOffset(entryHigh, entryLow) + (position - clusterStart);
      if (single === undefined) {
        single = { hostOffset, bytes: data.subarray(position - guestOffset, pieceEnd - guestOffset) };
      } else {
        pieces ??= [single];
        const last = pieces[pieces.length - 1]!;
        if (last.hostOffset + last.bytes.length === hostOffset) {
          pieces[pieces.length - 1] = {
            hostOffset: last.hostOffset,
            bytes: data.subarray(last.bytes.byteOffset - data.byteOffset, pieceEnd - guestOffset),
          };
        } else {
          pieces.push({ hostOffset, bytes: data.subarray(position - guestOffset, pieceEnd - guestOffset) });
        }
      }
      position = pieceEnd;
    }
    if (pieces === undefined) {
      if (single === undefined) return true;
      this.#checkData(single.hostOffset, single.bytes.length);
      if (single.hostOffset + single.bytes.length > this.#data.size) {
        await this.#growDataFile(single.hostOffset + single.bytes.length);
      }
      await this.#data.write(single.hostOffset, single.bytes);
      return true;
    }
    await this.#writePieces(pieces);
    return true;
  }

  /** Overlap check of a data write (data in the image file only: the data file holds no metadata). */
  #checkData(hostOffset: number, length: number): void {
    if (!this.#hasDataFile) this.#o.metadata.check(hostOffset, length, undefined, 'data write');
  }

  /** Writes data pieces (checked already) where data clusters live. */
  async #writePieces(pieces: readonly { hostOffset: number; bytes: Uint8Array }[]): Promise<void> {
    let end = 0;
    for (const piece of pieces) end = Math.max(end, piece.hostOffset + piece.bytes.length);
    if (end > this.#data.size) await this.#growDataFile(end);
    await runBounded(pieces, (piece) => this.#data.write(piece.hostOffset, piece.bytes));
  }

  /**
   * Grows the external data file to hold `end` bytes (a data file shorter than the guest: made
   * empty, or the guest grown by another program), as a file grows when QEMU writes past its end.
   * One resize at a time; never shrinks.
   */
  #growDataFile(end: number): Promise<void> {
    const grown = this.#dataGrowth.then(async () => {
      if (this.#data.size < end) await this.#data.resize(end);
    });
    this.#dataGrowth = grown.catch(() => undefined);
    return grown;
  }

  /**
   * Writes `data` at `guestOffset`, allocating and copying on write as needed, all under the
   * caller's exclusive lock. The caller makes sure no allocating write is in flight ({@link idle}).
   */
  async write(guestOffset: number, data: Uint8Array): Promise<void> {
    const plan = await this.beginWrite(guestOffset, data);
    if ('wait' in plan) throw new Error('write path: write while an allocation is in flight');
    try {
      await this.writeData(plan);
    } catch (error) {
      await this.abortWrite(plan);
      throw error;
    }
    await this.finishWrite(plan);
  }

  /**
   * Undefined when no allocating write is in flight; otherwise a promise settled when none is (for
   * changes that need the whole mapping still: zeroing, discard, resize, ...).
   */
  idle(): Promise<void> | undefined {
    if (this.#inFlight.size === 0) return undefined;
    return Promise.all([...new Set(this.#inFlight.values())]).then(() => undefined);
  }

  /**
   * Plans an allocating write (under the exclusive lock): new L2 tables are made, clusters
   * allocated (in memory) and copy-on-write bytes read, and the guest clusters of the request are
   * marked in flight. The data I/O ({@link writeData}) may then run without the lock; the mapping
   * changes in {@link finishWrite} (under the lock again) or are undone by {@link abortWrite}.
   * Returns `{ wait }` instead when a cluster of the request has an allocation in flight: wait for
   * it, then plan again.
   */
  async beginWrite(
    guestOffset: number,
    data: Uint8Array,
  ): Promise<WritePlan | { readonly wait: Promise<void> }> {
    const [firstCluster, endCluster] = this.#clusterSpan(guestOffset, data.length);
    if (this.#inFlight.size > 0) {
      for (let clusterIndex = firstCluster; clusterIndex < endCluster; clusterIndex++) {
        const busy = this.#inFlight.get(clusterIndex);
        if (busy !== undefined) return { wait: busy };
      }
    }
    const plan: WritePlan = {
      firstCluster,
      endCluster,
      pieces: [],
      dataZeroes: [],
      tables: [],
      allocated: [],
      settle: () => {},
    };
    const end = guestOffset + data.length;
    let position = guestOffset;
    try {
      while (position < end) {
        const l1Index = Math.floor(position / this.#bytesPerL1);
        const tableEnd = Math.min(end, (l1Index + 1) * this.#bytesPerL1);
        await this.#planInTable(
          plan,
          l1Index,
          position,
          data.subarray(position - guestOffset, tableEnd - guestOffset),
        );
        position = tableEnd;
      }
      for (const piece of plan.pieces) this.#checkData(piece.hostOffset, piece.bytes.length);
    } catch (error) {
      for (const run of plan.allocated) await this.#o.refcounts.adjust(run.clusterIndex, run.count, -1);
      throw error;
    }
    const settled = new Promise<void>((resolve) => {
      plan.settle = resolve;
    });
    for (let clusterIndex = firstCluster; clusterIndex < endCluster; clusterIndex++) {
      this.#inFlight.set(clusterIndex, settled);
    }
    return plan;
  }

  /** The data writes of a planned write (no lock needed: nothing points at new clusters yet). */
  async writeData(plan: WritePlan): Promise<void> {
    // Copied bytes need no flush of their own: the write-back flushes before any L2 entry
    // pointing at them reaches the disk.
    if (plan.dataZeroes.length > 0) {
      await runBounded(plan.dataZeroes, async ({ hostOffset, length }) => {
        // Past the data file's end it reads as zeros once grown.
        const stop = Math.min(hostOffset + length, this.#data.size);
        if (stop > hostOffset)
          await this.#data.writeZeroes(hostOffset, stop - hostOffset, { mayUnmap: true });
      });
    }
    await this.#writePieces(plan.pieces);
  }

  /**
   * Points the L2 entries at the written clusters (under the exclusive lock). The entries change
   * synchronously while their slices are cached ({@link #applyAllocations}); a missing slice is
   * loaded and the change goes on from there (a changed slice is dirty, so never evicted).
   */
  async finishWrite(plan: WritePlan): Promise<void> {
    try {
      for (const table of plan.tables) {
        const l2Offset = this.#o.mapper.l2TableOffset(table.l1Index);
        let done = this.#applyAllocations(table, l2Offset, 0);
        while (done < table.allocations.length) {
          await this.#entry(l2Offset, table.allocations[done]!.l2Index);
          done = this.#applyAllocations(table, l2Offset, done);
        }
        for (const { l2Index, allocBits } of table.subUpdates) {
          const ref = await this.#entry(l2Offset, l2Index);
          const zeroBits = ref.slice.getUint32(ref.at + 8);
          ref.slice.setUint32(ref.at + 8, (zeroBits & ~allocBits) >>> 0);
          ref.slice.setUint32(ref.at + 12, allocBits);
          this.#dirty(ref);
        }
      }
    } finally {
      this.#settle(plan);
    }
    await this.#writeBackIfFull();
  }

  /** Applies `table`'s allocations from index `from` while their slices are cached; returns the
   * index of the first one not applied (its slice is not cached), or their count. */
  #applyAllocations(table: PlannedTable, l2Offset: number, from: number): number {
    const allocations = table.allocations;
    for (let index = from; index < allocations.length; index++) {
      const item = allocations[index]!;
      const ref = this.#cachedEntry(l2Offset, item.l2Index);
      if (ref === undefined) return index;
      const { high, low } = encodeL2Entry({ type: 'normal', hostOffset: item.hostCluster, copied: true });
      ref.slice.setUint32(ref.at, high);
      ref.slice.setUint32(ref.at + 4, low);
      if (this.#o.extendedL2) {
        ref.slice.setUint32(ref.at + 8, 0);
        ref.slice.setUint32(ref.at + 12, ALL_SUBCLUSTERS);
      }
      this.#dirty(ref);
      if (item.old.length > 0) this.#pendingFrees.push(...item.old);
    }
    return allocations.length;
  }

  /** Undoes a planned write whose data I/O failed: its new clusters are free again. */
  async abortWrite(plan: WritePlan): Promise<void> {
    try {
      for (const run of plan.allocated) await this.#o.refcounts.adjust(run.clusterIndex, run.count, -1);
    } finally {
      this.#settle(plan);
    }
  }

  #settle(plan: WritePlan): void {
    for (let clusterIndex = plan.firstCluster; clusterIndex < plan.endCluster; clusterIndex++) {
      this.#inFlight.delete(clusterIndex);
    }
    plan.settle();
  }

  /**
   * Plans the part of a write inside one L2 table. The per-cluster work runs in two synchronous
   * passes ({@link #scanForWrite}, {@link #placeAllocations}) over slices loaded first; the guest
   * reads a copy-on-write needs run after them (see {@link GuestFill}). Why: TurboFan compiled the
   * async version (an await per cluster) in ~52 ms, the largest of the ~200 ms it spent compiling
   * the write path during a 0.5 s run of 512 fresh 1 MiB writes, on the cores the data writes
   * need (`node --trace-opt`); with `--no-opt` that run took 0.40 s instead of 0.56 s.
   */
  async #planInTable(plan: WritePlan, l1Index: number, guestOffset: number, data: Uint8Array): Promise<void> {
    const l2Offset = await this.#l2ForWrite(l1Index);
    const clustersPerTable = this.#bytesPerL1 / this.#clusterSize;
    const [firstCluster, endCluster] = this.#clusterSpan(guestOffset, data.length);
    const tableBase = l1Index * clustersPerTable;
    // Held for the scan, which only reads them (nothing changes an L2 entry under this lock until
    // finishWrite; a slice evicted meanwhile was clean, so it still equals the table).
    const slices = await this.#slicesOf(l2Offset, firstCluster - tableBase, endCluster - tableBase);
    const table: PlannedTable = { l1Index, allocations: [], subUpdates: [] };
    const fills: GuestFill[] = [];
    const toAllocate = this.#scanForWrite(plan, table, fills, l2Offset, tableBase, slices, guestOffset, data);
    plan.tables.push(table);
    if (toAllocate.length > 0) {
      let start = 0;
      let fresh: boolean;
      if (this.#hasDataFile) {
        // A data cluster sits at its guest offset in the data file: nothing to allocate. Its bytes
        // there are known to read as the guest reads them only in a raw data file (kept so);
        // elsewhere they may be stale (a zeroed or discarded cluster's), so whole clusters are written.
        fresh = this.#o.dataFileRaw === true;
      } else {
        // One contiguous run for the whole request, written with as few I/Os as the buffers allow.
        let count = 0;
        for (const item of toAllocate) if (item.reuse === undefined) count++;
        fresh = false;
        if (count > 0) {
          ({ start, fresh } = await this.#o.refcounts.allocateRun(count));
          plan.allocated.push({ clusterIndex: start, count });
          await this.#o.refcounts.extendFile();
        }
      }
      this.#placeAllocations(plan, table, fills, toAllocate, start, fresh, tableBase, guestOffset, data);
    }
    for (const fill of fills) {
      await this.#o.readGuest(fill.target, fill.guestOffset);
      fill.into.set(fill.bytes, fill.at);
    }
  }

  /** The L2 slices holding entries `[firstL2Index, endL2Index)` of the table at `l2Offset`. */
  async #slicesOf(l2Offset: number, firstL2Index: number, endL2Index: number): Promise<DataView[]> {
    const first = Math.floor(firstL2Index / this.#entriesPerSlice);
    const last = Math.floor((endL2Index - 1) / this.#entriesPerSlice);
    const slices: DataView[] = [];
    for (let sliceIndex = first; sliceIndex <= last; sliceIndex++) {
      const key = l2Offset + sliceIndex * this.#o.sliceBytes;
      slices.push(this.#o.cache.lookup(key) ?? (await this.#o.cache.get(key, this.#loadSlice)));
    }
    return slices;
  }

  /**
   * The first pass of {@link #planInTable}: clusters written in place get their data pieces
   * (extended L2: widened to whole subclusters, filled from the guest view later), the others are
   * returned, to be (re)mapped.
   */
  #scanForWrite(
    plan: WritePlan,
    table: PlannedTable,
    fills: GuestFill[],
    l2Offset: number,
    tableBase: number,
    slices: readonly DataView[],
    guestOffset: number,
    data: Uint8Array,
  ): ToAllocate[] {
    const end = guestOffset + data.length;
    const [firstCluster, endCluster] = this.#clusterSpan(guestOffset, data.length);
    const firstSlice = Math.floor((firstCluster - tableBase) / this.#entriesPerSlice);
    const pieces = plan.pieces;
    const toAllocate: ToAllocate[] = [];
    for (let clusterIndex = firstCluster; clusterIndex < endCluster; clusterIndex++) {
      const l2Index = clusterIndex - tableBase;
      const sliceIndex = Math.floor(l2Index / this.#entriesPerSlice);
      const ref: EntryRef = {
        slice: slices[sliceIndex - firstSlice]!,
        sliceHostOffset: l2Offset + sliceIndex * this.#o.sliceBytes,
        at: (l2Index - sliceIndex * this.#entriesPerSlice) * this.#entrySize,
      };
      const high = ref.slice.getUint32(ref.at);
      const low = ref.slice.getUint32(ref.at + 4);
      const type = classifyL2Entry(high, low, this.#hasDataFile, this.#o.extendedL2);
      const clusterStart = clusterIndex * this.#clusterSize;
      const writeStart = Math.max(guestOffset, clusterStart);
      const writeEnd = Math.min(end, clusterStart + this.#clusterSize);
      const bytes = data.subarray(writeStart - guestOffset, writeEnd - guestOffset);
      if (type === 'normal' && (high & QCOW_OFLAG_COPIED_HIGH) !== 0) {
        const hostCluster = l2EntryHostOffset(high, low);
        if (!this.#o.extendedL2) {
          appendPiece(pieces, hostCluster + (writeStart - clusterStart), bytes);
          continue;
        }
        // Extended L2: widen to whole subclusters, filling unallocated ones from the guest view.
        const allocBits = ref.slice.getUint32(ref.at + 12);
        const first = Math.floor((writeStart - clusterStart) / this.#subclusterSize);
        const last = Math.floor((writeEnd - 1 - clusterStart) / this.#subclusterSize);
        let newBits = allocBits;
        for (let sub = first; sub <= last; sub++) newBits = (newBits | (1 << sub)) >>> 0;
        if (newBits === allocBits) {
          appendPiece(pieces, hostCluster + (writeStart - clusterStart), bytes);
          continue;
        }
        const padStart = clusterStart + first * this.#subclusterSize;
        const padEnd = Math.min(clusterStart + (last + 1) * this.#subclusterSize, this.#o.size());
        const padded = new Uint8Array(padEnd - padStart);
        fills.push({ target: padded, guestOffset: padStart, into: padded, bytes, at: writeStart - padStart });
        pieces.push({ hostOffset: hostCluster + (padStart - clusterStart), bytes: padded });
        table.subUpdates.push({ l2Index, allocBits: newBits });
        continue;
      }
      // Whether the cluster reads as zeros now (nothing to copy: the new buffer is zeros already).
      const readsZeros =
        !this.#o.extendedL2 &&
        (type === 'zero-plain' || type === 'zero-alloc' || (type === 'unallocated' && !this.#o.hasBacking));
      if (type === 'zero-alloc' && (high & QCOW_OFLAG_COPIED_HIGH) !== 0 && !this.#hasDataFile) {
        // As QEMU: a zero-allocated cluster only this image uses keeps its host cluster, written
        // whole (its old bytes are stale) before its entry becomes a data entry.
        toAllocate.push({ clusterIndex, old: [], readsZeros, reuse: l2EntryHostOffset(high, low) });
        continue;
      }
      toAllocate.push({ clusterIndex, old: this.#releasesOf(ref), readsZeros });
    }
    return toAllocate;
  }

  /**
   * The second pass of {@link #planInTable}: each cluster to (re)map gets its host cluster (the
   * run from `start`, its own for a reused zero-allocated one, its guest offset in a data file),
   * its data piece and its planned L2 change; whole-cluster buffers needing the guest's old bytes
   * are filled later (`fills`).
   */
  #placeAllocations(
    plan: WritePlan,
    table: PlannedTable,
    fills: GuestFill[],
    toAllocate: readonly ToAllocate[],
    start: number,
    fresh: boolean,
    tableBase: number,
    guestOffset: number,
    data: Uint8Array,
  ): void {
    const end = guestOffset + data.length;
    const pieces = plan.pieces;
    let next = start;
    for (const item of toAllocate) {
      const hostCluster = item.reuse ?? (this.#hasDataFile ? item.clusterIndex : next++) * this.#clusterSize;
      /** Where `bytes` go: the cluster's start, or the written bytes' place in a fresh cluster. */
      let hostOffset = hostCluster;
      const clusterStart = item.clusterIndex * this.#clusterSize;
      const clusterLength = this.#clusterLength(item.clusterIndex);
      const writeStart = Math.max(guestOffset, clusterStart);
      const writeEnd = Math.min(end, clusterStart + clusterLength);
      let bytes: Uint8Array;
      const covered = writeStart === clusterStart && writeEnd === clusterStart + clusterLength;
      if (fresh && item.readsZeros && item.reuse === undefined) {
        // The new cluster reads as zeros in the file already and so does the guest's view of it:
        // only the written bytes go to the file.
        bytes = data.subarray(writeStart - guestOffset, writeEnd - guestOffset);
        hostOffset += writeStart - clusterStart;
      } else if (this.#hasDataFile && item.readsZeros && !covered && this.#data.capabilities.fastZero) {
        // A data file cluster that may hold stale bytes, zeroed fast (as QEMU does where the file
        // can), then only the written bytes go to it.
        const last = plan.dataZeroes[plan.dataZeroes.length - 1];
        if (last !== undefined && last.hostOffset + last.length === hostCluster) {
          plan.dataZeroes[plan.dataZeroes.length - 1] = {
            hostOffset: last.hostOffset,
            length: last.length + clusterLength,
          };
        } else {
          plan.dataZeroes.push({ hostOffset: hostCluster, length: clusterLength });
        }
        bytes = data.subarray(writeStart - guestOffset, writeEnd - guestOffset);
        hostOffset += writeStart - clusterStart;
      } else if (
        writeStart === clusterStart &&
        writeEnd === clusterStart + clusterLength &&
        clusterLength === this.#clusterSize
      ) {
        bytes = data.subarray(writeStart - guestOffset, writeEnd - guestOffset);
      } else {
        // A whole cluster: the tail past a short last cluster is zeros (it shows after a grow). A
        // data file stops at the guest's end (it stays the guest's size, a valid raw image).
        bytes = new Uint8Array(this.#hasDataFile ? clusterLength : this.#clusterSize);
        const written = data.subarray(writeStart - guestOffset, writeEnd - guestOffset);
        if (!covered && !item.readsZeros) {
          // The guest's old bytes first, then the written ones over them.
          fills.push({
            target: bytes.subarray(0, clusterLength),
            guestOffset: clusterStart,
            into: bytes,
            bytes: written,
            at: writeStart - clusterStart,
          });
        } else {
          bytes.set(written, writeStart - clusterStart);
        }
      }
      appendPiece(pieces, hostOffset, bytes);
      table.allocations.push({
        l2Index: item.clusterIndex - tableBase,
        hostCluster,
        old: item.old,
      });
    }
  }

  /** What to free when the entry at `ref` stops pointing where it does. */
  #releasesOf(ref: EntryRef): Release[] {
    const high = ref.slice.getUint32(ref.at);
    const low = ref.slice.getUint32(ref.at + 4);
    const type = classifyL2Entry(high, low, this.#hasDataFile, this.#o.extendedL2);
    if (this.#hasDataFile) {
      // Data file clusters are not refcounted: nothing to free in the image file.
      if (type === 'compressed') {
        throw new BlockDeviceError('ECORRUPT', 'L2 entry: compressed cluster in an image with a data file', {
          offset: ref.sliceHostOffset + ref.at,
        });
      }
      return [];
    }
    switch (type) {
      case 'normal':
      case 'zero-alloc':
        return [{ clusterIndex: l2EntryHostOffset(high, low) / this.#clusterSize, count: 1 }];
      case 'compressed': {
        const descriptor = decodeCompressedDescriptor(high, low, this.#o.clusterBits);
        this.#o.forgetCompressed(descriptor.hostOffset);
        const first = Math.floor(descriptor.hostOffset / this.#clusterSize);
        const last = Math.floor(
          (descriptor.hostOffset + descriptor.compressedLength - 1) / this.#clusterSize,
        );
        return [{ clusterIndex: first, count: last - first + 1 }];
      }
      default:
        return [];
    }
  }

  /**
   * The L2 table for `l1Index`, ready to be changed: allocated when missing (`allocate`), copied
   * when shared with a snapshot (L1 entry without COPIED). Returns 0 when missing and not allocated.
   */
  async #l2ForWrite(l1Index: number, allocate = true): Promise<number> {
    const l1 = this.#o.l1();
    const current = this.#o.mapper.l2TableOffset(l1Index);
    if (current !== 0 && (l1.high[l1Index]! & QCOW_OFLAG_COPIED_HIGH) !== 0) return current;
    if (current === 0 && !allocate) return 0;
    const table =
      current === 0 ? new Uint8Array(this.#clusterSize) : await this.#o.file.read(current, this.#clusterSize);
    const clusterIndex = await this.#o.refcounts.allocate(1);
    // Eager (a new table is rare): its refcount, then the table, durable before the L1 entry.
    await this.#o.refcounts.commit();
    const l2Offset = clusterIndex * this.#clusterSize;
    this.#o.metadata.check(l2Offset, this.#clusterSize, undefined, 'L2 table write');
    await this.#o.file.write(l2Offset, table);
    await this.#o.file.flush();
    this.#o.metadata.add(l2Offset, this.#clusterSize, 'l2-table');
    for (let at = 0; at < this.#clusterSize; at += this.#o.sliceBytes)
      this.#o.cache.invalidate(l2Offset + at);
    const entry = encodeL1Entry({ l2Offset, copied: true });
    const bytes = new Uint8Array(8);
    const view = new DataView(bytes.buffer);
    view.setUint32(0, entry.high);
    view.setUint32(4, entry.low);
    this.#o.metadata.check(l1.offset + l1Index * 8, 8, 'l1-table', 'L1 table write');
    await this.#o.file.write(l1.offset + l1Index * 8, bytes);
    l1.high[l1Index] = entry.high;
    l1.low[l1Index] = entry.low;
    if (current !== 0) {
      // The old table stays with the snapshot that shares it; its reference from the active L1
      // table goes once the L1 entry is durable (the next write-back).
      this.#o.metadata.remove(current, this.#clusterSize);
      this.#pendingFrees.push({ clusterIndex: current / this.#clusterSize, count: 1 });
    }
    return l2Offset;
  }

  /**
   * Makes whole clusters of `[guestOffset, guestOffset + length)` read as zeros or unallocated,
   * as QEMU's qcow2 driver does (partial clusters are the caller's):
   * - `'zero'` (write zeroes on a v3 image, or on a v2 image without a backing file): v3 entries
   *   get the zero flag (extended L2: every subcluster reads as zeros), their L2 table allocated
   *   if missing; an allocated cluster keeps its host cluster (zero-allocated: QEMU's
   *   QCOW2_CLUSTER_ZERO_ALLOC, COPIED kept) unless `mayUnmap`, a compressed one is always freed.
   *   v2 has no zero flag: the clusters are discarded (unallocated, freed).
   * - `'zero-free'`: reads as zeros and frees every host cluster (what a shrink leaves past the end).
   * - `'discard'`: QEMU's discard (unallocated, or the zero flag on v3 where a backing file or old
   *   data would otherwise show).
   */
  async zeroOrDiscardClusters(
    guestOffset: number,
    length: number,
    mode: 'zero' | 'zero-free' | 'discard',
    mayUnmap = false,
  ): Promise<void> {
    const end = guestOffset + length;
    let position = guestOffset;
    while (position < end) {
      const l1Index = Math.floor(position / this.#bytesPerL1);
      const tableEnd = Math.min(end, (l1Index + 1) * this.#bytesPerL1);
      await this.#zeroInTable(l1Index, position, tableEnd, mode, mayUnmap);
      position = tableEnd;
      // Table by table: a huge range never holds more than one table's slices over the cap.
      await this.#writeBackIfFull();
    }
    if (this.#hasDataFile) await this.#zeroDataFile(guestOffset, end);
  }

  /**
   * QEMU's zeroize of a subcluster-aligned range (cluster-aligned without extended L2; the end may
   * be the image's end) on a v3 image, or a v2 image without a backing file: the subclusters before
   * the first whole cluster and after the last get their zero bits (their cluster keeps its host
   * cluster, whatever `mayUnmap` says), whole clusters are zeroed as {@link zeroOrDiscardClusters}
   * does. Returns false, having changed nothing, when a partial cluster's range lies in a
   * compressed cluster (QEMU cannot zero part of one: the caller writes zeros instead).
   */
  async zeroize(guestOffset: number, length: number, mayUnmap: boolean): Promise<boolean> {
    const clusterSize = this.#clusterSize;
    const end = guestOffset + length;
    const head = Math.min(end, Math.ceil(guestOffset / clusterSize) * clusterSize) - guestOffset;
    const wholeStart = guestOffset + head;
    const tail =
      end >= this.#o.size() ? 0 : end - Math.max(wholeStart, Math.floor(end / clusterSize) * clusterSize);
    const wholeEnd = end - tail;
    if (head > 0 && (await this.#clusterType(guestOffset)) === 'compressed') return false;
    if (tail > 0 && (await this.#clusterType(wholeEnd)) === 'compressed') return false;
    if (head > 0) await this.#zeroSubclusters(guestOffset, head);
    if (wholeEnd > wholeStart) {
      await this.zeroOrDiscardClusters(wholeStart, wholeEnd - wholeStart, 'zero', mayUnmap);
    }
    if (tail > 0) await this.#zeroSubclusters(wholeEnd, tail);
    // The data file's bytes of the zeroed subclusters too (whole clusters had theirs above): a raw
    // one must read as the guest does, as QEMU zeroes the whole range there.
    if (this.#hasDataFile) {
      if (head > 0) await this.#zeroDataFile(guestOffset, wholeStart);
      if (tail > 0) await this.#zeroDataFile(wholeEnd, end);
    }
    return true;
  }

  /**
   * Whether the (sub)cluster holding `guestOffset` may be zeroed as a whole when a write of zeros
   * covers part of it (QEMU's test: it holds no data of this image, neither a data (sub)cluster nor
   * a compressed cluster). The caller also checks that the rest of it reads as zeros.
   */
  async holdsNoData(guestOffset: number): Promise<boolean> {
    const type = await this.#clusterType(guestOffset);
    if (type === 'compressed') return false;
    if (type !== 'normal') return true;
    if (!this.#o.extendedL2) return false;
    const ref = await this.#existingEntry(guestOffset);
    if (ref === undefined) return true;
    const sub = Math.floor((guestOffset % this.#clusterSize) / this.#subclusterSize);
    return ((ref.slice.getUint32(ref.at + 12) >>> sub) & 1) === 0;
  }

  /** The L2 entry of guest cluster holding `guestOffset`, undefined when its table is missing. */
  async #existingEntry(guestOffset: number): Promise<EntryRef | undefined> {
    const l1Index = Math.floor(guestOffset / this.#bytesPerL1);
    const l2Offset = this.#o.mapper.l2TableOffset(l1Index);
    if (l2Offset === 0) return undefined;
    const clustersPerTable = this.#bytesPerL1 / this.#clusterSize;
    return this.#entry(l2Offset, Math.floor(guestOffset / this.#clusterSize) - l1Index * clustersPerTable);
  }

  /** The L2 entry of guest cluster `clusterIndex`, its table ready to be changed (see {@link #l2ForWrite}). */
  async #entryForWrite(clusterIndex: number): Promise<EntryRef> {
    const clustersPerTable = this.#bytesPerL1 / this.#clusterSize;
    const l1Index = Math.floor(clusterIndex / clustersPerTable);
    return this.#entry(await this.#l2ForWrite(l1Index), clusterIndex - l1Index * clustersPerTable);
  }

  /** The cluster type of the guest cluster holding `guestOffset`. */
  async #clusterType(guestOffset: number): Promise<ReturnType<typeof classifyL2Entry>> {
    const ref = await this.#existingEntry(guestOffset);
    if (ref === undefined) return 'unallocated';
    return classifyL2Entry(
      ref.slice.getUint32(ref.at),
      ref.slice.getUint32(ref.at + 4),
      this.#hasDataFile,
      this.#o.extendedL2,
    );
  }

  /**
   * Sets the zero bits (and clears the allocation bits) of the subclusters of
   * `[guestOffset, guestOffset + length)`, part of one cluster of an extended L2 image that is not
   * compressed. The host cluster, if any, stays (its other subclusters may hold data).
   */
  async #zeroSubclusters(guestOffset: number, length: number): Promise<void> {
    const clusterIndex = Math.floor(guestOffset / this.#clusterSize);
    const ref = await this.#entryForWrite(clusterIndex);
    const first = (guestOffset - clusterIndex * this.#clusterSize) / this.#subclusterSize;
    // The image's last subcluster may be short: it counts whole.
    const count = Math.ceil(length / this.#subclusterSize);
    const mask = count >= 32 ? ALL_SUBCLUSTERS : ((2 ** count - 1) * 2 ** first) >>> 0;
    const zeroBits = ref.slice.getUint32(ref.at + 8);
    const allocBits = ref.slice.getUint32(ref.at + 12);
    const newZero = (zeroBits | mask) >>> 0;
    const newAlloc = (allocBits & ~mask) >>> 0;
    if (newZero === zeroBits && newAlloc === allocBits) return;
    ref.slice.setUint32(ref.at + 8, newZero);
    ref.slice.setUint32(ref.at + 12, newAlloc);
    this.#dirty(ref);
  }

  /**
   * The data file's bytes of whole clusters that now read as zeros: a raw data file gets zeros
   * there (it must read as the guest does, as QEMU keeps it); otherwise their storage is released
   * (nothing reads them any more). Under the exclusive lock: no write to these clusters is running.
   */
  async #zeroDataFile(guestOffset: number, end: number): Promise<void> {
    const stop = Math.min(end, this.#data.size);
    if (stop <= guestOffset) return;
    if (this.#o.dataFileRaw === true) {
      await this.#data.writeZeroes(guestOffset, stop - guestOffset, { mayUnmap: true });
    } else if (this.#data.capabilities.discard) {
      await this.#data.discard(guestOffset, stop - guestOffset);
    }
  }

  async #zeroInTable(
    l1Index: number,
    start: number,
    end: number,
    requested: 'zero' | 'zero-free' | 'discard',
    mayUnmap: boolean,
  ): Promise<void> {
    // v2 has no zero flag: write zeroes there (no backing file: the caller makes sure) discards.
    const mode = requested === 'zero' && this.#o.version === 2 ? 'zero-free' : requested;
    // Zeros need an entry (the zero flag) even where nothing is allocated: QEMU's write zeroes on
    // v3 always, a shrink over a backing file; so does a discard on a v3 image over a backing file,
    // as QEMU makes a discarded range read as zeros there.
    const needTable =
      mode === 'zero' || (this.#o.hasBacking && (mode === 'zero-free' || this.#o.version === 3));
    const existing = this.#o.mapper.l2TableOffset(l1Index);
    if (existing === 0 && !needTable) return;
    const l2Offset = await this.#l2ForWrite(l1Index, needTable);
    if (l2Offset === 0) return;
    const clustersPerTable = this.#bytesPerL1 / this.#clusterSize;
    const [firstCluster, endCluster] = this.#clusterSpan(start, end - start);
    const zeroFlagForZeroes = this.#o.hasBacking || this.#o.version === 3;
    const zeroFlagLow = encodeL2Entry({ type: 'zero-plain' }).low;
    for (let clusterIndex = firstCluster; clusterIndex < endCluster; clusterIndex++) {
      const ref = await this.#entry(l2Offset, clusterIndex - l1Index * clustersPerTable);
      const high = ref.slice.getUint32(ref.at);
      const low = ref.slice.getUint32(ref.at + 4);
      let newHigh = 0;
      let newLow = 0;
      let zeroBits = 0;
      let release: boolean;
      if (mode === 'zero') {
        // QEMU's zero_in_l2_slice: a compressed cluster always goes (it cannot be zeroed in
        // place); an allocated one only with may-unmap, else it keeps its host cluster (and
        // COPIED, or its sharing with a snapshot) and reads as zeros by the flag.
        const type = classifyL2Entry(high, low, this.#hasDataFile, this.#o.extendedL2);
        release = type === 'compressed' || (mayUnmap && (type === 'normal' || type === 'zero-alloc'));
        if (!release) {
          newHigh = high;
          newLow = low;
        }
        if (this.#o.extendedL2) zeroBits = ALL_SUBCLUSTERS;
        else newLow = (newLow | zeroFlagLow) >>> 0;
      } else {
        // A discard (QEMU's, not a full discard) leaves zeros on v3 where the backing file or the
        // cluster's old data would otherwise show; elsewhere it leaves the entry unallocated.
        const zeroFlag =
          mode === 'zero-free'
            ? zeroFlagForZeroes
            : this.#o.version === 3 &&
              (this.#o.hasBacking || isAllocated(high, low, this.#hasDataFile, this.#o.extendedL2));
        if (zeroFlag) {
          if (this.#o.extendedL2) zeroBits = ALL_SUBCLUSTERS;
          else newLow = zeroFlagLow;
        }
        release = true;
      }
      const same =
        high === newHigh &&
        low === newLow &&
        (!this.#o.extendedL2 ||
          (ref.slice.getUint32(ref.at + 8) === zeroBits && ref.slice.getUint32(ref.at + 12) === 0));
      if (same) continue;
      if (release) this.#pendingFrees.push(...this.#releasesOf(ref));
      ref.slice.setUint32(ref.at, newHigh);
      ref.slice.setUint32(ref.at + 4, newLow);
      if (this.#o.extendedL2) {
        ref.slice.setUint32(ref.at + 8, zeroBits);
        ref.slice.setUint32(ref.at + 12, 0);
      }
      this.#dirty(ref);
    }
  }

  /**
   * Metadata preallocation: every L2 table and data cluster of the guest range
   * `[fromGuest, size)` allocated, entries normal and COPIED (a new image from 0; a grown one from
   * its old size, where clusters that already have a host cluster keep it). The data clusters are not written: the file
   * grows sparse and they read as zeros. With extended L2 the subcluster bitmaps stay empty, as
   * QEMU leaves them (the subclusters read from the backing file or as zeros until written).
   */
  async preallocate(size: number, fromGuest = 0, dataFresh = false): Promise<void> {
    const clustersPerTable = this.#bytesPerL1 / this.#clusterSize;
    const firstCluster = Math.floor(fromGuest / this.#clusterSize);
    const totalClusters = Math.ceil(size / this.#clusterSize);
    // A grown range (qemu-img resize): host clusters below the file's end may hold a freed
    // cluster's old bytes, so they are zeroed before an entry points at them (the entries are
    // plain data entries, as QEMU writes them). Extended L2 entries keep their subcluster bits
    // (no subcluster reads the host cluster until written).
    const staleBelow = fromGuest > 0 && !this.#o.extendedL2 ? this.#o.file.size : 0;
    for (
      let l1Index = Math.floor(firstCluster / clustersPerTable);
      l1Index * clustersPerTable < totalClusters;
      l1Index++
    ) {
      const l2Offset = await this.#l2ForWrite(l1Index);
      const tableFirst = Math.max(firstCluster, l1Index * clustersPerTable);
      const tableEnd = Math.min(totalClusters, (l1Index + 1) * clustersPerTable);
      const refs: EntryRef[] = [];
      /** Guest cluster of each entry in `refs`. */
      const clusters: number[] = [];
      for (let clusterIndex = tableFirst; clusterIndex < tableEnd; clusterIndex++) {
        const ref = await this.#entry(l2Offset, clusterIndex - l1Index * clustersPerTable);
        const type = classifyL2Entry(
          ref.slice.getUint32(ref.at),
          ref.slice.getUint32(ref.at + 4),
          this.#hasDataFile,
          this.#o.extendedL2,
        );
        // Clusters with a host cluster (data, allocated zeros, compressed) keep it.
        if (type === 'unallocated' || type === 'zero-plain') {
          refs.push(ref);
          clusters.push(clusterIndex);
        }
      }
      if (refs.length === 0) continue;
      if (this.#hasDataFile) {
        await this.#preallocateInDataFile(refs, clusters, dataFresh);
        await this.#writeBackIfFull();
        continue;
      }
      const start = await this.#o.refcounts.allocate(refs.length);
      const hostStart = start * this.#clusterSize;
      const staleBytes = Math.min(staleBelow, hostStart + refs.length * this.#clusterSize) - hostStart;
      if (staleBytes > 0) {
        this.#o.metadata.check(hostStart, staleBytes, undefined, 'preallocated data zeroing');
        await this.#o.file.writeZeroes(hostStart, staleBytes);
      }
      for (const [index, ref] of refs.entries()) {
        const { high, low } = encodeL2Entry({
          type: 'normal',
          hostOffset: (start + index) * this.#clusterSize,
          copied: true,
        });
        ref.slice.setUint32(ref.at, high);
        ref.slice.setUint32(ref.at + 4, low);
        this.#dirty(ref);
      }
      await this.#writeBackIfFull();
    }
    await this.flush();
  }

  /**
   * Metadata preallocation with a data file: each entry points at its guest offset there. Where
   * the data file may hold stale bytes (not raw, as raw data files read as the guest does; not
   * `dataFresh`, a data file just made), they are zeroed first. Extended L2 entries keep empty
   * subcluster bitmaps: nothing reads the data yet.
   */
  async #preallocateInDataFile(
    refs: readonly EntryRef[],
    clusters: readonly number[],
    dataFresh: boolean,
  ): Promise<void> {
    if (this.#o.dataFileRaw !== true && !this.#o.extendedL2 && !dataFresh) {
      let index = 0;
      while (index < clusters.length) {
        let next = index + 1;
        while (next < clusters.length && clusters[next] === clusters[next - 1]! + 1) next++;
        const from = clusters[index]! * this.#clusterSize;
        const to = Math.min((clusters[next - 1]! + 1) * this.#clusterSize, this.#data.size);
        if (to > from) await this.#data.writeZeroes(from, to - from, { mayUnmap: true });
        index = next;
      }
    }
    for (const [index, ref] of refs.entries()) {
      const { high, low } = encodeL2Entry({
        type: 'normal',
        hostOffset: clusters[index]! * this.#clusterSize,
        copied: true,
      });
      ref.slice.setUint32(ref.at, high);
      ref.slice.setUint32(ref.at + 4, low);
      this.#dirty(ref);
    }
  }

  /**
   * Writes one whole guest cluster compressed: `compressed` is the codec's output (shorter than a
   * cluster). The bytes are packed after the previous compressed cluster when they fit.
   */
  async writeCompressedCluster(clusterIndex: number, compressed: Uint8Array): Promise<void> {
    if (this.#hasDataFile) {
      throw new BlockDeviceError(
        'EUNSUPPORTED',
        'compressed write: an image with an external data file cannot hold compressed clusters',
      );
    }
    const ref = await this.#entryForWrite(clusterIndex);
    let hostOffset: number;
    const tail = this.#compressedTail;
    const fitsTail =
      tail > 0 &&
      tail % this.#clusterSize !== 0 &&
      Math.floor((tail + compressed.length - 1) / this.#clusterSize) ===
        Math.floor(tail / this.#clusterSize) &&
      (await this.#o.refcounts.get(Math.floor(tail / this.#clusterSize))) > 0 &&
      (await this.#o.refcounts.get(Math.floor(tail / this.#clusterSize))) < this.#o.refcounts.maxRefcount;
    if (fitsTail) {
      hostOffset = tail;
      await this.#o.refcounts.adjust(Math.floor(tail / this.#clusterSize), 1, 1);
    } else {
      const count = Math.ceil(compressed.length / this.#clusterSize);
      hostOffset = (await this.#o.refcounts.allocate(count)) * this.#clusterSize;
      await this.#o.refcounts.extendFile();
    }
    this.#o.metadata.check(hostOffset, compressed.length, undefined, 'compressed data write');
    await this.#o.file.write(hostOffset, compressed);
    this.#compressedTail = hostOffset + compressed.length;
    const old = this.#releasesOf(ref);
    const { high, low } = encodeCompressedDescriptor(hostOffset, compressed.length, this.#o.clusterBits);
    ref.slice.setUint32(ref.at, high);
    ref.slice.setUint32(ref.at + 4, low);
    if (this.#o.extendedL2) {
      ref.slice.setUint32(ref.at + 8, 0);
      ref.slice.setUint32(ref.at + 12, 0);
    }
    this.#dirty(ref);
    this.#pendingFrees.push(...old);
    await this.#writeBackIfFull();
  }
}

/** Whether an L2 entry has a host cluster (QEMU's "allocated": data, compressed, or zero with one). */
function isAllocated(high: number, low: number, hasDataFile: boolean, extendedL2: boolean): boolean {
  const type = classifyL2Entry(high, low, hasDataFile, extendedL2);
  return type === 'normal' || type === 'compressed' || type === 'zero-alloc';
}

/**
 * Adds a data write to `pieces`, merged into the last one when it continues it both on the host
 * and in the same buffer: a request over clusters that are contiguous on the host (in place or
 * freshly allocated) is one write, not one a cluster.
 */
function appendPiece(
  pieces: { hostOffset: number; bytes: Uint8Array }[],
  hostOffset: number,
  bytes: Uint8Array,
): void {
  const last = pieces[pieces.length - 1];
  if (
    last !== undefined &&
    last.hostOffset + last.bytes.length === hostOffset &&
    last.bytes.buffer === bytes.buffer &&
    last.bytes.byteOffset + last.bytes.length === bytes.byteOffset
  ) {
    pieces[pieces.length - 1] = {
      hostOffset: last.hostOffset,
      bytes: new Uint8Array(bytes.buffer, last.bytes.byteOffset, last.bytes.length + bytes.length),
    };
  } else {
    pieces.push({ hostOffset, bytes });
  }
}

/** Runs `task` over `items`, at most WRITE_CONCURRENCY at a time. */
async function runBounded<T>(items: readonly T[], task: (item: T) => Promise<void>): Promise<void> {
  if (items.length === 1) return task(items[0]!);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await task(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(WRITE_CONCURRENCY, items.length) }, worker));
}
