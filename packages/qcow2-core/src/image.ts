/**
 * Qcow2Image: a qcow2 image (v2 or v3) read as a BlockDevice, read-only for now.
 *
 * Opening validates the header and every table position before use; reads walk the L1 table and
 * cached L2 slices, coalesce contiguous host ranges into single reads straight into the caller's
 * buffer, and run several I/Os in parallel. Unallocated clusters fall through to the backing device.
 */
import {
  assertOpen,
  type BlockDevice,
  type BlockDeviceCapabilities,
  BlockDeviceError,
  blockStatusAll,
  type RequestKind,
  type RequestOptions,
  throwIfAborted,
  validateRange,
  validateSize,
  type WriteOptions,
  type WriteZeroesOptions,
} from '@qcowkit/blockdev';
import type { PersistentBitmaps } from './bitmaps/persistent-bitmaps.js';
import { readBitmapDirectory } from './bitmaps/read-directory.js';
import { TableCache } from './cache/table-cache.js';
import type { Qcow2CheckOptions, Qcow2CheckResult } from './check/types.js';
import { pureCodecs, type Qcow2Codecs } from './codecs.js';
import { planQcow2Create, type Qcow2CreateOptions, writeQcow2Layout } from './create.js';
import { hex } from './format/binary.js';
import type { Qcow2BitmapEntry } from './format/bitmap-directory.js';
import { sizeToL1 } from './format/geometry.js';
import {
  decodeHeader,
  headerFlags,
  peekClusterSize,
  QCOW_CRYPT_NONE,
  type Qcow2Header,
} from './format/header.js';
import { decodeL1Table } from './format/l1-entry.js';
import { decodeRefcount, decodeRefcountTable, refcountsPerBlock } from './format/refcount.js';
import type { Qcow2SnapshotEntry } from './format/snapshot-table.js';
import { ImageWriter } from './image-writer.js';
import { CompressedClusterReader } from './mapping/compressed-reader.js';
import { LOOKUP_UNALLOCATED, LOOKUP_ZERO, Qcow2Mapper } from './mapping/qcow2-mapper.js';
import { readClipped, type SegmentSource } from './mapping/read-segments.js';
import type { Segment } from './mapping/segment.js';
import { MAX_CHAIN_DEPTH, type Qcow2OpenOptions } from './options.js';
import { ReadOnlyImage } from './read-only-image.js';
import { findSnapshot, readSnapshotTable } from './snapshot/snapshot-list.js';

/** A snapshot as listed by {@link Qcow2Image.snapshots}. */
export interface Qcow2SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  icount: number | undefined;
  /** Guest size of the snapshot (the image's size when the entry does not record it). */
  diskSize: number;
}

/** Default L2 cache cap: QEMU on Linux caps its L2 cache at 32 MiB. */
export const DEFAULT_L2_CACHE_MAX_BYTES = 32 * 1024 * 1024;
const MAX_SLICE_BYTES = 64 * 1024;
const DEFAULT_CONCURRENCY = 8;
/** Decompressed clusters kept for sequential small reads of one compressed cluster. */
const COMPRESSED_CACHE_CLUSTERS = 4;

/**
 * Raw metadata access for tools that examine an image's structures themselves (check, dump,
 * repair later). Nothing is cached or validated beyond the file's bounds; decode with the
 * format codecs (`decodeL2Entry`, `decodeRefcount`, ...).
 */
export interface Qcow2MetadataReader {
  /** The image file. */
  readonly file: BlockDevice;
  /** The decoded, validated header (extensions included). */
  readonly header: Qcow2Header;
  /** The decoded snapshot table. */
  readonly snapshotTable: readonly Qcow2SnapshotEntry[];
  /** The raw bitmap directory entries (empty when the bitmaps extension is absent or stale). */
  readonly bitmapDirectory: readonly Qcow2BitmapEntry[];
  /** The whole active L1 table (l1_size entries) as 32-bit halves. */
  readL1Table(options?: RequestOptions): Promise<{ high: Uint32Array; low: Uint32Array }>;
  /** One L2 table (a cluster) at `hostOffset`. */
  readL2Table(hostOffset: number, options?: RequestOptions): Promise<Uint8Array>;
  /** Refcount block host offsets, one per refcount table entry (0 = none). */
  readRefcountTable(options?: RequestOptions): Promise<number[]>;
  /** One refcount block (a cluster) at `hostOffset`. */
  readRefcountBlock(hostOffset: number, options?: RequestOptions): Promise<Uint8Array>;
  /** `length` bytes of the file at `hostOffset`, zeros past its end. */
  readHostBytes(hostOffset: number, length: number, options?: RequestOptions): Promise<Uint8Array>;
}

export class Qcow2Image extends ReadOnlyImage implements Qcow2MetadataReader {
  readonly file: BlockDevice;
  /** The decoded header; replaced when the image's header changes (writable images). */
  header: Qcow2Header;
  readonly version: 2 | 3;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly refcountBits: number;
  /** Guest size; changes only through `resize`. */
  size: number;
  readonly dirty: boolean;
  readonly corrupt: boolean;
  readonly lazyRefcounts: boolean;
  readonly extendedL2: boolean;
  readonly compressionType: 'zlib' | 'zstd';
  readonly backingFileName: string | undefined;
  readonly backingFormat: string | undefined;
  readonly dataFileName: string | undefined;
  readonly dataFileRaw: boolean;
  readonly encrypted: boolean;
  readonly description: string;
  capabilities: BlockDeviceCapabilities;
  /** The decoded snapshot table (raw entries). */
  readonly snapshotTable: readonly Qcow2SnapshotEntry[];
  readonly snapshots: readonly Qcow2SnapshotInfo[];
  /** The snapshot this image shows, when opened on one. */
  readonly openedSnapshot: Qcow2SnapshotInfo | undefined;
  /** Depth of this image in its chain (0 = top). */
  readonly chainDepth: number;
  /** The raw bitmap directory entries. */
  bitmapDirectory: readonly Qcow2BitmapEntry[] = [];

  /** Persistent dirty bitmaps (as `qemu-img info` lists them: name, granularity, flags). */
  get bitmaps(): readonly Qcow2BitmapInfo[] {
    return this.bitmapDirectory.map(toBitmapInfo);
  }

  #dataFile: BlockDevice | undefined;
  #backing: BlockDevice | undefined;
  #mapper!: Qcow2Mapper;
  readonly #l2Cache: TableCache<DataView>;
  readonly #compressed: CompressedClusterReader;
  readonly #codecs: Qcow2Codecs;
  readonly #concurrency: number;
  readonly #discardFreedClusters: boolean;
  #source!: SegmentSource;
  #writer: ImageWriter | undefined;

  private constructor(
    file: BlockDevice,
    header: Qcow2Header,
    snapshotTable: Qcow2SnapshotEntry[],
    openedSnapshot: Qcow2SnapshotInfo | undefined,
    options: Qcow2OpenOptions,
  ) {
    super();
    const flags = headerFlags(header);
    this.file = file;
    this.header = header;
    this.version = header.version;
    this.clusterSize = header.clusterSize;
    this.clusterBits = header.clusterBits;
    this.refcountBits = 2 ** header.refcountOrder;
    this.size = options.snapshotSize === 'snapshot' ? (openedSnapshot?.diskSize ?? header.size) : header.size;
    this.dirty = flags.dirty;
    this.corrupt = flags.corrupt;
    this.lazyRefcounts = flags.lazyRefcounts;
    this.extendedL2 = flags.extendedL2;
    this.compressionType = flags.compressionType;
    this.backingFileName = header.backingFileName;
    this.backingFormat = header.extensions.backingFormat;
    this.dataFileName = flags.dataFile ? header.extensions.dataFileName : undefined;
    this.dataFileRaw = flags.dataFile && flags.dataFileRaw;
    this.encrypted = header.cryptMethod !== QCOW_CRYPT_NONE;
    this.snapshotTable = snapshotTable;
    this.snapshots = snapshotTable.map((entry) => toSnapshotInfo(entry, header.size));
    this.openedSnapshot = openedSnapshot;
    this.chainDepth = options.chainDepth ?? 0;
    this.description =
      options.description ?? `qcow2:${file.description}${openedSnapshot ? `@${openedSnapshot.id}` : ''}`;
    this.capabilities = {
      discard: false,
      writeZeroes: false,
      fastZero: false,
      blockStatus: true,
      flush: false,
      fua: false,
      resize: false,
      minimumAlignment: 1,
      preferredAlignment: Math.min(this.clusterSize, 65536),
      maximumTransfer: 32 * 1024 * 1024,
    };
    const sliceBytes = Math.min(this.clusterSize, MAX_SLICE_BYTES);
    const neededL2Bytes = sizeToL1(this.size, this.clusterSize, this.extendedL2) * this.clusterSize;
    const cacheBytes = options.l2CacheBytes ?? Math.min(DEFAULT_L2_CACHE_MAX_BYTES, neededL2Bytes);
    this.#l2Cache = new TableCache<DataView>(Math.max(cacheBytes, 2 * sliceBytes));
    this.#codecs = options.codecs ?? pureCodecs;
    this.#compressed = new CompressedClusterReader({
      file: this.file,
      codecs: this.#codecs,
      clusterSize: this.clusterSize,
      algorithm: this.compressionType === 'zstd' ? 'zstd' : 'deflate',
      label: `compressed cluster (${this.compressionType})`,
      cachedClusters: COMPRESSED_CACHE_CLUSTERS,
    });
    this.#concurrency = options.concurrency ?? DEFAULT_CONCURRENCY;
    this.#discardFreedClusters = options.discardFreedClusters === true;
  }

  /**
   * Creates a new, empty image in `file` (its content is replaced) laid out as qemu-img create
   * does, and returns it opened for writing. Open options (`resolveBacking`, `codecs`, ...) apply.
   * With an external data file, `resolveDataFile` supplies it (writable; the caller creates it, at
   * the guest size as qemu-img does); without a resolver the image opens read-only. A raw data
   * file (`dataFileRaw`) gets its whole guest range mapped, as qemu-img create does.
   */
  static async create(
    file: BlockDevice,
    options: Qcow2CreateOptions & Omit<Qcow2OpenOptions, 'readOnly' | 'snapshot' | 'snapshotSize'>,
  ): Promise<Qcow2Image> {
    const plan = planQcow2Create(options);
    await writeQcow2Layout(file, plan);
    const { size: _size, ...openOptions } = options;
    const noDataFile = plan.dataFile !== undefined && options.resolveDataFile === undefined;
    const image = await Qcow2Image.open(file, { ...openOptions, readOnly: noDataFile });
    if (plan.preallocation === 'metadata' || plan.dataFileRaw) {
      if (image.#writer === undefined) {
        await image.close();
        throw new BlockDeviceError(
          'EINVAL',
          `qcow2 create: ${plan.dataFileRaw ? 'data_file_raw' : 'metadata preallocation'} needs the data file (resolveDataFile)`,
        );
      }
      // A new image: its data file (the caller's, just made) holds nothing stale to zero.
      await image.#writer.preallocateMetadata(0, true);
    }
    return image;
  }

  /** Opens the qcow2 image stored in `file`. See {@link Qcow2OpenOptions}. */
  static async open(file: BlockDevice, options: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    if (options.readOnly === false && options.snapshot !== undefined) {
      throw new BlockDeviceError('EINVAL', `qcow2: ${file.description}: a snapshot opens read-only`);
    }
    const chainDepth = options.chainDepth ?? 0;
    if (chainDepth >= MAX_CHAIN_DEPTH) {
      throw new BlockDeviceError(
        'EINVAL',
        `qcow2: ${file.description}: backing chain longer than ${MAX_CHAIN_DEPTH} layers`,
      );
    }
    if (file.size < 72) {
      throw new BlockDeviceError('ECORRUPT', `qcow2 header: file too short (${file.size} bytes)`, {
        offset: 0,
      });
    }
    const head = await file.read(0, Math.min(file.size, 4096));
    const clusterSize = peekClusterSize(head);
    const firstCluster =
      clusterSize <= head.length ? head : await file.read(0, Math.min(file.size, clusterSize));
    const header = decodeHeader(firstCluster);
    if (options.readOnly === false && headerFlags(header).dirty && !headerFlags(header).corrupt) {
      // A dirty image (lazy refcounts, not closed cleanly) gets its refcounts rebuilt before any
      // write, as QEMU does; the repair clears the dirty bit when the image is consistent again.
      const inspected = await Qcow2Image.open(file, {
        readOnly: true,
        openBacking: false,
        ...(options.codecs !== undefined ? { codecs: options.codecs } : {}),
      });
      const { repairQcow2Image } = await import('./check/index.js');
      await repairQcow2Image(inspected, 'all');
      const again = decodeHeader(await file.read(0, Math.min(file.size, clusterSize)));
      if (headerFlags(again).dirty) {
        throw new BlockDeviceError(
          'ECORRUPT',
          `qcow2: ${file.description}: the dirty image could not be repaired`,
        );
      }
      return Qcow2Image.open(file, options);
    }
    if (header.cryptMethod !== QCOW_CRYPT_NONE) {
      throw new BlockDeviceError(
        'EUNSUPPORTED',
        `qcow2: ${file.description}: encrypted images are not supported`,
      );
    }
    validateTablePositions(header, file.size);
    const snapshotTable = await readSnapshotTable(file, header);
    let openedSnapshot: Qcow2SnapshotInfo | undefined;
    let l1Offset = header.l1TableOffset;
    let l1Size = header.l1Size;
    if (options.snapshot !== undefined) {
      const entry = findSnapshot(snapshotTable, options.snapshot);
      openedSnapshot = toSnapshotInfo(entry, header.size);
      l1Offset = entry.l1TableOffset;
      l1Size = entry.l1Size;
      const extendedL2 = headerFlags(header).extendedL2;
      const needed = sizeToL1(openedSnapshot.diskSize, clusterSize, extendedL2);
      if (l1Size < needed) {
        throw new BlockDeviceError(
          'ECORRUPT',
          `snapshot ${entry.id}: L1 table is too small for its disk size`,
        );
      }
      if (l1Offset + l1Size * 8 > file.size) {
        throw new BlockDeviceError(
          'ECORRUPT',
          `snapshot ${entry.id}: L1 table lies past the end of the file`,
          {
            offset: l1Offset,
          },
        );
      }
    }
    const image = new Qcow2Image(file, header, snapshotTable, openedSnapshot, options);
    image.bitmapDirectory = await readBitmapDirectory(file, header);
    const l1Count = Math.min(l1Size, sizeToL1(image.size, clusterSize, image.extendedL2));
    const l1 = decodeL1Table(
      l1Count > 0 ? await file.read(l1Offset, l1Count * 8) : new Uint8Array(0),
      l1Count,
    );
    image.#mapper = new Qcow2Mapper({
      readMetadata: (hostOffset, length) => file.read(hostOffset, length),
      get fileSize() {
        return file.size;
      },
      l1High: l1.high,
      l1Low: l1.low,
      clusterBits: header.clusterBits,
      extendedL2: image.extendedL2,
      hasDataFile: headerFlags(header).dataFile,
      cache: image.#l2Cache,
      sliceBytes: Math.min(clusterSize, MAX_SLICE_BYTES),
      // Read-only images load the L2 slices of a long lookup in parallel.
      readAhead: options.readOnly !== false,
    });
    try {
      await image.#openExternalFiles(options);
    } catch (error) {
      await image.#dataFile?.close();
      throw error;
    }
    image.#source = {
      dataDevice: image.#dataFile ?? (headerFlags(header).dataFile ? undefined : file),
      backing: image.#backing,
      readCompressed: (descriptor, compressedBytes, into) =>
        image.#compressed.read(descriptor, compressedBytes, into),
      clusterSize: image.clusterSize,
      compressedDevice: file,
      concurrency: image.#concurrency,
    };
    if (options.readOnly === false) {
      try {
        await image.#openForWriting();
      } catch (error) {
        await image.#backing?.close().catch(() => {});
        await image.#dataFile?.close().catch(() => {});
        throw error;
      }
    }
    return image;
  }

  async #openForWriting(): Promise<void> {
    const codecs = this.#codecs;
    const type = this.compressionType === 'zstd' ? 'zstd' : 'deflate';
    this.#writer = await ImageWriter.open({
      file: this.file,
      dataFile: this.#dataFile,
      description: this.description,
      header: () => this.header,
      setHeader: (header) => {
        this.header = header;
      },
      size: () => this.size,
      setSize: (size) => {
        this.size = size;
      },
      snapshotTable: this.snapshotTable,
      bitmapDirectory: this.bitmapDirectory,
      setBitmapDirectory: (entries) => {
        this.bitmapDirectory = entries;
      },
      mapper: this.#mapper,
      cache: this.#l2Cache,
      sliceBytes: Math.min(this.clusterSize, MAX_SLICE_BYTES),
      readGuest: (buffer, guestOffset) => super.readInto(buffer, guestOffset),
      readsAsZeros: async (guestOffset, length) =>
        (await blockStatusAll(this, guestOffset, length)).every((extent) => extent.zero),
      forgetCompressed: (hostOffset) => this.#compressed.forget(hostOffset),
      discardFreedClusters: this.#discardFreedClusters,
      compress: async (input) => {
        if (codecs.compress === undefined) {
          throw new BlockDeviceError('EUNSUPPORTED', `qcow2: ${this.description}: no compressor available`);
        }
        return codecs.compress(type, input);
      },
    });
    this.capabilities = {
      ...this.capabilities,
      discard: true,
      writeZeroes: true,
      flush: true,
      resize: true,
    };
  }

  override get readOnly(): boolean {
    return this.#writer === undefined;
  }

  override readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    const writer = this.#writer;
    if (writer === undefined) return super.readInto(buffer, offset, options);
    return writer.lock.shared(() => super.readInto(buffer, offset, options));
  }

  override write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    const writer = this.#writer;
    if (writer === undefined) return super.write(offset, data, options);
    if (options?.fua !== true) {
      return this.#change('write', offset, data.length, options?.signal, () => writer.write(offset, data));
    }
    return this.#change('write', offset, data.length, options.signal, async () => {
      await writer.write(offset, data);
      await writer.flush();
    });
  }

  override async writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    const writer = this.#writer;
    if (writer === undefined) return super.writeZeroes(offset, length, options);
    return this.#change('writeZeroes', offset, length, options?.signal, async () => {
      if (options?.fastOnly) {
        throw new BlockDeviceError('ENOTSUP', `writeZeroes: ${this.description}: no fast zeroing`);
      }
      await writer.writeZeroes(offset, length, 'zero', options?.mayUnmap === true);
      if (options?.fua) await writer.flush();
    });
  }

  override async discard(offset: number, length: number, options?: RequestOptions): Promise<void> {
    const writer = this.#writer;
    if (writer === undefined) return super.discard(offset, length, options);
    return this.#change('discard', offset, length, options?.signal, () =>
      writer.writeZeroes(offset, length, 'discard'),
    );
  }

  /**
   * Writes whole clusters compressed (qemu-img convert -c): `guestOffset` is cluster-aligned and
   * `data` one cluster long (shorter only for the image's last cluster). A cluster that does not
   * shrink is written uncompressed, as QEMU does.
   */
  async writeCompressed(guestOffset: number, data: Uint8Array): Promise<void> {
    const writer = this.#writer;
    if (writer === undefined) return super.write(guestOffset, data);
    const lastCluster = guestOffset + data.length === this.size;
    if (guestOffset % this.clusterSize !== 0 || (data.length !== this.clusterSize && !lastCluster)) {
      throw new BlockDeviceError('EINVAL', 'writeCompressed: needs one whole, aligned cluster', {
        offset: guestOffset,
      });
    }
    return this.#change('write', guestOffset, data.length, undefined, async () => {
      let whole = data;
      if (data.length < this.clusterSize) {
        whole = new Uint8Array(this.clusterSize);
        whole.set(data);
      }
      await writer.writeCompressed(guestOffset, whole.length === data.length ? data : whole);
    });
  }

  override async flush(options?: RequestOptions): Promise<void> {
    const writer = this.#writer;
    if (writer === undefined) return super.flush(options);
    assertOpen(this.#shut, this.description, 'flush');
    throwIfAborted(options?.signal);
    await this.#tracked(writer.flush());
  }

  override async resize(newSize: number): Promise<void> {
    const writer = this.#writer;
    if (writer === undefined) return super.resize(newSize);
    assertOpen(this.#shut, this.description, 'resize');
    validateSize(newSize, 'resize');
    await this.#tracked(writer.resize(newSize));
  }

  /**
   * Metadata preallocation of the guest range `[fromGuest, size)` (as `qemu-img resize
   * --preallocation=metadata` does for the grown range): every L2 table and data cluster there
   * allocated, reading as zeros; clusters that already have a host cluster keep it. Refused where the
   * backing file shows through, unless entries are extended (the clusters would hide it).
   */
  async preallocateMetadata(fromGuest = 0): Promise<void> {
    const writer = this.#writer;
    if (writer === undefined) {
      throw new BlockDeviceError('EROFS', `qcow2: ${this.description}: the image is open read-only`);
    }
    assertOpen(this.#shut, this.description, 'preallocate');
    if (!Number.isSafeInteger(fromGuest) || fromGuest < 0 || fromGuest > this.size) {
      throw new BlockDeviceError(
        'EINVAL',
        `qcow2: ${this.description}: preallocation start ${fromGuest} is outside the image`,
      );
    }
    const backingSize = this.#backing?.size ?? 0;
    if (!this.extendedL2 && fromGuest < backingSize) {
      throw new BlockDeviceError(
        'EUNSUPPORTED',
        `qcow2: ${this.description}: metadata preallocation over the backing file's data needs extended L2 entries`,
      );
    }
    await this.#tracked(writer.preallocateMetadata(fromGuest));
  }

  /**
   * The persistent dirty bitmaps of an image open for writing: add, remove, clear, enable, disable,
   * merge (qemu-img bitmap). Changes are stored on close, with the bits every write set meanwhile.
   */
  async persistentBitmaps(): Promise<PersistentBitmaps> {
    const writer = this.#writer;
    if (writer === undefined) {
      throw new BlockDeviceError('EROFS', `qcow2: ${this.description}: the image is open read-only`);
    }
    assertOpen(this.#shut, this.description, 'bitmaps');
    return writer.persistentBitmaps();
  }

  override async close(): Promise<void> {
    const writer = this.#writer;
    if (writer !== undefined && !this.closed) {
      // No change starts once closing has begun: every bit a write sets in the persistent bitmaps
      // is set before they are stored, and nothing is written behind the final flush.
      this.#closing = true;
      while (this.#changes.size > 0 || this.#requests > 0) {
        if (this.#changes.size > 0) await Promise.allSettled([...this.#changes]);
        if (this.#requests > 0) await new Promise<void>((resolve) => this.#requestsDone.push(resolve));
      }
      await writer.close();
    }
    await super.close();
  }

  /** close() has begun: changes are refused as on a closed image (reads still run). */
  #closing = false;

  get #shut(): boolean {
    return this.closed || this.#closing;
  }

  readonly #changes = new Set<Promise<unknown>>();

  #tracked<T>(promise: Promise<T>): Promise<T> {
    this.#changes.add(promise);
    const forget = (): void => {
      this.#changes.delete(promise);
    };
    promise.then(forget, forget);
    return promise;
  }

  /** Guest requests (write, write zeroes, discard) running, and close()'s wait for none. A
   * counter, not a set of promises as {@link #tracked}: each 4 KiB write would pay for a set entry
   * and a promise reaction. */
  #requests = 0;
  #requestsDone: (() => void)[] = [];

  async #change(
    kind: RequestKind,
    offset: number,
    length: number,
    signal: AbortSignal | undefined,
    task: () => Promise<void>,
  ): Promise<void> {
    assertOpen(this.#shut, this.description, kind);
    validateRange(this.size, offset, length, kind);
    throwIfAborted(signal);
    if (length === 0) return;
    this.#requests++;
    try {
      await task();
    } finally {
      if (--this.#requests === 0 && this.#requestsDone.length > 0) {
        const waiting = this.#requestsDone;
        this.#requestsDone = [];
        for (const resolve of waiting) resolve();
      }
    }
  }

  async #openExternalFiles(options: Qcow2OpenOptions): Promise<void> {
    const flags = headerFlags(this.header);
    const allowExternal = options.allowExternalFiles ?? true;
    if (flags.dataFile) {
      const name = this.header.extensions.dataFileName;
      if (name === undefined) {
        throw new BlockDeviceError(
          'ECORRUPT',
          `qcow2: ${this.file.description}: external data file name is missing`,
        );
      }
      if (!allowExternal) throw refuseProbed(this.file.description, 'an external data file', name);
      if (options.resolveDataFile !== undefined) this.#dataFile = await options.resolveDataFile(name);
    }
    const backingName = this.header.backingFileName;
    if (backingName !== undefined && backingName !== '' && options.openBacking !== false) {
      if (!allowExternal) throw refuseProbed(this.file.description, 'a backing file', backingName);
      if (options.resolveBacking === undefined) {
        throw new BlockDeviceError(
          'EUNSUPPORTED',
          `qcow2: ${this.file.description}: no backing resolver for '${backingName}'`,
        );
      }
      this.#backing = await options.resolveBacking({
        name: backingName,
        format: this.backingFormat,
        depth: this.chainDepth + 1,
        from: this,
      });
    }
  }

  get dataFile(): BlockDevice | undefined {
    return this.#dataFile;
  }

  get backing(): BlockDevice | undefined {
    return this.#backing;
  }

  /** L2 cache statistics (entries, bytes, hits, misses). */
  get l2CacheStats(): TableCache<DataView>['stats'] {
    return this.#l2Cache.stats;
  }

  #metadataPreallocation: Promise<boolean> | undefined;

  /**
   * QEMU's test for a metadata-preallocated image: the file has clearly more clusters with a
   * non-zero refcount than it has allocated storage (at least 10/9 of them, and 2 more). Such
   * images get their data runs checked for holes in blockStatus. Needs the file device's
   * `allocatedBytes()` (FileBlockDevice has it); without it the answer is no.
   */
  protected override recurseIntoData(): Promise<boolean> {
    this.#metadataPreallocation ??= this.#detectMetadataPreallocation().catch(() => false);
    return this.#metadataPreallocation;
  }

  async #detectMetadataPreallocation(): Promise<boolean> {
    const file = this.file as BlockDevice & { allocatedBytes?: () => Promise<number> };
    if (typeof file.allocatedBytes !== 'function') return false;
    const realClusters = Math.floor((await file.allocatedBytes()) / this.clusterSize);
    const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
    const endCluster = Math.ceil(file.size / this.clusterSize);
    // Only the file's clusters are counted, so a file with at most 9/10 of them unallocated can
    // never reach the threshold: no refcount need be read (every image written in full, which
    // saved 3-6 ms of the first block-status lookup of a 512 MiB image).
    if (threshold > endCluster) return false;
    const order = this.header.refcountOrder;
    const perBlock = refcountsPerBlock(this.clusterSize, order);
    // Only the entries of the blocks that cover the file (a table of one 64 KiB cluster holds
    // 8192; a 512 MiB file needs one): decoding them all cost 10-20 ms at each cold open.
    const { refcountTableOffset, refcountTableClusters } = this.header;
    const entries = Math.min(
      Math.ceil(endCluster / perBlock),
      (refcountTableClusters * this.clusterSize) / 8,
    );
    const tableBytes = await this.readHostBytes(refcountTableOffset, entries * 8);
    const table = decodeRefcountTable(tableBytes, refcountTableOffset).offsets;
    let count = 0;
    let cluster = 0;
    while (cluster < endCluster && count < threshold) {
      const blockIndex = Math.floor(cluster / perBlock);
      const blockOffset = table[blockIndex] ?? 0;
      const stop = Math.min(endCluster, (blockIndex + 1) * perBlock);
      if (blockOffset === 0 || blockIndex >= table.length) {
        cluster = stop;
        if (blockIndex >= table.length) break;
        continue;
      }
      const block = await this.readRefcountBlock(blockOffset);
      const first = cluster - blockIndex * perBlock;
      count += countInUse(block, first, first + (stop - cluster), order, threshold - count);
      cluster = stop;
    }
    return count >= threshold;
  }

  protected mapRange(guestOffset: number, length: number, maxEntries?: number): Promise<Segment[]> {
    return this.#mapper.map(guestOffset, length, maxEntries);
  }

  protected override directRead(buffer: Uint8Array, guestOffset: number): Promise<void> | undefined {
    const found = this.#mapper.lookupCached(guestOffset, buffer.length);
    if (found >= 0) {
      const device = this.#source.dataDevice;
      // Past the end of the file (a truncated image): the general path reads zeros there.
      if (device === undefined || found + buffer.length > device.size) return undefined;
      return device.readInto(buffer, found);
    }
    const backing = found === LOOKUP_UNALLOCATED ? this.#source.backing : undefined;
    if (backing !== undefined) {
      // Past the end of a shorter backing file: the general path reads zeros there.
      return guestOffset + buffer.length <= backing.size ? backing.readInto(buffer, guestOffset) : undefined;
    }
    if (found !== LOOKUP_ZERO && found !== LOOKUP_UNALLOCATED) return undefined;
    buffer.fill(0);
    return Promise.resolve();
  }

  protected segmentSource(): SegmentSource {
    return this.#source;
  }

  protected ownedDevices(): (BlockDevice | undefined)[] {
    return [this.#backing, this.#dataFile, this.file];
  }

  /** Checks the image like `qemu-img check` (read-only). */
  async check(options?: Qcow2CheckOptions): Promise<Qcow2CheckResult> {
    // Metadata changes still in the caches are written back first: check reads the file.
    const writer = this.#writer;
    if (writer !== undefined && !writer.corrupt && !this.#shut) await this.flush();
    // Loaded when used: the checker is as large as the rest of the engine, and reading needs none of it.
    const { checkQcow2Image } = await import('./check/index.js');
    return checkQcow2Image(this, options);
  }

  // Raw metadata access (for check and tools). Nothing here is cached or validated beyond bounds.

  /** The whole active L1 table (header's l1_size entries) as 32-bit halves. */
  async readL1Table(options?: RequestOptions): Promise<{ high: Uint32Array; low: Uint32Array }> {
    const { l1TableOffset, l1Size } = this.header;
    const bytes = l1Size > 0 ? await this.file.read(l1TableOffset, l1Size * 8, options) : new Uint8Array(0);
    return decodeL1Table(bytes, l1Size);
  }

  /** One L2 table (a cluster) at `hostOffset`, raw. */
  readL2Table(hostOffset: number, options?: RequestOptions): Promise<Uint8Array> {
    return this.readHostBytes(hostOffset, this.clusterSize, options);
  }

  /** The refcount table: one refcount block host offset per entry (0 = none). */
  async readRefcountTable(options?: RequestOptions): Promise<number[]> {
    const { refcountTableOffset, refcountTableClusters } = this.header;
    const bytes = await this.readHostBytes(
      refcountTableOffset,
      refcountTableClusters * this.clusterSize,
      options,
    );
    return decodeRefcountTable(bytes, refcountTableOffset).offsets;
  }

  /** One refcount block (a cluster) at `hostOffset`, raw (decode with `decodeRefcount`). */
  readRefcountBlock(hostOffset: number, options?: RequestOptions): Promise<Uint8Array> {
    return this.readHostBytes(hostOffset, this.clusterSize, options);
  }

  /** `length` bytes of the image file at `hostOffset`; bytes past the file end read as zeros. */
  async readHostBytes(hostOffset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    const bytes = new Uint8Array(length);
    await readClipped(this.file, hostOffset, bytes, options);
    return bytes;
  }
}

/** A persistent dirty bitmap as `qemu-img info` shows it. */
export interface Qcow2BitmapInfo {
  name: string;
  granularity: number;
  /** 'in-use' and/or 'auto'. */
  flags: string[];
}

function toBitmapInfo(entry: Qcow2BitmapEntry): Qcow2BitmapInfo {
  return {
    name: entry.name,
    granularity: entry.granularity,
    flags: [...(entry.inUse ? ['in-use'] : []), ...(entry.auto ? ['auto'] : [])],
  };
}

function toSnapshotInfo(entry: Qcow2SnapshotEntry, imageSize: number): Qcow2SnapshotInfo {
  return {
    id: entry.id,
    name: entry.name,
    vmStateSize: entry.vmStateSize,
    dateSec: entry.dateSec,
    dateNsec: entry.dateNsec,
    vmClockNsec: entry.vmClockNsec,
    icount: entry.icount,
    diskSize: entry.diskSize ?? imageSize,
  };
}

function refuseProbed(description: string, what: string, name: string): BlockDeviceError {
  return new BlockDeviceError(
    'EUNSUPPORTED',
    `qcow2: ${description}: the image's format was probed, not declared, and it names ${what} ('${name}'); ` +
      'declare the backing format (qemu-img rebase -F / -o backing_fmt=) to allow it',
  );
}

/** Tables must lie inside the file (a truncated file fails here, not on a later read). */
function validateTablePositions(header: Qcow2Header, fileSize: number): void {
  const check = (what: string, offset: number, length: number, field: number): void => {
    if (length > 0 && offset + length > fileSize) {
      throw new BlockDeviceError(
        'ECORRUPT',
        `qcow2 header: ${what} at ${hex(offset)} lies past the end of the file`,
        {
          offset: field,
        },
      );
    }
  };
  check('L1 table', header.l1TableOffset, header.l1Size * 8, 40);
  check('refcount table', header.refcountTableOffset, header.refcountTableClusters * header.clusterSize, 48);
  check('snapshot table', header.snapshotsOffset, header.nbSnapshots > 0 ? 40 : 0, 64);
}

/**
 * How many of refcounts `from` to `to` of a refcount block are non-zero, counting no further than
 * `limit`. A plain function of its own: V8 optimises a loop like this one within a millisecond or
 * two, while inside the async caller it ran interpreted for most of a 4 KiB-cluster image's
 * 131 072 refcounts (~30 ms at each open of a 512 MiB image).
 */
function countInUse(block: Uint8Array, from: number, to: number, order: number, limit: number): number {
  let count = 0;
  for (let index = from; index < to && count < limit; index++) {
    if (decodeRefcount(block, index, order) !== 0) count++;
  }
  return count;
}
