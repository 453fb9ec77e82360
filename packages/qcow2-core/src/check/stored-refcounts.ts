/**
 * The refcounts the image stores: the refcount table and the refcount blocks, read once when they
 * fit a memory budget (in a few large reads, several in flight), otherwise on demand (a few kept).
 * Entries of every width, 1 to 64 bits; sub-byte widths pack least significant bits first. A
 * cluster the table does not cover has refcount 0; a block past the end of the file reads as zeros.
 * A refcount table entry whose block offset is not cluster aligned makes the refcounts of that
 * block unreadable, as in QEMU.
 */
import type { BlockDevice, RequestOptions } from '@qcowkit/blockdev';
import { entryHex, reftableEntryAligned, reftableEntryOffset, TWO_POW_32 } from './entries.js';
import { readZeroPadded } from './read-padded.js';

/** High half of the first offset QEMU's block layer refuses to read (it stops just below 2^63). */
const UNREADABLE_OFFSET_HIGH = 0x7fff_ffff;

/** Bytes of refcount blocks kept in memory (at least 32 blocks): the blocks the COPIED checks
 * read usually serve the comparison too. */
const BLOCK_CACHE_BYTES = 8 * 1024 * 1024;
const MIN_CACHED_BLOCKS = 32;
/** {@link StoredRefcounts.preload} reads every refcount block when they take at most this many
 * bytes together (2 bytes per cluster with 16-bit refcounts: a 2 TiB file at 64 KiB clusters). */
const PRELOAD_MAX_BYTES = 64 * 1024 * 1024;
/** Preload reads: adjacent blocks in one read of at most this many bytes, this many reads at once. */
const PRELOAD_READ_BYTES = 1024 * 1024;
const PRELOAD_READS_IN_FLIGHT = 16;

/** A refcount, or why it cannot be read (`unalignedBlock`: the refcount table index whose block
 * offset is misaligned, and that offset in hex). */
export type StoredRefcount =
  | number
  | { error: string; unalignedBlock?: { index: number; offsetHex: string } };

export class StoredRefcounts {
  /** Refcount entries per refcount block. */
  readonly entriesPerBlock: number;
  private readonly cache = new Map<number, Uint8Array>();
  /** After {@link preload}: every readable block by table index (none evicted); undefined before. */
  private resident: (Uint8Array | undefined)[] | undefined;

  private constructor(
    private readonly file: BlockDevice,
    private readonly clusterSize: number,
    readonly refcountBits: number,
    /** The raw refcount table. */
    private readonly table: DataView,
    readonly tableEntries: number,
  ) {
    this.entriesPerBlock = (clusterSize * 8) / refcountBits;
  }

  static async load(
    file: BlockDevice,
    options: {
      clusterSize: number;
      refcountBits: number;
      refcountTableOffset: number;
      refcountTableClusters: number;
      request?: RequestOptions;
      /** Read every block at once when they take at most this many bytes (default 64 MiB). */
      preloadMaxBytes?: number;
    },
  ): Promise<StoredRefcounts> {
    const bytes = await readZeroPadded(
      file,
      options.refcountTableOffset,
      options.refcountTableClusters * options.clusterSize,
      options.request,
    );
    const stored = new StoredRefcounts(
      file,
      options.clusterSize,
      options.refcountBits,
      new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength),
      bytes.length / 8,
    );
    await stored.preload(options.request, options.preloadMaxBytes);
    return stored;
  }

  /** After {@link preload} succeeded: the blocks by table index (undefined where there is none or
   * it cannot be read); undefined when blocks are read on demand. */
  get residentBlocks(): readonly (Uint8Array | undefined)[] | undefined {
    return this.resident;
  }

  /** The refcount table entry `index` as its two 32-bit halves. */
  tableEntry(index: number): { high: number; low: number } {
    return { high: this.tableHigh(index), low: this.tableLow(index) };
  }

  /**
   * The indexes of the refcount table's non-zero entries, in order (found once, then kept: the
   * table itself never changes here). Tables are mostly zeros (a 64 KiB cluster of table has 8192
   * entries; a 1 GiB image uses one): they are skipped in a plain loop over the table's 32-bit
   * words. It was a generator, walked twice per check: V8 optimized it twice, which on a 1 GiB
   * image with 64 KiB clusters cost more CPU than the loop.
   */
  usedTableEntries(): readonly number[] {
    this.used ??= nonZeroEntries(
      new Uint32Array(this.table.buffer, this.table.byteOffset, this.tableEntries * 2),
    );
    return this.used;
  }

  /** See {@link usedTableEntries}. */
  private used: readonly number[] | undefined;

  /** The high half of refcount table entry `index` (loops over the table allocate nothing). */
  tableHigh(index: number): number {
    return this.table.getUint32(index * 8);
  }

  /** The low half of refcount table entry `index`. */
  tableLow(index: number): number {
    return this.table.getUint32(index * 8 + 4);
  }

  /** Whether refcount table entry `blockIndex` names a block that can be read (one {@link block}
   * returns bytes for), without reading it. */
  hasBlock(blockIndex: number): boolean {
    if (blockIndex >= this.tableEntries) return false;
    const high = this.tableHigh(blockIndex);
    const low = this.tableLow(blockIndex);
    return (
      reftableEntryOffset(high, low) !== 0 &&
      reftableEntryAligned(low, this.clusterSize) &&
      high < UNREADABLE_OFFSET_HIGH
    );
  }

  /** The stored refcount of one host cluster, or why it cannot be read. */
  async get(clusterIndex: number, request?: RequestOptions): Promise<StoredRefcount> {
    const blockIndex = Math.floor(clusterIndex / this.entriesPerBlock);
    const block = await this.block(blockIndex, request);
    if (block === undefined) return 0;
    if (typeof block === 'string') return this.unreadable(blockIndex, block);
    return decodeRefcount(block, clusterIndex - blockIndex * this.entriesPerBlock, this.refcountBits);
  }

  /**
   * The stored refcount when it is known without I/O (its block is cached, absent or unreadable);
   * undefined when the block must be read first (use {@link get}).
   */
  peek(clusterIndex: number): StoredRefcount | undefined {
    const blockIndex = Math.floor(clusterIndex / this.entriesPerBlock);
    if (blockIndex >= this.tableEntries) return 0;
    const resident = this.resident?.[blockIndex];
    if (resident !== undefined) {
      return decodeRefcount(resident, clusterIndex - blockIndex * this.entriesPerBlock, this.refcountBits);
    }
    const { high, low } = this.tableEntry(blockIndex);
    const hostOffset = reftableEntryOffset(high, low);
    if (hostOffset === 0) return 0;
    if (!reftableEntryAligned(low, this.clusterSize)) return this.unreadable(blockIndex, 'unaligned');
    if (high >= UNREADABLE_OFFSET_HIGH) return this.unreadable(blockIndex, 'unreadable');
    const block = this.cache.get(blockIndex);
    if (block === undefined) return undefined;
    return decodeRefcount(block, clusterIndex - blockIndex * this.entriesPerBlock, this.refcountBits);
  }

  private unreadable(blockIndex: number, why: 'unaligned' | 'unreadable'): StoredRefcount {
    if (why === 'unreadable') return { error: 'Input/output error' };
    const { high, low } = this.tableEntry(blockIndex);
    return {
      error: 'Input/output error',
      unalignedBlock: { index: blockIndex, offsetHex: entryHex(high, low & 0xffff_fe00) },
    };
  }

  /**
   * The stored refcount of `clusterIndex` in decimal, exact even above 2^53 (64-bit refcounts),
   * when its block is cached; otherwise `approximate` as text. For messages.
   */
  exactText(clusterIndex: number, approximate: number): string {
    if (approximate <= Number.MAX_SAFE_INTEGER || this.refcountBits !== 64) return String(approximate);
    const blockIndex = Math.floor(clusterIndex / this.entriesPerBlock);
    const block = this.resident?.[blockIndex] ?? this.cache.get(blockIndex);
    if (block === undefined) return String(approximate);
    const at = (clusterIndex - blockIndex * this.entriesPerBlock) * 8;
    return new DataView(block.buffer, block.byteOffset + at, 8).getBigUint64(0).toString();
  }

  /**
   * Reads every readable refcount block into memory when together they take at most `maxBytes`
   * (otherwise nothing: blocks are then read on demand and a few kept), in a few
   * large reads (blocks next to each other in the file are read at once), several in flight.
   * Afterwards {@link peek} answers without I/O for every block but unreadable ones.
   */
  async preload(request?: RequestOptions, maxBytes = PRELOAD_MAX_BYTES): Promise<void> {
    if (this.resident !== undefined) return;
    const { clusterSize } = this;
    const wanted: { blockIndex: number; hostOffset: number }[] = [];
    for (const blockIndex of this.usedTableEntries()) {
      const high = this.tableHigh(blockIndex);
      const low = this.tableLow(blockIndex);
      const hostOffset = reftableEntryOffset(high, low);
      if (hostOffset === 0 || !reftableEntryAligned(low, clusterSize) || high >= UNREADABLE_OFFSET_HIGH)
        continue;
      wanted.push({ blockIndex, hostOffset });
    }
    if (wanted.length * clusterSize > maxBytes) return;
    const resident: (Uint8Array | undefined)[] = new Array(this.tableEntries);
    // Runs of blocks that lie back to back in the file (and in table order) share one read.
    const runs: { first: number; count: number }[] = [];
    for (let k = 0; k < wanted.length; ) {
      let count = 1;
      while (
        k + count < wanted.length &&
        (count + 1) * clusterSize <= PRELOAD_READ_BYTES &&
        wanted[k + count]!.hostOffset === wanted[k]!.hostOffset + count * clusterSize
      )
        count++;
      runs.push({ first: k, count });
      k += count;
    }
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < runs.length) {
        const { first, count } = runs[next++]!;
        const start = wanted[first]!.hostOffset;
        const bytes = await readZeroPadded(this.file, start, count * clusterSize, request);
        for (let j = 0; j < count; j++) {
          resident[wanted[first + j]!.blockIndex] = bytes.subarray(j * clusterSize, (j + 1) * clusterSize);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(PRELOAD_READS_IN_FLIGHT, runs.length) }, worker));
    this.resident = resident;
    this.cache.clear();
  }

  /**
   * Replaces the in-memory copy of block `blockIndex` after the caller wrote `bytes` there (so a
   * later lookup sees what the file now holds).
   */
  replaceBlock(blockIndex: number, bytes: Uint8Array): void {
    if (this.resident !== undefined) this.resident[blockIndex] = bytes;
    if (this.cache.has(blockIndex)) this.cache.set(blockIndex, bytes);
  }

  /** Entry `index` of a refcount block read with {@link block}. */
  decode(block: Uint8Array, index: number): number {
    return decodeRefcount(block, index, this.refcountBits);
  }

  /**
   * The refcount block for table index `blockIndex`: undefined when there is none (all zeros),
   * 'unaligned' when its offset is not cluster aligned, 'unreadable' when the offset is beyond what
   * QEMU's block layer reads (about 2^63): both make its refcounts unreadable.
   */
  async block(
    blockIndex: number,
    request?: RequestOptions,
  ): Promise<Uint8Array | undefined | 'unaligned' | 'unreadable'> {
    if (blockIndex >= this.tableEntries) return undefined;
    const { high, low } = this.tableEntry(blockIndex);
    const hostOffset = reftableEntryOffset(high, low);
    if (hostOffset === 0) return undefined;
    if (!reftableEntryAligned(low, this.clusterSize)) return 'unaligned';
    if (high >= UNREADABLE_OFFSET_HIGH) return 'unreadable';
    const resident = this.resident?.[blockIndex];
    if (resident !== undefined) return resident;
    const cached = this.cache.get(blockIndex);
    if (cached !== undefined) {
      this.cache.delete(blockIndex);
      this.cache.set(blockIndex, cached);
      return cached;
    }
    const bytes = await readZeroPadded(this.file, hostOffset, this.clusterSize, request);
    if (this.cache.size >= Math.max(MIN_CACHED_BLOCKS, BLOCK_CACHE_BYTES / this.clusterSize)) {
      const oldest = this.cache.keys().next().value;
      if (oldest !== undefined) this.cache.delete(oldest);
    }
    this.cache.set(blockIndex, bytes);
    return bytes;
  }
}

/**
 * The indexes of the non-zero 64-bit entries of a table given as 32-bit words. A function called
 * once per table: V8 optimizes its loop on the stack and has no reason to compile it again (a
 * method that returns the kept result on later calls would be optimized a second time).
 */
function nonZeroEntries(words: Uint32Array): number[] {
  const used: number[] = [];
  const entries = words.length / 2;
  for (let index = 0; index < entries; index++) {
    if ((words[index * 2]! | words[index * 2 + 1]!) !== 0) used.push(index);
  }
  return used;
}

/** Entry `index` of a refcount block of `refcountBits`-bit entries. */
export function decodeRefcount(block: Uint8Array, index: number, refcountBits: number): number {
  switch (refcountBits) {
    case 1:
    case 2:
    case 4: {
      const bitIndex = index * refcountBits;
      return (block[bitIndex >>> 3]! >>> (bitIndex & 7)) & ((1 << refcountBits) - 1);
    }
    case 8:
      return block[index]!;
    case 16:
      return (block[index * 2]! << 8) | block[index * 2 + 1]!;
    case 32: {
      const at = index * 4;
      return ((block[at]! << 24) >>> 0) + ((block[at + 1]! << 16) | (block[at + 2]! << 8) | block[at + 3]!);
    }
    default: {
      const at = index * 8;
      const high =
        ((block[at]! << 24) >>> 0) + ((block[at + 1]! << 16) | (block[at + 2]! << 8) | block[at + 3]!);
      const low =
        ((block[at + 4]! << 24) >>> 0) + ((block[at + 5]! << 16) | (block[at + 6]! << 8) | block[at + 7]!);
      return high * TWO_POW_32 + low;
    }
  }
}
