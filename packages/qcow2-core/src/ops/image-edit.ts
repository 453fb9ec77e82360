/**
 * Offline metadata edits on a qcow2 file (snapshots, resize, amend, commit, rebase), with the
 * refcounts planned in memory first.
 *
 * An edit starts from a check of the image (refused when it finds corruptions: repair first; a
 * dirty image is repaired first, as QEMU does when it opens one for writing), so
 * it knows the true reference count of every host cluster. Operations allocate clusters from that
 * picture (first fit over clusters nothing references), count the references they add or drop,
 * and write in the safe order: new tables written and refcounts raised (durable) before anything
 * points at them; refcounts lowered only after nothing points at them any more. A crash between
 * two steps leaves at worst leaked clusters, which `check -r leaks` frees.
 *
 * Committing the plan (one implementation for every operation): the stored refcount blocks are
 * kept in memory, equal to what the file holds (those the opening check read, when they fit its
 * budget; otherwise read on demand), compared with the plan in one pass, the blocks that changed
 * written together (several in flight), then one flush. When a cluster needs a refcount block that
 * does not exist yet, the refcount structures are rebuilt (new blocks and table, header switched
 * in one write, old structures freed).
 */
import { type BlockDevice, BlockDeviceError, type RequestOptions } from '@qcowkit/blockdev';
import { inspectQcow2Image, loadHeader } from '../check/check.js';
import { entryOffset } from '../check/entries.js';
import { countsOf, type RefcountLayout, rebuildRefcountStructure } from '../check/rebuild-refcounts.js';
import { repairQcow2Image } from '../check/repair.js';
import { repairCopiedFlags } from '../check/repair-copied.js';
import { StoredRefcounts } from '../check/stored-refcounts.js';
import { WriteBehind } from '../check/write-behind.js';
import {
  QCOW2_INCOMPAT_CORRUPT,
  QCOW2_INCOMPAT_DATA_FILE,
  QCOW2_INCOMPAT_DIRTY,
  QCOW2_INCOMPAT_EXTL2,
} from '../format/feature-bits.js';
import type { Qcow2Header } from '../format/header.js';
import { encodeRefcount, maxRefcount } from '../format/refcount.js';

export interface ImageEditOptions {
  readonly signal?: AbortSignal;
}

/** Changed refcount blocks being written at once. */
const WRITES_IN_FLIGHT = 16;

/** The stored refcounts, and the refcount table they were read through. */
interface KeptRefcounts {
  readonly table: string;
  readonly stored: StoredRefcounts;
}

export class ImageEdit {
  /** The stored refcounts, equal to the file's (dropped when unsure, e.g. after a failed write). */
  #kept: KeptRefcounts | undefined;

  private constructor(
    readonly file: BlockDevice,
    public header: Qcow2Header,
    /** Reference count of every host cluster, as the edit will leave it. */
    readonly counts: number[],
    readonly request: RequestOptions,
    stored: StoredRefcounts,
    /** Most bytes of refcount blocks held in memory at once (see StoredRefcounts.load). */
    private readonly preloadMaxBytes: number | undefined,
  ) {
    this.#kept = { table: refcountTableKey(header), stored };
  }

  /** Checks the image and starts an edit; refuses a read-only file and a damaged image. A dirty
   * one (lazy refcounts, not closed cleanly) is repaired first. */
  static async open(
    file: BlockDevice,
    options: ImageEditOptions = {},
    /** Tuning: refcount blocks are kept in memory up to this many bytes, read on demand beyond. */
    tuning: { preloadMaxBytes?: number } = {},
  ): Promise<ImageEdit> {
    if (file.readOnly) {
      throw new BlockDeviceError('EROFS', `qcow2: ${file.description}: the file is read-only`);
    }
    const request: RequestOptions = options.signal === undefined ? {} : { signal: options.signal };
    const head = await loadHeader(file, request);
    const incompatible = head.incompatibleFeatures.low;
    const repair =
      (incompatible & QCOW2_INCOMPAT_DIRTY) !== 0 && (incompatible & QCOW2_INCOMPAT_CORRUPT) === 0;
    // Left dirty (lazy refcounts): repaired first, as QEMU does when it opens one for writing.
    if (repair) await repairQcow2Image({ file, header: head }, 'all', request);
    const inspection = await inspectQcow2Image(
      // The repair may have moved the refcount table: then the header is read again.
      repair ? { file } : { file, header: head },
      tuning.preloadMaxBytes === undefined
        ? request
        : { ...request, preloadMaxBytes: tuning.preloadMaxBytes },
    );
    const { result, header } = inspection;
    if (result.corruptions > 0 || result.checkErrors > 0) {
      throw new BlockDeviceError(
        'ECORRUPT',
        `qcow2: ${file.description}: ${result.corruptions} corruptions and ${result.checkErrors} check errors: repair the image first (check -r all)`,
      );
    }
    if ((header.incompatibleFeatures.low & QCOW2_INCOMPAT_DIRTY) !== 0) {
      throw new BlockDeviceError(
        'ECORRUPT',
        `qcow2: ${file.description}: the image is dirty: repair it first (check -r all)`,
      );
    }
    // The refcount blocks the check read serve the first commit (read again only if the
    // refcount table moves).
    const stats = { highest: 0 };
    const edit = new ImageEdit(
      file,
      header,
      countsOf(inspection.computed, header.refcountOrder, stats),
      request,
      inspection.stored,
      tuning.preloadMaxBytes,
    );
    edit.#highest = stats.highest;
    return edit;
  }

  /** The highest planned count, while known without a pass over `counts` (see highestCount). */
  #highest: number | undefined;

  /**
   * The highest planned count. Known from the opening check until counts change other than by
   * {@link allocate}; then found again in one pass (snapshot create asks right after opening and
   * allocating: the pass it saves is ~16 000 clusters of a 1 GiB image, run cold).
   */
  highestCount(): number {
    if (this.#highest === undefined) {
      let highest = 0;
      const counts = this.counts;
      for (let clusterIndex = 0; clusterIndex < counts.length; clusterIndex++) {
        const count = counts[clusterIndex] ?? 0;
        if (count > highest) highest = count;
      }
      this.#highest = highest;
    }
    return this.#highest;
  }

  /** Callers that change `counts` themselves (the tree walks) say so: the highest is then unknown. */
  countsChanged(): void {
    this.#highest = undefined;
  }

  get clusterSize(): number {
    return this.header.clusterSize;
  }

  get extendedL2(): boolean {
    return (this.header.incompatibleFeatures.low & QCOW2_INCOMPAT_EXTL2) !== 0;
  }

  get hasDataFile(): boolean {
    return (this.header.incompatibleFeatures.low & QCOW2_INCOMPAT_DATA_FILE) !== 0;
  }

  /** Allocates `clusters` contiguous free clusters (first fit after the header); returns the host offset. */
  allocate(clusters: number): number {
    if (!Number.isSafeInteger(clusters) || clusters < 1) {
      throw new BlockDeviceError('EINVAL', `qcow2: cannot allocate ${clusters} clusters`);
    }
    const { counts } = this;
    let start = 1;
    for (;;) {
      // The next free cluster found natively (a full image has no free cluster before its end:
      // a loop here would visit every cluster, uncompiled the first time); past the end all are free.
      const free = counts.indexOf(0, start);
      start = free === -1 ? Math.max(start, counts.length) : free;
      let run = 0;
      while (run < clusters && (counts[start + run] ?? 0) === 0) run++;
      if (run === clusters) break;
      start += run + 1;
    }
    for (let k = 0; k < clusters; k++) counts[start + k] = 1;
    if (this.#highest !== undefined && this.#highest < 1) this.#highest = 1;
    return start * this.clusterSize;
  }

  #maxCount: { order: number; max: number } | undefined;

  private maxCount(): number {
    const order = this.header.refcountOrder;
    if (this.#maxCount?.order !== order) this.#maxCount = { order, max: maxRefcount(order) };
    return this.#maxCount.max;
  }

  /** Adds `delta` references to every cluster touched by `[hostOffset, hostOffset + length)`. */
  addReferences(hostOffset: number, length: number, delta: number): void {
    if (length <= 0) return;
    this.#highest = undefined;
    const max = this.maxCount();
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + length - 1) / this.clusterSize);
    for (let clusterIndex = first; clusterIndex <= last; clusterIndex++) {
      const count = (this.counts[clusterIndex] ?? 0) + delta;
      if (count < 0) {
        throw new BlockDeviceError('ECORRUPT', 'qcow2: a cluster would be freed more often than referenced', {
          offset: clusterIndex * this.clusterSize,
        });
      }
      if (count > max) {
        throw new BlockDeviceError(
          'EUNSUPPORTED',
          `qcow2: refcount overflow: ${count} references do not fit in ${2 ** this.header.refcountOrder}-bit refcounts (amend refcount_bits)`,
          { offset: clusterIndex * this.clusterSize },
        );
      }
      this.counts[clusterIndex] = count;
    }
  }

  /** Grows the file to hold every counted cluster (new clusters are written after this). */
  async ensureFileSize(): Promise<void> {
    let last = this.counts.length - 1;
    while (last >= 0 && (this.counts[last] ?? 0) === 0) last--;
    const end = (last + 1) * this.clusterSize;
    if (end > this.file.size) await this.file.resize(end);
  }

  /** Writes `bytes` at `hostOffset` (the file grown first when needed). */
  async write(hostOffset: number, bytes: Uint8Array): Promise<void> {
    if (hostOffset + bytes.length > this.file.size) await this.ensureFileSize();
    await this.file.write(hostOffset, bytes, this.request);
  }

  async flush(): Promise<void> {
    await this.file.flush(this.request);
  }

  /** Writes a header field and flushes; then re-reads the header. */
  async writeHeader(offset: number, bytes: Uint8Array): Promise<void> {
    await this.file.write(offset, bytes, this.request);
    await this.file.flush(this.request);
    this.header = await loadHeader(this.file, this.request);
  }

  /**
   * Makes the stored refcounts equal the planned ones (durable when it resolves): every refcount
   * block that differs from the plan is written (several at once), then the file is flushed once.
   * Changed blocks are written as they are found, so a commit holds no more blocks than the edit
   * keeps anyway (all of them within the budget, a few beyond it), however many it changes.
   * Callers commit in the safe order: raised refcounts before anything points at the clusters,
   * lowered ones after nothing does (so any part of a commit that reaches the file is safe).
   */
  async commitRefcounts(): Promise<void> {
    const { counts, file, request } = this;
    const refcountOrder = this.header.refcountOrder;
    const stored = await this.#storedRefcounts();
    const perBlock = stored.entriesPerBlock;
    // Decided from the table alone, before anything is written.
    for (let blockIndex = 0; blockIndex * perBlock < counts.length; blockIndex++) {
      if (stored.hasBlock(blockIndex)) continue;
      const end = Math.min(counts.length, (blockIndex + 1) * perBlock);
      for (let clusterIndex = blockIndex * perBlock; clusterIndex < end; clusterIndex++) {
        if ((counts[clusterIndex] ?? 0) !== 0) return this.rebuildRefcounts();
      }
    }
    const resident = stored.residentBlocks;
    const wide16 = refcountOrder === 4;
    const writes = new WriteBehind(WRITES_IN_FLIGHT);
    let written = 0;
    try {
      for (let blockIndex = 0; blockIndex * perBlock < counts.length; blockIndex++) {
        if (!stored.hasBlock(blockIndex)) continue; // nothing in use here (see above)
        const block = resident !== undefined ? resident[blockIndex] : await stored.block(blockIndex, request);
        if (!(block instanceof Uint8Array)) continue;
        const base = blockIndex * perBlock;
        const end = Math.min(counts.length, base + perBlock);
        const copy = changedBlock(counts, block, base, end, wide16, stored, refcountOrder);
        if (copy === undefined) continue;
        const hostOffset = entryOffset(stored.tableHigh(blockIndex), stored.tableLow(blockIndex));
        await writes.add(file.write(hostOffset, copy, request));
        // What the file holds once the write lands (a failed write drops what is kept, below).
        stored.replaceBlock(blockIndex, copy);
        written++;
      }
      await writes.drain();
    } catch (error) {
      // Which blocks reached the file is unknown: read them again next time.
      this.#kept = undefined;
      throw error;
    } finally {
      await writes.settle();
    }
    if (written > 0) await file.flush(request);
  }

  /**
   * New refcount structures holding the planned counts, at `refcountOrder`, then the header
   * switched to them (by `switchHeader`, which writes and flushes it, e.g. with the new width
   * too; by default the table's fields alone), then the old structures freed. Commits call it
   * when some cluster needs a refcount block that does not exist; amend, to change the width.
   */
  async rebuildRefcounts(
    refcountOrder = this.header.refcountOrder,
    switchHeader?: (layout: RefcountLayout) => Promise<void>,
  ): Promise<void> {
    const { clusterSize, header, file, request } = this;
    const old: number[] = [];
    for (let k = 0; k < header.refcountTableClusters; k++)
      old.push(header.refcountTableOffset + k * clusterSize);
    // The table as the file holds it (what is kept may be of another table).
    const table = await file.read(
      header.refcountTableOffset,
      header.refcountTableClusters * clusterSize,
      request,
    );
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    for (let at = 0; at < table.length; at += 8) {
      const hostOffset = entryOffset(view.getUint32(at), view.getUint32(at + 4));
      if (hostOffset !== 0) old.push(hostOffset);
    }
    await this.ensureFileSize();
    this.#kept = undefined;
    this.#highest = undefined;
    const layout = await rebuildRefcountStructure(
      file,
      this.counts,
      { clusterSize, refcountOrder },
      request,
      switchHeader === undefined,
    );
    if (switchHeader === undefined) this.header = await loadHeader(file, request);
    else await switchHeader(layout);
    for (const hostOffset of old) this.addReferences(hostOffset, clusterSize, -1);
    await this.commitRefcounts();
  }

  /**
   * Sets the COPIED flags of the active tables from the stored refcounts, or with `planned` from
   * the planned ones. COPIED may be cleared before a refcount rises (a needless copy at worst) but
   * set only once the refcount 1 is durable: use `planned` only to clear flags ahead of an increase.
   */
  async fixCopiedFlags(planned = false): Promise<void> {
    const source = planned
      ? {
          get: async (clusterIndex: number) => this.counts[clusterIndex] ?? 0,
          peek: (clusterIndex: number) => this.counts[clusterIndex] ?? 0,
          plannedCounts: this.counts,
        }
      : await this.#storedRefcounts();
    await repairCopiedFlags(
      this.file,
      source,
      {
        clusterSize: this.clusterSize,
        l1TableOffset: this.header.l1TableOffset,
        l1Size: this.header.l1Size,
        extendedL2: this.extendedL2,
        hasDataFile: this.hasDataFile,
      },
      this.request,
      false,
    );
  }

  /** The stored refcounts, read again only when the refcount table moved or changed width. */
  async #storedRefcounts(): Promise<StoredRefcounts> {
    const { header } = this;
    const table = refcountTableKey(header);
    if (this.#kept?.table === table) return this.#kept.stored;
    this.#kept = undefined;
    const stored = await StoredRefcounts.load(this.file, {
      clusterSize: header.clusterSize,
      refcountBits: 2 ** header.refcountOrder,
      refcountTableOffset: header.refcountTableOffset,
      refcountTableClusters: header.refcountTableClusters,
      request: this.request,
      ...(this.preloadMaxBytes === undefined ? {} : { preloadMaxBytes: this.preloadMaxBytes }),
    });
    this.#kept = { table, stored };
    return stored;
  }
}

/**
 * `block` (the refcount block whose entry 0 is cluster `base`) with the planned counts of clusters
 * `[base, end)`, as a copy; undefined when it already holds them all. A function of its own, out
 * of the async commit: V8 then optimizes these small loops alone, not the whole commit (which in
 * `qcow2 snapshot` cost more CPU than the comparison itself; see ops/tree-references.ts).
 */
function changedBlock(
  counts: readonly number[],
  block: Uint8Array,
  base: number,
  end: number,
  wide16: boolean,
  stored: StoredRefcounts,
  refcountOrder: number,
): Uint8Array | undefined {
  let copy: Uint8Array | undefined;
  if (wide16) {
    for (let clusterIndex = base; clusterIndex < end; clusterIndex++) {
      const count = counts[clusterIndex] ?? 0;
      const index = (clusterIndex - base) * 2;
      if (((block[index]! << 8) | block[index + 1]!) === count) continue;
      copy ??= block.slice();
      copy[index] = count >>> 8;
      copy[index + 1] = count & 0xff;
    }
    return copy;
  }
  for (let clusterIndex = base; clusterIndex < end; clusterIndex++) {
    const count = counts[clusterIndex] ?? 0;
    const index = clusterIndex - base;
    if (stored.decode(block, index) === count) continue;
    copy ??= block.slice();
    encodeRefcount(copy, index, refcountOrder, count);
  }
  return copy;
}

/** Where the refcount table is and how wide its refcounts are: what the kept blocks depend on. */
function refcountTableKey(header: Qcow2Header): string {
  return `${header.refcountTableOffset}:${header.refcountTableClusters}:${header.refcountOrder}`;
}

/** Big-endian u64 of a safe integer into `view` at `at`. */
export function setU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, Math.floor(value / 0x1_0000_0000));
  view.setUint32(at + 4, value >>> 0);
}

/**
 * The check every offline edit runs first, for a change made through the engine instead (a
 * resize that moves persistent bitmaps or an external data file along): a dirty image (lazy
 * refcounts) is repaired, and a damaged one refused (`ECORRUPT`, `repair the image first`), so a
 * write never starts on metadata it could make worse.
 */
export async function refuseDamagedImage(file: BlockDevice, options: ImageEditOptions = {}): Promise<void> {
  await ImageEdit.open(file, options);
}
