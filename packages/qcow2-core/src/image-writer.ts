/**
 * The read-write side of an open qcow2 image: the metadata lock, the refcounts and allocator, the
 * overlap map, header updates, the sticky corrupt state, resize, and the write path.
 *
 * Metadata is written back on flush and close (see mapping/write-path.ts); refcounts always reach
 * the disk before anything pointing at their clusters, also on images with lazy refcounts, so this
 * engine never needs the dirty bit. A dirty image (another program's crash with
 * lazy refcounts) is repaired by Qcow2Image.open before it gets here; a corrupt-flagged one is
 * refused (ECORRUPT).
 */
import { type BlockDevice, BlockDeviceError, isBlockDeviceError } from '@qcowkit/blockdev';
import { MetadataLock } from './alloc/metadata-lock.js';
import { MetadataMap, OverlapError } from './alloc/metadata-map.js';
import { RefcountStore } from './alloc/refcount-store.js';
import { PersistentBitmaps, type PersistentBitmapsContext } from './bitmaps/persistent-bitmaps.js';
import type { TableCache } from './cache/table-cache.js';
import { writeU64 } from './format/binary.js';
import type { Qcow2BitmapEntry } from './format/bitmap-directory.js';
import {
  QCOW2_AUTOCLEAR_BITMAPS,
  QCOW2_AUTOCLEAR_DATA_FILE_RAW,
  QCOW2_INCOMPAT_CORRUPT,
} from './format/feature-bits.js';
import { sizeToL1 } from './format/geometry.js';
import { headerFlags, type Qcow2Header } from './format/header.js';
import { decodeL1Table, l1EntryOffset } from './format/l1-entry.js';
import type { Qcow2SnapshotEntry } from './format/snapshot-table.js';
import type { Qcow2Mapper } from './mapping/qcow2-mapper.js';
import { WritePath } from './mapping/write-path.js';

export interface ImageWriterContext {
  readonly file: BlockDevice;
  /** The external data file (opened writable), when the header names one. */
  readonly dataFile: BlockDevice | undefined;
  readonly description: string;
  readonly header: () => Qcow2Header;
  readonly setHeader: (header: Qcow2Header) => void;
  readonly size: () => number;
  readonly setSize: (size: number) => void;
  readonly snapshotTable: readonly Qcow2SnapshotEntry[];
  /** The bitmap directory (empty without valid bitmaps); `setBitmapDirectory` follows changes. */
  readonly bitmapDirectory: readonly Qcow2BitmapEntry[];
  readonly setBitmapDirectory: (entries: readonly Qcow2BitmapEntry[]) => void;
  readonly mapper: Qcow2Mapper;
  readonly cache: TableCache<DataView>;
  readonly sliceBytes: number;
  readonly readGuest: (buffer: Uint8Array, guestOffset: number) => Promise<void>;
  /** Whether the guest range reads as zeros by its block status (backing chain included), as
   * QEMU's fast zero test sees it (no data read). Without it, no range counts as zeros. */
  readonly readsAsZeros?: (guestOffset: number, length: number) => Promise<boolean>;
  readonly forgetCompressed: (hostOffset: number) => void;
  readonly compress: (input: Uint8Array) => Promise<Uint8Array | undefined>;
  /** See `Qcow2OpenOptions.discardFreedClusters`. */
  readonly discardFreedClusters?: boolean;
}

export class ImageWriter {
  readonly lock = new MetadataLock();
  readonly #context: ImageWriterContext;
  readonly #metadata: MetadataMap;
  readonly #refcounts: RefcountStore;
  readonly #writePath: WritePath;
  readonly #clusterSize: number;
  #l1Offset: number;
  #corruption: BlockDeviceError | undefined;
  /** Persistent dirty bitmaps (undefined when the image has none). */
  #bitmaps: PersistentBitmaps | undefined;

  private constructor(
    context: ImageWriterContext,
    metadata: MetadataMap,
    refcounts: RefcountStore,
    l1Offset: number,
  ) {
    this.#context = context;
    this.#metadata = metadata;
    this.#refcounts = refcounts;
    this.#l1Offset = l1Offset;
    const header = context.header();
    this.#clusterSize = header.clusterSize;
    this.#writePath = new WritePath({
      file: context.file,
      dataFile: context.dataFile,
      dataFileRaw: headerFlags(header).dataFileRaw,
      clusterBits: header.clusterBits,
      extendedL2: headerFlags(header).extendedL2,
      version: header.version,
      hasBacking: header.backingFileName !== undefined && header.backingFileName !== '',
      mapper: context.mapper,
      cache: context.cache,
      sliceBytes: context.sliceBytes,
      refcounts,
      metadata,
      l1: () => ({ ...context.mapper.l1, offset: this.#l1Offset }),
      size: context.size,
      readGuest: context.readGuest,
      forgetCompressed: context.forgetCompressed,
      discardFreed: context.discardFreedClusters === true && context.file.capabilities.discard,
    });
  }

  /** Prepares `context`'s image for writing (see the file comment for what is refused). */
  static async open(context: ImageWriterContext): Promise<ImageWriter> {
    const { file, description } = context;
    const header = context.header();
    const flags = headerFlags(header);
    const refuse = (code: 'EUNSUPPORTED' | 'ECORRUPT' | 'EROFS', why: string): never => {
      throw new BlockDeviceError(code, `qcow2: ${description}: cannot open for writing: ${why}`);
    };
    if (file.readOnly) refuse('EROFS', 'the file is read-only');
    if (flags.corrupt) refuse('ECORRUPT', 'the image is marked corrupt (repair it with check -r all)');
    if (flags.dirty) refuse('ECORRUPT', 'the image is dirty (its refcounts need a repair first)');
    if (flags.dataFile && context.dataFile === undefined)
      refuse('EUNSUPPORTED', 'the external data file is not open (no data file resolver)');
    if (context.dataFile?.readOnly) refuse('EROFS', 'the external data file is read-only');
    const metadata = new MetadataMap(header.clusterSize);
    metadata.add(0, header.clusterSize, 'header');
    // An empty guest has no L1 table (QEMU writes size 0 at offset 0): nothing to protect.
    if (header.l1Size > 0) metadata.add(header.l1TableOffset, header.l1Size * 8, 'l1-table');
    if (header.nbSnapshots > 0) metadata.add(header.snapshotsOffset, 1, 'snapshot-table');
    for (const snapshot of context.snapshotTable) {
      if (snapshot.l1Size > 0) metadata.add(snapshot.l1TableOffset, snapshot.l1Size * 8, 'snapshot-l1-table');
    }
    const { high, low } = context.mapper.l1;
    for (let index = 0; index < high.length; index++) {
      const l2Offset = l1EntryOffset(high[index]!, low[index]!);
      if (l2Offset !== 0) metadata.add(l2Offset, header.clusterSize, 'l2-table');
    }
    let writer: ImageWriter | undefined;
    const refcounts = await RefcountStore.load({
      file,
      clusterBits: header.clusterBits,
      refcountOrder: header.refcountOrder,
      tableOffset: header.refcountTableOffset,
      tableClusters: header.refcountTableClusters,
      metadata,
      writeTablePointer: async (tableOffset, tableClusters) => {
        const bytes = new Uint8Array(12);
        const view = new DataView(bytes.buffer);
        writeU64(view, 0, tableOffset);
        view.setUint32(8, tableClusters);
        await writer!.#patchHeader(48, bytes);
        context.setHeader({
          ...context.header(),
          refcountTableOffset: tableOffset,
          refcountTableClusters: tableClusters,
        });
      },
    });
    writer = new ImageWriter(context, metadata, refcounts, header.l1TableOffset);
    // Unknown autoclear bits (and the bitmaps bit when no valid bitmap is there) are cleared
    // before the first write.
    if (header.version === 3) {
      const known =
        QCOW2_AUTOCLEAR_DATA_FILE_RAW | (context.bitmapDirectory.length > 0 ? QCOW2_AUTOCLEAR_BITMAPS : 0);
      const keep = header.autoclearFeatures.low & known;
      if (header.autoclearFeatures.high !== 0 || header.autoclearFeatures.low !== keep) {
        const bytes = new Uint8Array(8);
        new DataView(bytes.buffer).setUint32(4, keep);
        await writer.#patchHeader(88, bytes);
        context.setHeader({ ...header, autoclearFeatures: { high: 0, low: keep } });
      }
    }
    if (context.bitmapDirectory.length > 0) {
      writer.#bitmaps = await PersistentBitmaps.open(
        writer.#bitmapsContext(),
        context.bitmapDirectory,
        context.size(),
      );
    }
    return writer;
  }

  #bitmapsContext(): PersistentBitmapsContext {
    const context = this.#context;
    return {
      file: context.file,
      description: context.description,
      refcounts: this.#refcounts,
      metadata: this.#metadata,
      header: context.header,
      setHeader: context.setHeader,
      patchHeader: (at, bytes) => this.#patchHeader(at, bytes),
      setDirectory: context.setBitmapDirectory,
    };
  }

  /** Writes header bytes in place (fields within the first sector) and flushes. */
  async #patchHeader(at: number, bytes: Uint8Array): Promise<void> {
    this.#metadata.check(at, bytes.length, 'header', 'header write');
    await this.#context.file.write(at, bytes);
    await this.#context.file.flush();
  }

  /** Runs a change to the image, turning a detected inconsistency into a sticky corrupt state. */
  async #guarded<T>(task: () => Promise<T>): Promise<T> {
    if (this.#corruption !== undefined) throw this.#corruption;
    try {
      return await task();
    } catch (error) {
      await this.#corrupted(error);
      throw error;
    }
  }

  /** Marks the image corrupt when `error` says its structures are inconsistent. */
  async #corrupted(error: unknown): Promise<void> {
    if (error instanceof OverlapError || isBlockDeviceError(error, 'ECORRUPT')) {
      await this.#markCorrupt(error as BlockDeviceError);
    }
  }

  async #markCorrupt(error: BlockDeviceError): Promise<void> {
    this.#corruption ??= new BlockDeviceError(
      'ECORRUPT',
      `qcow2: ${this.#context.description}: marked corrupt, no more writes: ${error.message}`,
      { cause: error },
    );
    const header = this.#context.header();
    if (header.version !== 3) return;
    const low = (header.incompatibleFeatures.low | QCOW2_INCOMPAT_CORRUPT) >>> 0;
    const bytes = new Uint8Array(4);
    new DataView(bytes.buffer).setUint32(0, low);
    try {
      await this.#context.file.write(76, bytes);
      await this.#context.file.flush();
      this.#context.setHeader({
        ...header,
        incompatibleFeatures: { high: header.incompatibleFeatures.high, low },
      });
    } catch {
      // The image is unusable for writing either way.
    }
  }

  get corrupt(): boolean {
    return this.#corruption !== undefined;
  }

  /** The persistent dirty bitmaps, set up on first use when the image has none yet (to add one). */
  async persistentBitmaps(): Promise<PersistentBitmaps> {
    if (this.#corruption !== undefined) throw this.#corruption;
    this.#bitmaps ??= await PersistentBitmaps.open(this.#bitmapsContext(), [], this.#context.size());
    return this.#bitmaps;
  }

  async write(guestOffset: number, data: Uint8Array): Promise<void> {
    if (this.#corruption !== undefined) throw this.#corruption;
    this.#bitmaps?.mark(guestOffset, data.length);
    let done: boolean;
    if (this.lock.tryShared()) {
      // The common case (nothing holds the lock alone): no closures around the in-place write.
      try {
        done = await this.#writePath.tryWriteInPlace(guestOffset, data);
      } catch (error) {
        await this.#corrupted(error);
        throw error;
      } finally {
        this.lock.releaseShared();
      }
    } else {
      done = await this.lock.shared(() =>
        this.#guarded(() => this.#writePath.tryWriteInPlace(guestOffset, data)),
      );
    }
    if (done) return;
    // Allocating: plan under the lock, write the data without it (other requests proceed), then
    // change the mapping under the lock again.
    for (;;) {
      const plan = await this.lock.exclusive(() =>
        this.#guarded(() => this.#writePath.beginWrite(guestOffset, data)),
      );
      if ('wait' in plan) {
        await plan.wait;
        continue;
      }
      try {
        await this.#writePath.writeData(plan);
      } catch (error) {
        await this.lock.exclusive(() => this.#writePath.abortWrite(plan));
        throw error;
      }
      await this.lock.exclusive(() => this.#guarded(() => this.#writePath.finishWrite(plan)));
      return;
    }
  }

  /** Runs a mapping change under the exclusive lock once no allocating write is in flight. */
  async #exclusiveIdle<T>(task: () => Promise<T>): Promise<T> {
    for (;;) {
      let busy: Promise<void> | undefined;
      const result = await this.lock.exclusive(async () => {
        busy = this.#writePath.idle();
        return busy === undefined ? await this.#guarded(task) : undefined;
      });
      if (busy === undefined) return result as T;
      await busy;
    }
  }

  /**
   * Makes `[guestOffset, guestOffset + length)` read as zeros (`'zero'`: QEMU's write zeroes, where
   * `mayUnmap` lets allocated clusters go) or discards it (`'discard'`).
   */
  async writeZeroes(
    guestOffset: number,
    length: number,
    mode: 'zero' | 'discard',
    mayUnmap = false,
  ): Promise<void> {
    this.#bitmaps?.mark(guestOffset, length);
    await this.#exclusiveIdle(() => this.#zeroRange(guestOffset, length, mode, mayUnmap));
  }

  async #zeroRange(
    guestOffset: number,
    length: number,
    mode: 'zero' | 'zero-free' | 'discard',
    mayUnmap = false,
  ): Promise<void> {
    const header = this.#context.header();
    const hasBacking = header.backingFileName !== undefined && header.backingFileName !== '';
    if (mode === 'zero' && !(header.version === 2 && hasBacking)) {
      await this.#zeroLikeQemu(guestOffset, length, mayUnmap);
      return;
    }
    const clusterSize = this.#clusterSize;
    const end = guestOffset + length;
    const size = this.#context.size();
    // Whole clusters (the image's last, short cluster counts as whole when covered to the end).
    const wholeStart = Math.ceil(guestOffset / clusterSize) * clusterSize;
    let wholeEnd = Math.floor(end / clusterSize) * clusterSize;
    if (end === size && end % clusterSize !== 0) wholeEnd = end;
    const partial: [number, number][] = [];
    if (wholeStart >= wholeEnd || mode === 'zero') {
      partial.push([guestOffset, end]);
    } else {
      if (guestOffset < wholeStart) partial.push([guestOffset, wholeStart]);
      if (wholeEnd < end) partial.push([wholeEnd, end]);
      await this.#writePath.zeroOrDiscardClusters(wholeStart, wholeEnd - wholeStart, mode);
    }
    // Partial clusters: a discard over a backing file leaves them (discard is advisory);
    // otherwise they are written as zeros.
    if (mode === 'discard' && hasBacking) return;
    for (const [from, to] of partial) {
      for (let at = from; at < to; at += 1024 * 1024) {
        await this.#writePath.write(at, new Uint8Array(Math.min(1024 * 1024, to - at)));
      }
    }
  }

  /**
   * QEMU's write zeroes (qcow2 v3, or v2 without a backing file), as its block layer splits it at
   * (sub)cluster boundaries (subclusters with extended L2): the aligned part is zeroized (see
   * {@link WritePath.zeroize}); a piece covering part of a (sub)cluster zeroizes the whole
   * (sub)cluster when the rest of it reads as zeros and it holds no data of this image, and is
   * written as zeros otherwise (as is an aligned part QEMU cannot zeroize).
   */
  async #zeroLikeQemu(guestOffset: number, length: number, mayUnmap: boolean): Promise<void> {
    const unit = headerFlags(this.#context.header()).extendedL2 ? this.#clusterSize / 32 : this.#clusterSize;
    const size = this.#context.size();
    const end = guestOffset + length;
    const freesBefore = this.#writePath.pendingFreeCount;
    const readsAsZeros = async (from: number, to: number): Promise<boolean> =>
      to <= from ||
      (this.#context.readsAsZeros !== undefined && (await this.#context.readsAsZeros(from, to - from)));
    const writeZeros = async (from: number, to: number): Promise<void> => {
      for (let at = from; at < to; at += 1024 * 1024) {
        const zeros = new Uint8Array(Math.min(1024 * 1024, to - at));
        // Zeros over clusters of its own go in place: no allocation, nothing to free first.
        if (await this.#writePath.tryWriteInPlace(at, zeros)) continue;
        // Clusters this request unmapped are free for its allocations, as in QEMU (which frees at
        // once): the write-back that makes their L2 changes durable frees them first.
        if (this.#writePath.pendingFreeCount > freesBefore) await this.#writePath.flush();
        await this.#writePath.write(at, zeros);
      }
    };
    const partial = async (from: number, to: number): Promise<void> => {
      const unitStart = Math.floor(from / unit) * unit;
      // A piece reaching the image's end needs no zeros after it.
      const unitEnd = to === size ? size : Math.min(unitStart + unit, size);
      if (
        (await this.#writePath.holdsNoData(unitStart)) &&
        (await readsAsZeros(unitStart, from)) &&
        (await readsAsZeros(to, unitEnd)) &&
        (await this.#writePath.zeroize(unitStart, unitEnd - unitStart, mayUnmap))
      ) {
        return;
      }
      await writeZeros(from, to);
    };
    let position = guestOffset;
    if (position % unit !== 0) {
      const pieceEnd = Math.min(end, Math.ceil(position / unit) * unit);
      await partial(position, pieceEnd);
      position = pieceEnd;
    }
    const alignedEnd = end === size ? end : Math.max(position, Math.floor(end / unit) * unit);
    if (
      alignedEnd > position &&
      !(await this.#writePath.zeroize(position, alignedEnd - position, mayUnmap))
    ) {
      await writeZeros(position, alignedEnd);
    }
    if (end > alignedEnd) await partial(alignedEnd, end);
  }

  /** Writes whole cluster `clusterIndex` compressed (uncompressed when it does not shrink). */
  async writeCompressed(guestOffset: number, data: Uint8Array): Promise<void> {
    if (this.#context.dataFile !== undefined) {
      throw new BlockDeviceError(
        'EUNSUPPORTED',
        `qcow2: ${this.#context.description}: compressed clusters are not allowed with an external data file`,
      );
    }
    this.#bitmaps?.mark(guestOffset, data.length);
    const compressed = await this.#context.compress(data);
    await this.#exclusiveIdle(async () => {
      if (compressed === undefined || compressed.length >= this.#clusterSize - 512) {
        await this.#writePath.write(guestOffset, data);
        return;
      }
      await this.#writePath.writeCompressedCluster(guestOffset / this.#clusterSize, compressed);
    });
  }

  /** Allocates every L2 table and data cluster from `fromGuest` to the end (preallocation=metadata:
   * a new image from 0, a grown one from its old size). */
  async preallocateMetadata(fromGuest = 0, dataFresh = false): Promise<void> {
    await this.#exclusiveIdle(() => this.#writePath.preallocate(this.#context.size(), fromGuest, dataFresh));
  }

  /** Data then metadata durable (the write path's ordered write-back). */
  async flush(): Promise<void> {
    await this.lock.exclusive(() => this.#guarded(() => this.#writePath.flush()));
  }

  /** Grows the guest size (the L1 table moves when it must grow). Shrinking zeroes what falls off. */
  async resize(newSize: number): Promise<void> {
    await this.#exclusiveIdle(async () => {
      {
        const header = this.#context.header();
        const size = this.#context.size();
        if (newSize === size) return;
        this.#bitmaps?.checkResize(newSize);
        if (newSize < size) {
          // Shrink: what falls off reads as zeros (freed where the format allows), so a later
          // grow shows zeros there; the L1 table keeps its size.
          await this.#zeroRange(newSize, size - newSize, 'zero-free');
          // What falls off reads as zeros on disk before the header says the image is smaller.
          await this.#writePath.flush();
          const sizeBytes = new Uint8Array(8);
          writeU64(new DataView(sizeBytes.buffer), 0, newSize);
          await this.#patchHeader(24, sizeBytes);
          this.#context.setHeader({ ...header, size: newSize });
          this.#context.setSize(newSize);
          this.#bitmaps?.resize(newSize);
          await this.#resizeDataFile(size, newSize);
          return;
        }
        // The data file holds the grown range before the header says it is there.
        await this.#resizeDataFile(size, newSize);
        const extendedL2 = headerFlags(header).extendedL2;
        const needed = sizeToL1(newSize, this.#clusterSize, extendedL2);
        const { file } = this.#context;
        let l1Offset = header.l1TableOffset;
        let l1Size = header.l1Size;
        if (needed * 8 > 32 * 1024 * 1024) {
          throw new BlockDeviceError('EINVAL', `resize: ${newSize} bytes need an L1 table above 32 MiB`);
        }
        const old = this.#context.mapper.l1;
        if (needed > l1Size) {
          const clusters = Math.ceil((needed * 8) / this.#clusterSize);
          const start = await this.#refcounts.allocate(clusters);
          await this.#refcounts.commit();
          const bytes = new Uint8Array(clusters * this.#clusterSize);
          const view = new DataView(bytes.buffer);
          for (let index = 0; index < old.high.length; index++) {
            view.setUint32(index * 8, old.high[index]!);
            view.setUint32(index * 8 + 4, old.low[index]!);
          }
          const newOffset = start * this.#clusterSize;
          this.#metadata.check(newOffset, bytes.length, undefined, 'L1 table write');
          await file.write(newOffset, bytes);
          await file.flush();
          const pointer = new Uint8Array(12);
          const pointerView = new DataView(pointer.buffer);
          pointerView.setUint32(0, needed);
          writeU64(pointerView, 4, newOffset);
          await this.#patchHeader(36, pointer);
          // An empty guest's L1 (size 0, offset 0) was never in the map: cluster 0 is the header.
          if (l1Size > 0) this.#metadata.remove(l1Offset, l1Size * 8);
          this.#metadata.add(newOffset, needed * 8, 'l1-table');
          const oldClusters = l1Size === 0 ? 0 : Math.ceil((l1Size * 8) / this.#clusterSize);
          if (oldClusters > 0 && l1Offset !== 0) {
            await this.#refcounts.adjust(l1Offset / this.#clusterSize, oldClusters, -1);
          }
          l1Offset = newOffset;
          l1Size = needed;
          const decoded = decodeL1Table(bytes, needed);
          this.#context.mapper.setL1(decoded.high, decoded.low);
        } else if (needed > old.high.length) {
          const decoded = decodeL1Table(await file.read(l1Offset, needed * 8), needed);
          // Entries past the old guest size may still name the L2 tables a shrink left in place
          // (the table keeps its size): they become live metadata again.
          for (let index = old.high.length; index < needed; index++) {
            const l2Offset = l1EntryOffset(decoded.high[index]!, decoded.low[index]!);
            if (l2Offset !== 0) this.#metadata.add(l2Offset, this.#clusterSize, 'l2-table');
          }
          this.#context.mapper.setL1(decoded.high, decoded.low);
        }
        this.#l1Offset = l1Offset;
        const sizeBytes = new Uint8Array(8);
        writeU64(new DataView(sizeBytes.buffer), 0, newSize);
        await this.#patchHeader(24, sizeBytes);
        this.#context.setHeader({
          ...this.#context.header(),
          size: newSize,
          l1TableOffset: l1Offset,
          l1Size,
        });
        this.#context.setSize(newSize);
        this.#bitmaps?.resize(newSize);
        // A raw data file's grown range is mapped at once, as QEMU does (preallocation=metadata).
        if (this.#context.dataFile !== undefined && headerFlags(header).dataFileRaw) {
          await this.#writePath.preallocate(newSize, size, true);
        }
      }
    });
  }

  /**
   * The external data file follows the guest size, as QEMU truncates it on resize. Grown: bytes it
   * held past the old guest end (never written through this image) are zeroed first, so the grown
   * range reads as zeros there too.
   */
  async #resizeDataFile(oldSize: number, newSize: number): Promise<void> {
    const dataFile = this.#context.dataFile;
    if (dataFile === undefined) return;
    if (newSize > oldSize && dataFile.size > oldSize) {
      const end = Math.min(dataFile.size, newSize);
      await dataFile.writeZeroes(oldSize, end - oldSize, { mayUnmap: true });
    }
    if (dataFile.size === newSize) return;
    // A device of fixed size (a block device) keeps its size when it is large enough.
    if (!dataFile.capabilities.resize && dataFile.size > newSize) return;
    await dataFile.resize(newSize);
  }

  /** Writes what is pending and flushes (the image is consistent on disk afterwards). */
  async close(): Promise<void> {
    await this.lock.exclusive(async () => {
      if (this.#corruption !== undefined) return;
      if (this.#bitmaps !== undefined) {
        // The bits cover data and mapping that are durable before the bitmaps are stored.
        await this.#writePath.flush();
        await this.#guarded(() => this.#bitmaps!.store());
      }
      await this.#writePath.flush(true);
    });
  }
}
