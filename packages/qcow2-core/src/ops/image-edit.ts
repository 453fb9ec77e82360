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
 * Refcounts are written in place where refcount blocks exist; when a cluster needs a refcount
 * block that does not exist yet, the refcount structures are rebuilt (new blocks and table, header
 * switched in one write, old structures freed).
 */
import { type BlockDevice, BlockDeviceError, type RequestOptions } from '@qcowkit/blockdev';
import { inspectQcow2Image, loadHeader } from '../check/check.js';
import { classifyL2Entry, decodeCompressedDescriptor, entryOffset } from '../check/entries.js';
import { countsOf, rebuildRefcountStructure } from '../check/rebuild-refcounts.js';
import { repairQcow2Image } from '../check/repair.js';
import { repairCopiedFlags } from '../check/repair-copied.js';
import { StoredRefcounts } from '../check/stored-refcounts.js';
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

export class ImageEdit {
  private constructor(
    readonly file: BlockDevice,
    public header: Qcow2Header,
    /** Reference count of every host cluster, as the edit will leave it. */
    readonly counts: number[],
    readonly request: RequestOptions,
  ) {}

  /** Checks the image and starts an edit; refuses a read-only file and a damaged image. A dirty
   * one (lazy refcounts, not closed cleanly) is repaired first. */
  static async open(file: BlockDevice, options: ImageEditOptions = {}): Promise<ImageEdit> {
    if (file.readOnly) {
      throw new BlockDeviceError('EROFS', `qcow2: ${file.description}: the file is read-only`);
    }
    const request: RequestOptions = options.signal === undefined ? {} : { signal: options.signal };
    const head = await loadHeader(file, request);
    const incompatible = head.incompatibleFeatures.low;
    if ((incompatible & QCOW2_INCOMPAT_DIRTY) !== 0 && (incompatible & QCOW2_INCOMPAT_CORRUPT) === 0) {
      // Left dirty (lazy refcounts): repaired first, as QEMU does when it opens one for writing.
      await repairQcow2Image({ file, header: head }, 'all', request);
    }
    const inspection = await inspectQcow2Image({ file }, request);
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
    return new ImageEdit(file, header, countsOf(inspection.computed, header.refcountOrder), request);
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
    let start = 1;
    for (;;) {
      let run = 0;
      while (run < clusters && (this.counts[start + run] ?? 0) === 0) run++;
      if (run === clusters) break;
      start += run + 1;
    }
    for (let k = 0; k < clusters; k++) this.counts[start + k] = 1;
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

  /** Adds `delta` references to every L2 table and data cluster an L1 table reaches (not the L1 table itself). */
  async addL1References(l1TableOffset: number, l1Size: number, delta: number): Promise<void> {
    if (l1Size === 0) return;
    const { clusterSize, extendedL2, hasDataFile } = this;
    const l2EntryBytes = extendedL2 ? 16 : 8;
    const l1 = await this.file.read(l1TableOffset, l1Size * 8, this.request);
    const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    for (let i = 0; i < l1Size; i++) {
      const l2Offset = entryOffset(l1View.getUint32(i * 8), l1View.getUint32(i * 8 + 4));
      if (l2Offset === 0) continue;
      this.addReferences(l2Offset, clusterSize, delta);
      const table = await this.file.read(l2Offset, clusterSize, this.request);
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      for (let at = 0; at < clusterSize; at += l2EntryBytes) {
        const high = view.getUint32(at);
        const low = view.getUint32(at + 4);
        if (high === 0 && low === 0) continue;
        switch (classifyL2Entry(high, low, extendedL2, hasDataFile)) {
          case 'normal':
          case 'zero-alloc':
            if (!hasDataFile) this.addReferences(entryOffset(high, low), clusterSize, delta);
            break;
          case 'compressed': {
            const extent = decodeCompressedDescriptor(high, low, this.header.clusterBits);
            this.addReferences(extent.hostOffset, extent.length, delta);
            break;
          }
          default:
            break;
        }
      }
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

  /** Makes the stored refcounts equal the planned ones (durable when it resolves). */
  async commitRefcounts(): Promise<void> {
    const { clusterSize } = this;
    const refcountOrder = this.header.refcountOrder;
    const stored = await this.loadStored();
    const perBlock = stored.entriesPerBlock;
    const changed = new Map<number, { hostOffset: number; bytes: Uint8Array }>();
    let rebuild = false;
    for (let start = 0; start < this.counts.length && !rebuild; ) {
      const blockIndex = Math.floor(start / perBlock);
      const blockEnd = Math.min(this.counts.length, (blockIndex + 1) * perBlock);
      const block = await stored.block(blockIndex, this.request);
      for (let clusterIndex = start; clusterIndex < blockEnd; clusterIndex++) {
        const count = this.counts[clusterIndex] ?? 0;
        if (typeof block === 'string' || block === undefined) {
          if (count !== 0) rebuild = true;
          continue;
        }
        const index = clusterIndex - blockIndex * perBlock;
        if (stored.decode(block, index) === count) continue;
        let copy = changed.get(blockIndex);
        if (copy === undefined) {
          const { high, low } = stored.tableEntry(blockIndex);
          copy = { hostOffset: entryOffset(high, low), bytes: block.slice() };
          changed.set(blockIndex, copy);
        }
        encodeRefcount(copy.bytes, index, refcountOrder, count);
      }
      start = blockEnd;
    }
    if (!rebuild) {
      for (const { hostOffset, bytes } of changed.values())
        await this.file.write(hostOffset, bytes, this.request);
      if (changed.size > 0) await this.file.flush(this.request);
      return;
    }
    // Some cluster needs a refcount block that does not exist: new structures for everything.
    const old: number[] = [];
    for (let k = 0; k < this.header.refcountTableClusters; k++) {
      old.push(this.header.refcountTableOffset + k * clusterSize);
    }
    for (let index = 0; index < stored.tableEntries; index++) {
      const { high, low } = stored.tableEntry(index);
      const hostOffset = entryOffset(high, low);
      if (hostOffset !== 0) old.push(hostOffset);
    }
    await this.ensureFileSize();
    await rebuildRefcountStructure(this.file, this.counts, { clusterSize, refcountOrder }, this.request);
    this.header = await loadHeader(this.file, this.request);
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
        }
      : await this.loadStored();
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

  private loadStored(): Promise<StoredRefcounts> {
    return StoredRefcounts.load(this.file, {
      clusterSize: this.clusterSize,
      refcountBits: 2 ** this.header.refcountOrder,
      refcountTableOffset: this.header.refcountTableOffset,
      refcountTableClusters: this.header.refcountTableClusters,
      request: this.request,
    });
  }
}

/** Big-endian u64 of a safe integer into `view` at `at`. */
export function setU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, Math.floor(value / 0x1_0000_0000));
  view.setUint32(at + 4, value >>> 0);
}
