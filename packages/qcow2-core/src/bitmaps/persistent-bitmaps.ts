/**
 * The persistent dirty bitmaps of an image open for writing, kept as QEMU keeps them:
 *
 * - Opening marks every consistent bitmap `in_use` in the directory (in place, flushed) before
 *   any guest write, so a crash leaves them flagged inconsistent, never wrongly consistent.
 *   A bitmap already `in_use` at open is inconsistent: kept as it is, never changed or used.
 * - Enabled (`auto`) bitmaps get the bits of every written, zeroed or discarded range set
 *   (in memory, sparse: see dirty-bitmap.ts).
 * - Storing (on close; a flush leaves them `in_use`, as QEMU does) writes every changed part of a
 *   bitmap to new clusters, a new table when one changed, and a new directory with `in_use`
 *   cleared; then, once all that and its refcounts are durable, switches the header's bitmaps
 *   extension to the new directory in one in-place write, and only then frees what it replaced.
 *   A crash before the switch leaves the old directory (bitmaps `in_use`) and leaks; after it,
 *   the new bitmaps and leaks.
 *
 * Unchanged parts of a bitmap keep their data clusters (a new table points at them); QEMU rewrites
 * them all, which reads the same.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import type { MetadataMap } from '../alloc/metadata-map.js';
import type { RefcountStore } from '../alloc/refcount-store.js';
import { viewOf, writeU64 } from '../format/binary.js';
import {
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  BME_MAX_PHYS_SIZE,
  BME_MAX_TABLE_SIZE,
  bitmapEntryProblem,
  bitmapTableSize,
  decodeBitmapDirectory,
  encodeBitmapDirectory,
  type Qcow2BitmapEntry,
} from '../format/bitmap-directory.js';
import type { Qcow2Header } from '../format/header.js';
import { QCOW2_EXT_MAGIC_BITMAPS } from '../format/header-extensions.js';
import {
  BITMAP_TABLE_ONES,
  BITMAP_TABLE_ZEROS,
  bitmapTableBytes,
  decodeBitmapTable,
  encodeBitmapTable,
} from './bitmap-table.js';
import { DirtyBitmap } from './dirty-bitmap.js';

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

export class PersistentBitmaps {
  readonly #context: PersistentBitmapsContext;
  readonly #clusterSize: number;
  /** The directory as on disk, in its order. */
  #entries: Qcow2BitmapEntry[];
  /** The consistent bitmaps, by name. */
  readonly #bitmaps = new Map<string, DirtyBitmap>();
  /** Enabled bitmaps (the ones writes mark). */
  #enabled: DirtyBitmap[] = [];

  private constructor(context: PersistentBitmapsContext, entries: Qcow2BitmapEntry[]) {
    this.#context = context;
    this.#clusterSize = context.header().clusterSize;
    this.#entries = entries;
  }

  /**
   * Validates the directory `entries` and the tables of its consistent bitmaps (refusing what
   * QEMU refuses to open), registers them as metadata, and marks the consistent ones in use.
   */
  static async open(
    context: PersistentBitmapsContext,
    entries: readonly Qcow2BitmapEntry[],
    guestSize: number,
  ): Promise<PersistentBitmaps> {
    const header = context.header();
    const extension = header.extensions.bitmaps!;
    const clusterSize = header.clusterSize;
    const { file, metadata } = context;
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
      if (problem !== undefined) {
        refuse('ECORRUPT', `bitmap '${entry.name}': ${problem}`, extension.bitmapDirectoryOffset);
      }
      if (names.has(entry.name)) refuse('ECORRUPT', `bitmap '${entry.name}' is listed twice`);
      names.add(entry.name);
    }
    metadata.check(
      extension.bitmapDirectoryOffset,
      extension.bitmapDirectorySize,
      undefined,
      'bitmap directory',
    );
    metadata.add(extension.bitmapDirectoryOffset, extension.bitmapDirectorySize, 'bitmap-directory');
    const bitmaps = new PersistentBitmaps(context, [...entries]);
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
    bitmaps.#enabled = [...bitmaps.#bitmaps.values()].filter((bitmap) => bitmap.enabled);
    if (bitmaps.#bitmaps.size > 0) await bitmaps.#markInUse();
    return bitmaps;
  }

  /** Names of the bitmaps that were in use at open (inconsistent: kept, never used). */
  get inconsistent(): string[] {
    return this.#entries.filter((entry) => !this.#bitmaps.has(entry.name)).map((entry) => entry.name);
  }

  /** The consistent bitmaps (for tests and tools). */
  bitmap(name: string): DirtyBitmap | undefined {
    return this.#bitmaps.get(name);
  }

  /** Sets the bits of every enabled bitmap for a write, zeroing or discard of the guest range. */
  mark(guestOffset: number, length: number): void {
    for (const bitmap of this.#enabled) bitmap.mark(guestOffset, length);
  }

  /** Throws what QEMU says when a resize to `guestSize` is impossible with these bitmaps. */
  checkResize(guestSize: number): void {
    const [name] = this.inconsistent;
    if (name !== undefined) {
      throw new BlockDeviceError(
        'EINVAL',
        `qcow2: ${this.#context.description}: resize: bitmap '${name}' is inconsistent and cannot be used (remove it first)`,
      );
    }
    for (const bitmap of this.#bitmaps.values()) {
      const tableSize = bitmapTableSize(guestSize, bitmap.granularity, this.#clusterSize);
      if (tableSize > BME_MAX_TABLE_SIZE || tableSize * this.#clusterSize > BME_MAX_PHYS_SIZE) {
        throw new BlockDeviceError(
          'EINVAL',
          `qcow2: ${this.#context.description}: resize: bitmap '${bitmap.name}' would take too much space (use a larger granularity)`,
        );
      }
    }
  }

  /** Follows a guest size change (after {@link checkResize}). */
  resize(guestSize: number): void {
    for (const bitmap of this.#bitmaps.values()) bitmap.resize(guestSize);
  }

  /** The table of `entry`, validated. */
  async #readTable(entry: { name: string; tableOffset: number; tableSize: number }): Promise<Float64Array> {
    const { file } = this.#context;
    const bytes = await file.read(entry.tableOffset, entry.tableSize * 8);
    return decodeBitmapTable(bytes, entry.tableSize, this.#clusterSize, file.size, entry.tableOffset);
  }

  /** Sets `in_use` on the consistent bitmaps' entries, in place, durable before any write. */
  async #markInUse(): Promise<void> {
    const { file, metadata } = this.#context;
    const extension = this.#context.header().extensions.bitmaps!;
    const bytes = await file.read(extension.bitmapDirectoryOffset, extension.bitmapDirectorySize);
    const view = viewOf(bytes);
    let at = 0;
    for (let index = 0; index < this.#entries.length; index++) {
      const flags = view.getUint32(at + 12);
      view.setUint32(at + 12, (flags | BME_FLAG_IN_USE) >>> 0);
      at = Math.ceil((at + 24 + view.getUint32(at + 20) + view.getUint16(at + 18)) / 8) * 8;
    }
    metadata.check(
      extension.bitmapDirectoryOffset,
      bytes.length,
      'bitmap-directory',
      'bitmap directory write',
    );
    await file.write(extension.bitmapDirectoryOffset, bytes);
    await file.flush();
    this.#entries = decodeBitmapDirectory(bytes, this.#entries.length, extension.bitmapDirectoryOffset);
    this.#context.setDirectory(this.#entries);
  }

  /** Allocates `bytes` (whole clusters) and returns the host offset. */
  async #allocate(bytes: number): Promise<number> {
    const clusters = Math.ceil(bytes / this.#clusterSize);
    return (await this.#context.refcounts.allocate(clusters)) * this.#clusterSize;
  }

  async #writeNew(hostOffset: number, bytes: Uint8Array, what: string): Promise<void> {
    this.#context.metadata.check(hostOffset, bytes.length, undefined, what);
    await this.#context.file.write(hostOffset, bytes);
  }

  /**
   * Stores the consistent bitmaps (see the file comment). Data and metadata of the guest must be
   * durable already (the bits cover them). Called once, on close.
   */
  async store(): Promise<void> {
    if (this.#bitmaps.size === 0) return;
    const { file, refcounts, metadata } = this.#context;
    const clusterSize = this.#clusterSize;
    const header = this.#context.header();
    const oldExtension = header.extensions.bitmaps!;
    /** Host ranges to free once the header points at the new directory. */
    const frees: { hostOffset: number; bytes: number; kind?: 'bitmap-table' }[] = [];
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
        const content = bitmap.compose(
          chunk,
          stored === BITMAP_TABLE_ZEROS
            ? undefined
            : stored === BITMAP_TABLE_ONES
              ? 'ones'
              : await file.read(stored, clusterSize),
        );
        if (stored > BITMAP_TABLE_ONES) frees.push({ hostOffset: stored, bytes: clusterSize });
        if (content === undefined) {
          table[chunk] = BITMAP_TABLE_ZEROS;
          continue;
        }
        const hostOffset = await this.#allocate(clusterSize);
        await refcounts.extendFile();
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
        await refcounts.extendFile();
        await this.#writeNew(tableOffset, bytes, `bitmap '${entry.name}' table write`);
        newTables.push({ hostOffset: tableOffset, bytes: size * 8 });
        frees.push({ hostOffset: entry.tableOffset, bytes: entry.tableSize * 8, kind: 'bitmap-table' });
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
    const directory = encodeBitmapDirectory(next);
    const directoryOffset = await this.#allocate(directory.length);
    await refcounts.extendFile();
    await this.#writeNew(directoryOffset, directory, 'bitmap directory write');
    // Everything the new directory reaches, and its refcounts, durable before the header names it.
    await refcounts.commit();
    await file.flush();
    const extensionAt = bitmapsExtensionDataOffset(header);
    const pointer = new Uint8Array(24);
    const view = viewOf(pointer);
    view.setUint32(0, next.length);
    writeU64(view, 8, directory.length);
    writeU64(view, 16, directoryOffset);
    await this.#context.patchHeader(extensionAt, pointer);
    this.#context.setHeader(
      withBitmapsExtension(header, pointer, next.length, directory.length, directoryOffset),
    );
    metadata.remove(oldExtension.bitmapDirectoryOffset, oldExtension.bitmapDirectorySize);
    metadata.add(directoryOffset, directory.length, 'bitmap-directory');
    for (const free of frees) if (free.kind === 'bitmap-table') metadata.remove(free.hostOffset, free.bytes);
    for (const table of newTables) metadata.add(table.hostOffset, table.bytes, 'bitmap-table');
    // The old structures are unreachable now: freeing them can only leak if lost.
    frees.push({ hostOffset: oldExtension.bitmapDirectoryOffset, bytes: oldExtension.bitmapDirectorySize });
    for (const free of frees) {
      await refcounts.adjust(free.hostOffset / clusterSize, Math.ceil(free.bytes / clusterSize), -1);
    }
    await refcounts.commit();
    this.#entries = decodeBitmapDirectory(directory, next.length, directoryOffset);
    for (const bitmap of this.#bitmaps.values()) bitmap.stored();
    this.#context.setDirectory(this.#entries);
  }
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
