/**
 * The persistent dirty bitmaps of an image open for writing, kept as QEMU keeps them:
 *
 * - Opening marks every consistent bitmap `in_use` in the directory (in place, flushed) before
 *   any guest write, so a crash leaves them flagged inconsistent, never wrongly consistent.
 *   A bitmap already `in_use` at open is inconsistent: kept as it is, never changed or used
 *   (it can only be removed).
 * - Enabled (`auto`) bitmaps get the bits of every written, zeroed or discarded range set
 *   (in memory, sparse: see dirty-bitmap.ts).
 * - Bitmaps can be added, removed, cleared, enabled, disabled and merged (qemu-img bitmap).
 * - Storing (on close; a flush leaves them `in_use`, as QEMU does) writes every changed part of a
 *   bitmap to new clusters, a new table when one changed, and a new directory with `in_use`
 *   cleared; then, once all that and its refcounts are durable, switches the header to the new
 *   directory in one write (the bitmaps extension in place, or the whole header cluster when the
 *   extension comes or goes), and only then frees what it replaced. A crash before the switch
 *   leaves the old directory (bitmaps `in_use`) and leaks; after it, the new bitmaps and leaks.
 *
 * Unchanged parts of a bitmap keep their data clusters (a new table points at them); QEMU rewrites
 * them all, which reads the same.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import type { MetadataMap } from '../alloc/metadata-map.js';
import type { RefcountStore } from '../alloc/refcount-store.js';
import { encodeText, viewOf, writeU64 } from '../format/binary.js';
import {
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  BME_MAX_GRANULARITY_BITS,
  BME_MAX_NAME_SIZE,
  BME_MAX_PHYS_SIZE,
  BME_MAX_TABLE_SIZE,
  BT_DIRTY_TRACKING_BITMAP,
  bitmapDirectorySize,
  bitmapEntryProblem,
  bitmapTableSize,
  encodeBitmapDirectory,
  QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
  QCOW2_MAX_BITMAPS,
  type Qcow2BitmapEntry,
} from '../format/bitmap-directory.js';
import { QCOW2_AUTOCLEAR_BITMAPS } from '../format/feature-bits.js';
import { decodeHeader, encodeHeader, type Qcow2Header } from '../format/header.js';
import { QCOW2_EXT_MAGIC_BITMAPS, type Qcow2HeaderExtension } from '../format/header-extensions.js';
import {
  BITMAP_TABLE_ONES,
  BITMAP_TABLE_ZEROS,
  bitmapTableBytes,
  decodeBitmapTable,
  encodeBitmapTable,
} from './bitmap-table.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import type { StoredBitmap } from './read-bitmap.js';
import { SetBitRuns } from './set-bit-runs.js';
import { forEachStoredRun } from './stored-runs.js';
import type { StoredBitmapImage } from './stored-table.js';

export interface PersistentBitmapsContext {
  readonly file: BlockDevice;
  readonly description: string;
  readonly refcounts: RefcountStore;
  readonly metadata: MetadataMap;
  readonly header: () => Qcow2Header;
  readonly setHeader: (header: Qcow2Header) => void;
  /** Writes header bytes in place and flushes. */
  readonly patchHeader: (at: number, bytes: Uint8Array) => Promise<void>;
  /** Tells the image its directory changed (what `info` lists). */
  readonly setDirectory: (entries: readonly Qcow2BitmapEntry[]) => void;
}

export interface AddBitmapOptions {
  /** Bytes one bit covers: a power of 2, 512 to 2 GiB (default: the cluster size, at least 4 KiB,
   * as QEMU). */
  readonly granularity?: number;
  /** Add it disabled (writes do not set its bits). */
  readonly disabled?: boolean;
}

export class PersistentBitmaps {
  readonly #context: PersistentBitmapsContext;
  readonly #clusterSize: number;
  /** The directory, in its order: as on disk, with the bitmaps added and removed since opening. */
  #entries: Qcow2BitmapEntry[];
  /** The consistent bitmaps, by name. */
  readonly #bitmaps = new Map<string, DirtyBitmap>();
  /** Enabled bitmaps (the ones writes mark). */
  #enabled: DirtyBitmap[] = [];
  /** Entries removed since opening (their clusters are freed by {@link store}). */
  readonly #removed: Qcow2BitmapEntry[] = [];
  /** Bitmaps were added or removed: the directory is stored even without a consistent one. */
  #listChanged = false;
  #guestSize: number;

  private constructor(context: PersistentBitmapsContext, entries: Qcow2BitmapEntry[], guestSize: number) {
    this.#context = context;
    this.#clusterSize = context.header().clusterSize;
    this.#entries = entries;
    this.#guestSize = guestSize;
  }

  /**
   * Validates the directory `entries` (may be empty) and the tables of its consistent bitmaps
   * (refusing what QEMU refuses to open), registers them as metadata, and marks the consistent
   * ones in use.
   */
  static async open(
    context: PersistentBitmapsContext,
    entries: readonly Qcow2BitmapEntry[],
    guestSize: number,
  ): Promise<PersistentBitmaps> {
    const header = context.header();
    const clusterSize = header.clusterSize;
    const { file, metadata } = context;
    const directoryOffset = header.extensions.bitmaps?.bitmapDirectoryOffset;
    const refuse = (code: 'ECORRUPT' | 'EUNSUPPORTED', why: string, offset?: number): never => {
      throw new BlockDeviceError(
        code,
        `qcow2: ${context.description}: cannot open for writing: ${why}`,
        offset === undefined ? undefined : { offset },
      );
    };
    const names = new Set<string>();
    for (const entry of entries) {
      if (entry.extraDataSize !== 0) refuse('EUNSUPPORTED', `bitmap '${entry.name}' has extra data`);
      const problem = bitmapEntryProblem(entry, clusterSize, guestSize);
      if (problem !== undefined) refuse('ECORRUPT', `bitmap '${entry.name}': ${problem}`, directoryOffset);
      if (names.has(entry.name)) refuse('ECORRUPT', `bitmap '${entry.name}' is listed twice`);
      names.add(entry.name);
    }
    const extension = header.extensions.bitmaps;
    if (entries.length > 0 && extension !== undefined) {
      const { bitmapDirectoryOffset, bitmapDirectorySize } = extension;
      metadata.check(bitmapDirectoryOffset, bitmapDirectorySize, undefined, 'bitmap directory');
      metadata.add(bitmapDirectoryOffset, bitmapDirectorySize, 'bitmap-directory');
    }
    const bitmaps = new PersistentBitmaps(context, [...entries], guestSize);
    for (const entry of entries) {
      const tableBytes = entry.tableSize * 8;
      if (entry.tableOffset + tableBytes > file.size) {
        refuse(
          'ECORRUPT',
          `bitmap '${entry.name}': its table lies past the end of the file`,
          entry.tableOffset,
        );
      }
      metadata.check(entry.tableOffset, tableBytes, undefined, `bitmap '${entry.name}' table`);
      metadata.add(entry.tableOffset, tableBytes, 'bitmap-table');
      if (entry.inUse) continue;
      // Validated now (QEMU loads it at open), read again when storing.
      await bitmaps.#readTable(entry);
      bitmaps.#bitmaps.set(
        entry.name,
        new DirtyBitmap({
          name: entry.name,
          granularityBits: entry.granularityBits,
          enabled: entry.auto,
          clusterSize,
          guestSize,
        }),
      );
    }
    bitmaps.#refreshEnabled();
    if (bitmaps.#bitmaps.size > 0) await bitmaps.#markInUse();
    return bitmaps;
  }

  #refreshEnabled(): void {
    this.#enabled = [...this.#bitmaps.values()].filter((bitmap) => bitmap.enabled);
  }

  /** The directory entries, with the bitmaps added and removed since opening. */
  get entries(): readonly Qcow2BitmapEntry[] {
    return this.#entries;
  }

  /** Names of the bitmaps that were in use at open (inconsistent: kept, never used). */
  get inconsistent(): string[] {
    return this.#entries.filter((entry) => !this.#bitmaps.has(entry.name)).map((entry) => entry.name);
  }

  /** The consistent bitmap `name` (for tests and tools). */
  bitmap(name: string): DirtyBitmap | undefined {
    return this.#bitmaps.get(name);
  }

  /** Sets the bits of every enabled bitmap for a write, zeroing or discard of the guest range. */
  mark(guestOffset: number, length: number): void {
    for (const bitmap of this.#enabled) bitmap.mark(guestOffset, length);
  }

  #fail(code: 'EINVAL' | 'ENOENT' | 'EUNSUPPORTED', message: string): never {
    throw new BlockDeviceError(code, message);
  }

  /** The consistent bitmap `name`, or QEMU's error for a missing or inconsistent one. */
  #usable(name: string): DirtyBitmap {
    const bitmap = this.#bitmaps.get(name);
    if (bitmap !== undefined) return bitmap;
    if (this.#entries.some((entry) => entry.name === name)) {
      this.#fail('EINVAL', `Bitmap '${name}' is inconsistent and cannot be used`);
    }
    return this.#fail('ENOENT', `Dirty bitmap '${name}' not found`);
  }

  /** Adds an empty bitmap (qemu-img bitmap --add), with QEMU's checks and messages. */
  add(name: string, options: AddBitmapOptions = {}): void {
    const header = this.#context.header();
    if (header.version < 3) this.#fail('EUNSUPPORTED', 'Cannot store dirty bitmaps in qcow2 v2 files');
    if (this.#entries.some((entry) => entry.name === name))
      this.#fail('EINVAL', `Bitmap already exists: ${name}`);
    const granularity = options.granularity ?? Math.max(4096, this.#clusterSize);
    // An integer log2 up to 31 only comes from an exact power of 2 (no bitwise test: it is 32-bit).
    const granularityBits = Math.log2(granularity);
    if (!Number.isInteger(granularityBits) || granularity < 512) {
      this.#fail('EINVAL', 'Granularity must be power of 2 and at least 512');
    }
    if (granularityBits > BME_MAX_GRANULARITY_BITS) {
      this.#fail('EINVAL', `Granularity exceeds maximum (${2 ** BME_MAX_GRANULARITY_BITS} bytes)`);
    }
    if (encodeText(name).length > BME_MAX_NAME_SIZE) {
      this.#fail('EINVAL', `Name length exceeds maximum (${BME_MAX_NAME_SIZE} characters)`);
    }
    // A bitmap of an empty disk would have no table, which the spec's directory cannot express
    // (QEMU fails to store one, losing the bitmap): refused here instead.
    if (this.#guestSize === 0) this.#fail('EINVAL', 'Cannot add a persistent bitmap to an image of 0 bytes');
    const tableSize = bitmapTableSize(this.#guestSize, granularity, this.#clusterSize);
    if (tableSize > BME_MAX_TABLE_SIZE || Math.ceil(this.#guestSize / granularity / 8) > BME_MAX_PHYS_SIZE) {
      this.#fail('EINVAL', 'Too much space will be occupied by the bitmap. Use larger granularity');
    }
    if (this.#entries.length + 1 > QCOW2_MAX_BITMAPS) {
      this.#fail('EINVAL', 'Maximum number of persistent bitmaps is already reached');
    }
    if (bitmapDirectorySize([...this.#entries, { name }]) > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
      this.#fail('EINVAL', 'Not enough space in the bitmap directory');
    }
    const enabled = options.disabled !== true;
    this.#entries.push({
      name,
      tableOffset: 0,
      tableSize: 0,
      flags: (enabled ? BME_FLAG_AUTO : 0) | BME_FLAG_IN_USE,
      type: BT_DIRTY_TRACKING_BITMAP,
      granularityBits,
      granularity,
      inUse: true,
      auto: enabled,
      extraDataSize: 0,
    });
    this.#bitmaps.set(
      name,
      new DirtyBitmap({
        name,
        granularityBits,
        enabled,
        clusterSize: this.#clusterSize,
        guestSize: this.#guestSize,
        created: true,
      }),
    );
    this.#refreshEnabled();
    this.#listChanged = true;
  }

  /** Removes bitmap `name`, consistent or not (qemu-img bitmap --remove). */
  remove(name: string): void {
    const index = this.#entries.findIndex((entry) => entry.name === name);
    if (index < 0) this.#fail('ENOENT', `Dirty bitmap '${name}' not found`);
    const [entry] = this.#entries.splice(index, 1);
    if (entry!.tableOffset !== 0) this.#removed.push(entry!);
    this.#bitmaps.delete(name);
    this.#refreshEnabled();
    this.#listChanged = true;
  }

  /** Clears every bit of bitmap `name` (qemu-img bitmap --clear). */
  clear(name: string): void {
    this.#usable(name).clear();
  }

  /** Enables or disables bitmap `name` (qemu-img bitmap --enable / --disable). */
  setEnabled(name: string, enabled: boolean): void {
    this.#usable(name).enabled = enabled;
    this.#refreshEnabled();
  }

  /**
   * Sets in bitmap `target` every bit of `source` (qemu-img bitmap --merge), a bitmap of a guest of
   * `sourceGuestSize` bytes: from {@link currentBits} of this image or `readStoredBitmap` of another.
   */
  merge(target: string, source: StoredBitmap, sourceGuestSize: number): void {
    const bitmap = this.#usable(target);
    if (sourceGuestSize !== this.#guestSize) {
      this.#fail(
        'EINVAL',
        `Bitmaps are of different sizes (destination size is ${this.#guestSize}, source size is ${sourceGuestSize}) and can't be merged`,
      );
    }
    const runs = new SetBitRuns(setRuns(bitmap, source.granularity, sourceGuestSize));
    runs.scan(source.bits, 0, source.bitCount);
    runs.end(source.bitCount);
  }

  /**
   * Sets in bitmap `target` every bit of stored bitmap `sourceName` of another image (`source`: its
   * file, guest size, cluster size and directory, as a Qcow2Image exposes them), reading one bitmap
   * cluster at a time (what `qemu-img convert --bitmaps` copies). Checks and messages as {@link merge}.
   */
  async mergeStored(target: string, source: StoredBitmapImage, sourceName: string): Promise<void> {
    const bitmap = this.#usable(target);
    if (source.size !== this.#guestSize) {
      this.#fail(
        'EINVAL',
        `Bitmaps are of different sizes (destination size is ${this.#guestSize}, source size is ${source.size}) and can't be merged`,
      );
    }
    const entry = source.bitmapDirectory.find((candidate) => candidate.name === sourceName);
    const granularity = entry?.granularity ?? bitmap.granularity;
    await forEachStoredRun(source, sourceName, setRuns(bitmap, granularity, source.size));
  }

  /** Every bit of consistent bitmap `name` as it stands now (stored bits and those set since). */
  async currentBits(name: string): Promise<StoredBitmap> {
    const bitmap = this.#usable(name);
    const entry = this.#entries.find((candidate) => candidate.name === name)!;
    const table = await this.#readTable(entry);
    const byteCount = Math.ceil(bitmap.bits / 8);
    const bits = new Uint8Array(byteCount);
    for (let chunk = 0; chunk < bitmap.tableSize; chunk++) {
      const stored = chunk < table.length ? table[chunk]! : BITMAP_TABLE_ZEROS;
      const content = bitmap.compose(chunk, await this.#storedChunk(stored));
      if (content === undefined) continue;
      const at = chunk * this.#clusterSize;
      bits.set(content.subarray(0, Math.min(this.#clusterSize, byteCount - at)), at);
    }
    return { bits, bitCount: bitmap.bits, granularity: bitmap.granularity };
  }

  async #storedChunk(stored: number): Promise<Uint8Array | 'ones' | undefined> {
    if (stored === BITMAP_TABLE_ZEROS) return undefined;
    if (stored === BITMAP_TABLE_ONES) return 'ones';
    return this.#context.file.read(stored, this.#clusterSize);
  }

  /** Throws what QEMU says when a resize to `guestSize` is impossible with these bitmaps. */
  checkResize(guestSize: number): void {
    const [name] = this.inconsistent;
    if (name !== undefined) {
      this.#fail(
        'EINVAL',
        `Bitmap '${name}' is inconsistent and cannot be used (remove it to resize the image)`,
      );
    }
    const [first] = this.#bitmaps.values();
    if (guestSize === 0 && first !== undefined) {
      // See add(): a bitmap of an empty disk cannot be stored.
      this.#fail('EINVAL', `Bitmap '${first.name}' cannot be kept at size 0 (remove it to resize the image)`);
    }
    for (const bitmap of this.#bitmaps.values()) {
      const tableSize = bitmapTableSize(guestSize, bitmap.granularity, this.#clusterSize);
      if (tableSize > BME_MAX_TABLE_SIZE || tableSize * this.#clusterSize > BME_MAX_PHYS_SIZE) {
        this.#fail(
          'EINVAL',
          `Bitmap '${bitmap.name}' would take too much space at this size: use a larger granularity`,
        );
      }
    }
  }

  /** Follows a guest size change (after {@link checkResize}). */
  resize(guestSize: number): void {
    this.#guestSize = guestSize;
    for (const bitmap of this.#bitmaps.values()) bitmap.resize(guestSize);
  }

  /** The table of `entry`, validated (empty for a bitmap not stored yet). */
  async #readTable(entry: { name: string; tableOffset: number; tableSize: number }): Promise<Float64Array> {
    if (entry.tableOffset === 0) return new Float64Array(0);
    const { file } = this.#context;
    const bytes = await file.read(entry.tableOffset, entry.tableSize * 8);
    return decodeBitmapTable(bytes, entry.tableSize, this.#clusterSize, file.size, entry.tableOffset);
  }

  /**
   * Sets `in_use` on every entry, in place, durable before any write. The entries were validated by
   * {@link open} (type 1, no extra data, no reserved flag), so encoding them gives the directory's
   * bytes with only the flag changed (and zeros as padding).
   */
  async #markInUse(): Promise<void> {
    const { file, metadata } = this.#context;
    const directoryOffset = this.#context.header().extensions.bitmaps!.bitmapDirectoryOffset;
    this.#entries = this.#entries.map((entry) => ({
      ...entry,
      flags: (entry.flags | BME_FLAG_IN_USE) >>> 0,
      inUse: true,
    }));
    const bytes = encodeBitmapDirectory(this.#entries);
    metadata.check(directoryOffset, bytes.length, 'bitmap-directory', 'bitmap directory write');
    await file.write(directoryOffset, bytes);
    await file.flush();
    this.#context.setDirectory(this.#entries);
  }

  /** Allocates `bytes` (whole clusters) and returns the host offset; the file grows to hold them. */
  async #allocate(bytes: number): Promise<number> {
    const clusters = Math.ceil(bytes / this.#clusterSize);
    const hostOffset = (await this.#context.refcounts.allocate(clusters)) * this.#clusterSize;
    await this.#context.refcounts.extendFile();
    return hostOffset;
  }

  async #writeNew(hostOffset: number, bytes: Uint8Array, what: string): Promise<void> {
    this.#context.metadata.check(hostOffset, bytes.length, undefined, what);
    await this.#context.file.write(hostOffset, bytes);
  }

  /**
   * Stores the bitmaps (see the file comment). Data and metadata of the guest must be durable
   * already (the bits cover them). Called on close.
   */
  async store(): Promise<void> {
    if (this.#bitmaps.size === 0 && !this.#listChanged) return;
    const { file, refcounts, metadata } = this.#context;
    const clusterSize = this.#clusterSize;
    const header = this.#context.header();
    const oldValid =
      (header.autoclearFeatures.low & QCOW2_AUTOCLEAR_BITMAPS) !== 0 &&
      (header.extensions.bitmaps?.nbBitmaps ?? 0) > 0
        ? header.extensions.bitmaps
        : undefined;
    /** Host ranges to free once the header points at the new directory. */
    const frees: { hostOffset: number; bytes: number; table?: boolean }[] = [];
    const newTables: { hostOffset: number; bytes: number }[] = [];
    const next: Qcow2BitmapEntry[] = [];
    for (const entry of this.#entries) {
      const bitmap = this.#bitmaps.get(entry.name);
      if (bitmap === undefined) {
        next.push(entry);
        continue;
      }
      const old = await this.#readTable(entry);
      const size = bitmap.tableSize;
      const table = new Float64Array(size);
      let changed = size !== old.length;
      for (let chunk = 0; chunk < size; chunk++) {
        const stored = chunk < old.length ? old[chunk]! : BITMAP_TABLE_ZEROS;
        if (!bitmap.chunkChanged(chunk, stored)) {
          table[chunk] = stored;
          continue;
        }
        changed = true;
        const content = bitmap.compose(chunk, await this.#storedChunk(stored));
        if (stored > BITMAP_TABLE_ONES) frees.push({ hostOffset: stored, bytes: clusterSize });
        if (content === undefined) {
          table[chunk] = BITMAP_TABLE_ZEROS;
          continue;
        }
        const hostOffset = await this.#allocate(clusterSize);
        await this.#writeNew(hostOffset, content, `bitmap '${entry.name}' data write`);
        table[chunk] = hostOffset;
      }
      for (let chunk = size; chunk < old.length; chunk++) {
        if (old[chunk]! > BITMAP_TABLE_ONES) frees.push({ hostOffset: old[chunk]!, bytes: clusterSize });
      }
      let tableOffset = entry.tableOffset;
      if (changed) {
        const bytes = new Uint8Array(bitmapTableBytes(size, clusterSize));
        encodeBitmapTable(table, bytes);
        tableOffset = await this.#allocate(bytes.length);
        await this.#writeNew(tableOffset, bytes, `bitmap '${entry.name}' table write`);
        newTables.push({ hostOffset: tableOffset, bytes: size * 8 });
        if (entry.tableOffset !== 0) {
          frees.push({ hostOffset: entry.tableOffset, bytes: entry.tableSize * 8, table: true });
        }
      }
      next.push({
        ...entry,
        tableOffset,
        tableSize: size,
        flags: bitmap.enabled ? BME_FLAG_AUTO : 0,
        inUse: false,
        auto: bitmap.enabled,
      });
    }
    for (const entry of this.#removed) {
      frees.push({ hostOffset: entry.tableOffset, bytes: entry.tableSize * 8, table: true });
      try {
        for (const stored of await this.#readTable(entry)) {
          if (stored > BITMAP_TABLE_ONES) frees.push({ hostOffset: stored, bytes: clusterSize });
        }
      } catch {
        // An unreadable table of an inconsistent bitmap: its data clusters leak (as in QEMU).
      }
    }
    let directory: Uint8Array | undefined;
    let directoryOffset = 0;
    if (next.length > 0) {
      directory = encodeBitmapDirectory(next);
      directoryOffset = await this.#allocate(directory.length);
      await this.#writeNew(directoryOffset, directory, 'bitmap directory write');
    }
    // Everything the new directory reaches, and its refcounts, durable before the header names it.
    await refcounts.commit();
    await file.flush();
    const pointer = new Uint8Array(24);
    const view = viewOf(pointer);
    view.setUint32(0, next.length);
    writeU64(view, 8, directory?.length ?? 0);
    writeU64(view, 16, directoryOffset);
    const extensionAt =
      oldValid !== undefined && next.length > 0 ? bitmapsExtensionDataOffset(header) : undefined;
    if (extensionAt !== undefined) {
      await this.#context.patchHeader(extensionAt, pointer);
      this.#context.setHeader(
        withBitmapsExtension(header, pointer, next.length, directory!.length, directoryOffset),
      );
    } else {
      // The extension comes or goes: the whole header cluster in one write, as QEMU rewrites it.
      const list = header.extensions.list.filter((extension) => extension.type !== QCOW2_EXT_MAGIC_BITMAPS);
      const extensions: Qcow2HeaderExtension[] =
        next.length > 0 ? [...list, { type: QCOW2_EXT_MAGIC_BITMAPS, data: pointer }] : list;
      const autoclear = (header.autoclearFeatures.low & ~QCOW2_AUTOCLEAR_BITMAPS) >>> 0;
      const bytes = encodeHeader({
        ...header,
        extensions,
        autoclearFeatures: {
          high: header.autoclearFeatures.high,
          low: (autoclear | (next.length > 0 ? QCOW2_AUTOCLEAR_BITMAPS : 0)) >>> 0,
        },
      });
      await this.#context.patchHeader(0, bytes);
      this.#context.setHeader(decodeHeader(bytes));
    }
    if (oldValid !== undefined) {
      metadata.remove(oldValid.bitmapDirectoryOffset, oldValid.bitmapDirectorySize);
      // The old structures are unreachable now: freeing them can only leak if lost.
      frees.push({ hostOffset: oldValid.bitmapDirectoryOffset, bytes: oldValid.bitmapDirectorySize });
    }
    if (directory !== undefined) metadata.add(directoryOffset, directory.length, 'bitmap-directory');
    for (const free of frees) if (free.table === true) metadata.remove(free.hostOffset, free.bytes);
    for (const table of newTables) metadata.add(table.hostOffset, table.bytes, 'bitmap-table');
    for (const free of frees) {
      if (free.bytes > 0) {
        await refcounts.adjust(free.hostOffset / clusterSize, Math.ceil(free.bytes / clusterSize), -1);
      }
    }
    await refcounts.commit();
    this.#entries = next;
    this.#removed.length = 0;
    this.#listChanged = false;
    for (const bitmap of this.#bitmaps.values()) bitmap.stored();
    this.#context.setDirectory(this.#entries);
  }
}

/**
 * What sets in `bitmap` the runs of set bits of a bitmap of `granularity` over a guest of
 * `guestSize` bytes (its bits directly when the granularities match).
 */
function setRuns(
  bitmap: DirtyBitmap,
  granularity: number,
  guestSize: number,
): (firstBit: number, endBit: number) => void {
  if (granularity === bitmap.granularity) return (firstBit, endBit) => bitmap.setBits(firstBit, endBit);
  return (firstBit, endBit) => {
    const offset = firstBit * granularity;
    bitmap.setGuestRange(offset, Math.min(guestSize, endBit * granularity) - offset);
  };
}

/** Where the bitmaps extension's data (nb_bitmaps, reserved, directory size, offset) lies in the header. */
function bitmapsExtensionDataOffset(header: Qcow2Header): number {
  let at = header.headerLength;
  for (const extension of header.extensions.list) {
    if (extension.type === QCOW2_EXT_MAGIC_BITMAPS) return at + 8;
    at += 8 + Math.ceil(extension.data.length / 8) * 8;
  }
  throw new BlockDeviceError('ECORRUPT', 'qcow2 header: the bitmaps extension is missing', { offset: at });
}

function withBitmapsExtension(
  header: Qcow2Header,
  data: Uint8Array,
  nbBitmaps: number,
  bitmapDirectorySize: number,
  bitmapDirectoryOffset: number,
): Qcow2Header {
  const list = header.extensions.list.map((extension) =>
    extension.type === QCOW2_EXT_MAGIC_BITMAPS ? { type: extension.type, data: data.slice() } : extension,
  );
  return {
    ...header,
    extensions: {
      ...header.extensions,
      list,
      bitmaps: { nbBitmaps, bitmapDirectorySize, bitmapDirectoryOffset },
    },
  };
}
