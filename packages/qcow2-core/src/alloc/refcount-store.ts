/**
 * The refcount table and refcount blocks of a writable image, and the cluster allocator over them.
 *
 * Changes are made in memory first (`allocate`, `adjust`) and written back by `commit`, which keeps
 * the on-disk order safe: new refcount blocks are durable before a table entry points at them, a
 * relocated table is durable before the header points at it, and the old table is freed only
 * afterwards. The write path commits (and flushes) before any L2 entry pointing at a newly
 * allocated cluster goes to disk, and applies decrements (`adjust` with -1) only once the change
 * that dropped the reference is durable, so a cluster is never reused while a table on disk still
 * points at it.
 *
 * Every refcount width (1..64 bits) is handled by the format codecs. Clusters past the end of the
 * table's coverage, or in a range whose block does not exist, have refcount 0.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { hex } from '../format/binary.js';
import { QCOW_MAX_REFTABLE_SIZE } from '../format/geometry.js';
import {
  decodeRefcount,
  decodeRefcountTable,
  encodeRefcount,
  maxRefcount,
  refcountsPerBlock,
} from '../format/refcount.js';
import type { MetadataMap } from './metadata-map.js';

/** Bounds of the room the file grows ahead of its allocated clusters. */
const FILE_GROWTH_MIN = 1024 * 1024;
const FILE_GROWTH_MAX = 64 * 1024 * 1024;

export interface RefcountStoreOptions {
  readonly file: BlockDevice;
  readonly clusterBits: number;
  readonly refcountOrder: number;
  readonly tableOffset: number;
  readonly tableClusters: number;
  readonly metadata: MetadataMap;
  /** Writes the header's refcount_table_offset and refcount_table_clusters (then flushes). */
  readonly writeTablePointer: (tableOffset: number, tableClusters: number) => Promise<void>;
}

export class RefcountStore {
  readonly #options: RefcountStoreOptions;
  readonly #clusterSize: number;
  readonly #perBlock: number;
  readonly #order: number;
  readonly #max: number;
  /** Host offset of each refcount block (0 = none), one per table entry. */
  #table: number[];
  #tableOffset: number;
  #tableClusters: number;
  readonly #blocks = new Map<number, Uint8Array>();
  readonly #dirtyBlocks = new Set<number>();
  /** Blocks created since the last commit (their table entries are not on disk yet). */
  readonly #newBlocks = new Set<number>();
  readonly #dirtyTableEntries = new Set<number>();
  /** A table replaced in memory whose clusters are freed once the header points elsewhere. */
  #oldTable: { offset: number; clusters: number } | undefined;
  /** No free cluster lies below this one. */
  #freeHint = 0;
  /** End (cluster index) of the highest cluster allocated by this store. */
  #allocatedEnd = 0;
  /** End (cluster index) of the file when the store was loaded. */
  readonly #loadedEnd: number;
  /** The file's length without the room `extendFile` made ahead (undefined: none made). */
  #exactSize: number | undefined;

  private constructor(options: RefcountStoreOptions, table: number[]) {
    this.#options = options;
    this.#clusterSize = 2 ** options.clusterBits;
    this.#order = options.refcountOrder;
    this.#perBlock = refcountsPerBlock(this.#clusterSize, options.refcountOrder);
    this.#max = maxRefcount(options.refcountOrder);
    this.#table = table;
    this.#tableOffset = options.tableOffset;
    this.#tableClusters = options.tableClusters;
    this.#loadedEnd = Math.ceil(options.file.size / this.#clusterSize);
  }

  /** Reads and validates the refcount table; registers it and its blocks as metadata. */
  static async load(options: RefcountStoreOptions): Promise<RefcountStore> {
    const clusterSize = 2 ** options.clusterBits;
    const bytes = await options.file.read(options.tableOffset, options.tableClusters * clusterSize);
    const { offsets, reservedBitsSet } = decodeRefcountTable(bytes, options.tableOffset);
    if (reservedBitsSet.length > 0) {
      throw new BlockDeviceError('ECORRUPT', 'refcount table: reserved bits are set in an entry', {
        offset: options.tableOffset + reservedBitsSet[0]! * 8,
      });
    }
    for (const [index, offset] of offsets.entries()) {
      if (offset === 0) continue;
      if (offset % clusterSize !== 0 || offset + clusterSize > options.file.size) {
        throw new BlockDeviceError(
          'ECORRUPT',
          `refcount table: block ${index} at ${hex(offset)} is unaligned or past the end of the file`,
          { offset: options.tableOffset + index * 8 },
        );
      }
      options.metadata.add(offset, clusterSize, 'refcount-block');
    }
    options.metadata.add(options.tableOffset, options.tableClusters * clusterSize, 'refcount-table');
    return new RefcountStore(options, offsets);
  }

  /** Largest refcount the width holds. */
  get maxRefcount(): number {
    return this.#max;
  }

  get tableOffset(): number {
    return this.#tableOffset;
  }

  get tableClusters(): number {
    return this.#tableClusters;
  }

  /**
   * Makes the file at least as long as every cluster allocated so far. It grows ahead by an eighth
   * of its size (1 to 64 MiB), so a stream of allocations does not resize it each time;
   * {@link trimFile} cuts what is left over.
   */
  async extendFile(): Promise<void> {
    const end = this.#allocatedEnd * this.#clusterSize;
    const { file } = this.#options;
    if (file.size >= end) return;
    const ahead = Math.min(Math.max(Math.floor(end / 8), FILE_GROWTH_MIN), FILE_GROWTH_MAX);
    const target = Math.ceil((end + ahead) / this.#clusterSize) * this.#clusterSize;
    this.#exactSize = Math.max(this.#exactSize ?? file.size, end);
    await file.resize(target);
  }

  /** Cuts the room {@link extendFile} made ahead: the file ends with the last allocated cluster. */
  async trimFile(): Promise<void> {
    const exact = this.#exactSize;
    if (exact === undefined) return;
    const end = Math.max(exact, this.#allocatedEnd * this.#clusterSize);
    const { file } = this.#options;
    if (file.size > end) await file.resize(end);
    this.#exactSize = undefined;
  }

  /** Changes not written yet. */
  get pending(): boolean {
    return this.#dirtyBlocks.size > 0 || this.#dirtyTableEntries.size > 0 || this.#oldTable !== undefined;
  }

  async #block(blockIndex: number): Promise<Uint8Array | undefined> {
    const cached = this.#blocks.get(blockIndex);
    if (cached !== undefined) return cached;
    const offset = this.#table[blockIndex] ?? 0;
    if (offset === 0) return undefined;
    const block = await this.#options.file.read(offset, this.#clusterSize);
    // Another call may have loaded it meanwhile: keep the first (it may hold changes).
    const again = this.#blocks.get(blockIndex);
    if (again !== undefined) return again;
    this.#blocks.set(blockIndex, block);
    return block;
  }

  /** The refcount of host cluster `clusterIndex`. */
  async get(clusterIndex: number): Promise<number> {
    const blockIndex = Math.floor(clusterIndex / this.#perBlock);
    const block = await this.#block(blockIndex);
    if (block === undefined) return 0;
    return decodeRefcount(block, clusterIndex - blockIndex * this.#perBlock, this.#order);
  }

  /** Adds `delta` to the refcount of clusters `[clusterIndex, clusterIndex + count)` (in memory). */
  async adjust(clusterIndex: number, count: number, delta: number): Promise<void> {
    // Synchronous over loaded blocks (see #adjustLoaded); a block is loaded or made only when the
    // run reaches one that is not in memory.
    let done = this.#adjustLoaded(clusterIndex, count, delta);
    while (done < count) {
      const cluster = clusterIndex + done;
      const blockIndex = Math.floor(cluster / this.#perBlock);
      const block =
        (await this.#block(blockIndex)) ?? (delta > 0 ? await this.#createBlock(blockIndex) : undefined);
      if (block === undefined) {
        throw new BlockDeviceError('ECORRUPT', 'refcount: freeing a cluster that has no refcount block', {
          offset: cluster * this.#clusterSize,
        });
      }
      done += this.#adjustLoaded(cluster, count - done, delta);
    }
  }

  /**
   * {@link adjust} over the clusters whose refcount block is in memory, stopping at the first one
   * whose block is not; returns how many clusters it adjusted. A synchronous loop: the async one
   * (an await per cluster) was among the write path's most expensive functions for TurboFan to
   * compile (16 ms of a 0.5 s run of fresh 1 MiB writes).
   */
  #adjustLoaded(clusterIndex: number, count: number, delta: number): number {
    for (let done = 0; done < count; done++) {
      const cluster = clusterIndex + done;
      const blockIndex = Math.floor(cluster / this.#perBlock);
      const block = this.#blocks.get(blockIndex);
      if (block === undefined) return done;
      const index = cluster - blockIndex * this.#perBlock;
      const value = decodeRefcount(block, index, this.#order) + delta;
      if (value < 0) {
        throw new BlockDeviceError('ECORRUPT', 'refcount: dropping below zero', {
          offset: cluster * this.#clusterSize,
        });
      }
      if (value > this.#max) {
        throw new BlockDeviceError('ENOSPC', `refcount: above the largest ${2 ** this.#order}-bit refcount`, {
          offset: cluster * this.#clusterSize,
        });
      }
      encodeRefcount(block, index, this.#order, value);
      this.#dirtyBlocks.add(blockIndex);
      if (value === 0 && cluster < this.#freeHint) this.#freeHint = cluster;
    }
    return count;
  }

  /**
   * Allocates `count` contiguous free clusters (refcount set to 1 in memory) and returns the first
   * one's index. Refcount blocks and a larger table are made as needed; `commit` writes them.
   */
  async allocate(count: number): Promise<number> {
    return (await this.allocateRun(count)).start;
  }

  /**
   * {@link allocate}, also telling whether the run is `fresh`: never handed out before while this
   * store was open and past the file's end when it was loaded, so the file reads as zeros there
   * (it only ever grows by resizing, which fills with zeros, until `trimFile`).
   */
  async allocateRun(count: number): Promise<{ start: number; fresh: boolean }> {
    const freshFrom = Math.max(this.#allocatedEnd, this.#loadedEnd);
    const start = await this.#allocate(count);
    return { start, fresh: start >= freshFrom };
  }

  async #allocate(count: number): Promise<number> {
    for (;;) {
      const start = await this.#findFree(count);
      const firstBlock = Math.floor(start / this.#perBlock);
      const lastBlock = Math.floor((start + count - 1) / this.#perBlock);
      let missing = -1;
      for (let blockIndex = firstBlock; blockIndex <= lastBlock; blockIndex++) {
        if (blockIndex >= this.#table.length || this.#table[blockIndex] === 0) {
          missing = blockIndex;
          break;
        }
      }
      if (missing === -1) {
        await this.adjust(start, count, 1);
        if (this.#freeHint === start) this.#freeHint = start + count;
        this.#allocatedEnd = Math.max(this.#allocatedEnd, start + count);
        return start;
      }
      // Put the missing block right after the run (so the run stays whole), then search again. When
      // that cluster lies in a range without a block too, that range's block goes there first,
      // covering itself.
      let at = start + count;
      while ((await this.get(at)) !== 0) at++;
      const atBlock = Math.floor(at / this.#perBlock);
      const atBlockExists = atBlock < this.#table.length && this.#table[atBlock] !== 0;
      await this.#createBlock(atBlockExists ? missing : atBlock, at);
    }
  }

  /** First cluster of a run of `count` clusters with refcount 0, from the free hint. */
  async #findFree(count: number): Promise<number> {
    let start = this.#freeHint;
    let run = 0;
    let cluster = start;
    /** The first free cluster seen: everything from the hint up to it is in use. */
    let firstFree = -1;
    while (run < count) {
      const blockIndex = Math.floor(cluster / this.#perBlock);
      const block = blockIndex < this.#table.length ? await this.#block(blockIndex) : undefined;
      if (block === undefined) {
        // A whole range without a block is free.
        const rangeEnd = (blockIndex + 1) * this.#perBlock;
        if (run === 0) start = cluster;
        if (firstFree === -1) firstFree = cluster;
        run += rangeEnd - cluster;
        cluster = rangeEnd;
        continue;
      }
      const base = blockIndex * this.#perBlock;
      const stop = base + this.#perBlock;
      for (; cluster < stop && run < count; cluster++) {
        if (decodeRefcount(block, cluster - base, this.#order) === 0) {
          if (run === 0) start = cluster;
          if (firstFree === -1) firstFree = cluster;
          run++;
        } else {
          run = 0;
        }
      }
    }
    // Later searches start there, not at clusters known to be in use.
    if (firstFree > this.#freeHint) this.#freeHint = firstFree;
    return start;
  }

  /** A new, empty refcount block for range `blockIndex`, stored at `atCluster` (default: the
   * range's first cluster, free since no block covers it). */
  async #createBlock(blockIndex: number, atCluster = blockIndex * this.#perBlock): Promise<Uint8Array> {
    if (blockIndex >= this.#table.length) {
      await this.#growTable(blockIndex + 1);
      // Allocating the new table may have made this block already.
      const made = await this.#block(blockIndex);
      if (made !== undefined) return made;
    }
    const block = new Uint8Array(this.#clusterSize);
    this.#blocks.set(blockIndex, block);
    this.#newBlocks.add(blockIndex);
    this.#dirtyBlocks.add(blockIndex);
    this.#dirtyTableEntries.add(blockIndex);
    const ownBlock = Math.floor(atCluster / this.#perBlock);
    this.#allocatedEnd = Math.max(this.#allocatedEnd, atCluster + 1);
    this.#table[blockIndex] = atCluster * this.#clusterSize;
    this.#options.metadata.add(atCluster * this.#clusterSize, this.#clusterSize, 'refcount-block');
    if (ownBlock === blockIndex) {
      encodeRefcount(block, atCluster - blockIndex * this.#perBlock, this.#order, 1);
    } else {
      await this.adjust(atCluster, 1, 1);
    }
    return block;
  }

  /**
   * Replaces the table in memory by a larger one holding at least `entries` entries. The table the
   * header points at is freed by the next commit; a larger table made before that commit replaces
   * the one made earlier (never written, so freed at once: a second growth between two commits
   * does not leak the middle table).
   */
  async #growTable(entries: number): Promise<void> {
    const perCluster = this.#clusterSize / 8;
    // Room for the new table's own blocks and some growth.
    const wanted = Math.max(entries + 2, Math.ceil(this.#table.length * 1.5));
    const clusters = Math.ceil(wanted / perCluster);
    if (clusters * this.#clusterSize > QCOW_MAX_REFTABLE_SIZE) {
      throw new BlockDeviceError('ENOSPC', 'refcount table: would exceed the 8 MiB limit');
    }
    // Entries first: blocks made while allocating the new table's clusters need them.
    while (this.#table.length < clusters * perCluster) this.#table.push(0);
    const start = await this.allocate(clusters);
    if (this.#table.length > clusters * perCluster) {
      // Allocating grew the table again (a nested growth) and that larger table is in place.
      await this.adjust(start, clusters, -1);
      return;
    }
    const previous = { offset: this.#tableOffset, clusters: this.#tableClusters };
    this.#tableOffset = start * this.#clusterSize;
    this.#tableClusters = clusters;
    if (this.#oldTable === undefined) {
      // The header still points at this one: it is freed once the header points elsewhere.
      this.#oldTable = previous;
    } else {
      // A table made since the last commit, never written and referenced by nothing on disk.
      await this.adjust(previous.offset / this.#clusterSize, previous.clusters, -1);
    }
    for (let index = 0; index < this.#table.length; index++) this.#dirtyTableEntries.add(index);
  }

  /**
   * Writes changed blocks without a flush when that is safe (only existing blocks changed, as by
   * frees); otherwise a full {@link commit}.
   */
  async writeBack(): Promise<void> {
    if (this.#newBlocks.size > 0 || this.#oldTable !== undefined || this.#dirtyTableEntries.size > 0) {
      await this.commit();
      return;
    }
    for (const blockIndex of [...this.#dirtyBlocks].sort((a, b) => a - b)) {
      const offset = this.#table[blockIndex]!;
      this.#options.metadata.check(offset, this.#clusterSize, 'refcount-block', 'refcount block write');
      this.#dirtyBlocks.delete(blockIndex);
      await this.#options.file.write(offset, this.#blocks.get(blockIndex)!);
    }
  }

  /**
   * Writes every change (see the file comment) and flushes (unless `flush` is false: then the
   * blocks and table entries written last are not flushed yet; new blocks and a relocated table
   * are still made durable in order before anything points at them).
   */
  async commit(options: { flush?: boolean } = {}): Promise<void> {
    const { file, metadata } = this.#options;
    if (!this.pending) return;
    const needOrdering = this.#newBlocks.size > 0 || this.#oldTable !== undefined;
    const end = this.#allocatedEnd * this.#clusterSize;
    if (file.size < end) await file.resize(end);
    for (const blockIndex of [...this.#dirtyBlocks].sort((a, b) => a - b)) {
      const offset = this.#table[blockIndex]!;
      metadata.check(offset, this.#clusterSize, 'refcount-block', 'refcount block write');
      await file.write(offset, this.#blocks.get(blockIndex)!);
      this.#dirtyBlocks.delete(blockIndex);
    }
    if (needOrdering) await file.flush();
    const oldTable = this.#oldTable;
    if (oldTable !== undefined) {
      metadata.check(
        this.#tableOffset,
        this.#tableClusters * this.#clusterSize,
        undefined,
        'refcount table write',
      );
      await file.write(this.#tableOffset, this.#encodeTable(0, this.#table.length));
      await file.flush();
      await this.#options.writeTablePointer(this.#tableOffset, this.#tableClusters);
      metadata.remove(oldTable.offset, oldTable.clusters * this.#clusterSize);
      metadata.add(this.#tableOffset, this.#tableClusters * this.#clusterSize, 'refcount-table');
      this.#oldTable = undefined;
      this.#dirtyTableEntries.clear();
      await this.adjust(oldTable.offset / this.#clusterSize, oldTable.clusters, -1);
      for (const blockIndex of [...this.#dirtyBlocks]) {
        await file.write(this.#table[blockIndex]!, this.#blocks.get(blockIndex)!);
        this.#dirtyBlocks.delete(blockIndex);
      }
    } else if (this.#dirtyTableEntries.size > 0) {
      const indexes = [...this.#dirtyTableEntries].sort((a, b) => a - b);
      const first = indexes[0]!;
      const last = indexes[indexes.length - 1]!;
      const offset = this.#tableOffset + first * 8;
      metadata.check(offset, (last - first + 1) * 8, 'refcount-table', 'refcount table write');
      await file.write(offset, this.#encodeTable(first, last + 1));
      this.#dirtyTableEntries.clear();
    }
    this.#newBlocks.clear();
    if (options.flush !== false) await file.flush();
  }

  #encodeTable(from: number, to: number): Uint8Array {
    const bytes = new Uint8Array((to - from) * 8);
    const view = new DataView(bytes.buffer);
    for (let index = from; index < to; index++) {
      const offset = this.#table[index] ?? 0;
      view.setUint32((index - from) * 8, Math.floor(offset / 0x1_0000_0000));
      view.setUint32((index - from) * 8 + 4, offset >>> 0);
    }
    return bytes;
  }
}
