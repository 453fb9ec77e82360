/**
 * FileBlockDevice: a raw file or a block device (/dev/...) as a {@link BlockDevice}.
 *
 * Positioned I/O with the caller's buffers on libuv's pool, bounded per device; holes and data
 * found with lseek SEEK_DATA/SEEK_HOLE; discard and zeroing with fallocate; QEMU-compatible
 * locking. The native calls come through koffi; without it (or with `native: false`) the device
 * still works with plain Node I/O and says so in its capabilities.
 */
import {
  constants,
  fdatasync,
  read as fsRead,
  write as fsWrite,
  readSync,
  type Stats,
  writeSync,
} from 'node:fs';
import { type FileHandle, open, unlink } from 'node:fs/promises';
import type {
  BlockDevice,
  BlockDeviceCapabilities,
  Extent,
  RequestOptions,
  WriteOptions,
  WriteZeroesOptions,
} from '../block-device.js';
import { BlockDeviceError } from '../errors.js';
import { assertOpen, assertWritable, throwIfAborted, validateRange, validateSize } from '../range.js';
import { acquireLock, type LockMechanism, type LockMode, lockPlan } from './file-lock.js';
import { errnoError, fsError } from './fs-errors.js';
import { IoLimiter } from './io-limiter.js';
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  type Libc,
  loadLibc,
  SEEK_DATA,
  SEEK_END,
  SEEK_HOLE,
} from './libc.js';
import { memoryFileSystem, SYNC_IO_MAX_BYTES } from './memory-backed.js';

export interface FileOpenOptions {
  /** Open for reading only (default false). */
  readonly readOnly?: boolean;
  /** Locking; default `exclusive` for writers, `shared` for readers. See {@link LockMode}. */
  readonly lock?: LockMode;
  /** Read-only opens only: take no lock that refuses writers, and ignore theirs (qemu-img -U). */
  readonly forceShare?: boolean;
  /** Use native calls (SEEK_DATA, fallocate, OFD locks) when available (default true). With
   * false the device uses only Node's fs API: no holes reported, zeros written, no locking. */
  readonly native?: boolean;
  /** Most file-system calls this device keeps in flight at once (default 16). */
  readonly maxInFlight?: number;
  /**
   * Reads and writes of at most this many bytes run synchronously on the calling thread instead
   * of a round trip through libuv's thread pool: about 25% less CPU per 4 KiB request when the
   * data is in memory (tmpfs, page cache), but the event loop waits for each call and the work no
   * longer spreads over the pool's threads, so throughput at depth 16 was no better on 2 cores.
   * Default 0 (never); {@link SYNC_IO_MAX_BYTES} is a sensible bound for memory-backed files, and
   * `'memory-backed'` chooses it for a regular file on tmpfs or ramfs (where a read or a write is a
   * memory copy that never waits for a disk) and 0 everywhere else.
   */
  readonly syncIoMaxBytes?: number | 'memory-backed';
  /**
   * Never wait for stable storage: `flush()`, `fua` writes and `close()` skip fdatasync, as QEMU's
   * `cache=unsafe` ignores flush requests (qemu-img convert's default for its target). The page
   * cache writes the data back in its own time; a crash may lose any of it. Default false.
   */
  readonly noFlush?: boolean;
}

export interface FileCreateOptions extends Omit<FileOpenOptions, 'readOnly' | 'forceShare'> {
  /** Replace an existing file (default false: an existing file is an error). */
  readonly overwrite?: boolean;
}

/** Most extents one `blockStatus` call returns. */
export const MAX_EXTENTS_PER_CALL = 1024;
/** Largest zero buffer written at once when zeroing by writing. */
const ZERO_CHUNK = 1024 * 1024;
/** Zero chunks written at once. */
const ZERO_LANES = 4;
const DEFAULT_MAX_IN_FLIGHT = 16;
const MAXIMUM_TRANSFER = 32 * 1024 * 1024;
/** Most bytes one copy_file_range call is asked for (the event loop sees progress between). */
const COPY_RANGE_STEP = 64 * 1024 * 1024;
/** Buffer of copyTo's fallback. */
const COPY_BUFFER = 1024 * 1024;

let zeroChunk: Uint8Array | undefined;
/** A shared, never-written buffer of zeros. */
function zeros(length: number): Uint8Array {
  zeroChunk ??= new Uint8Array(ZERO_CHUNK);
  return length === ZERO_CHUNK ? zeroChunk : zeroChunk.subarray(0, length);
}

type FileKind = 'file' | 'block';

interface Features {
  seekData: boolean;
  punchHole: boolean;
  zeroRange: boolean;
}

export class FileBlockDevice implements BlockDevice {
  readonly path: string;
  readonly readOnly: boolean;
  readonly description: string;
  /** What holds this device's lock. */
  readonly lockMechanism: LockMechanism;
  #size: number;
  readonly #handle: FileHandle;
  readonly #fd: number;
  readonly #kind: FileKind;
  readonly #libc: Libc | undefined;
  readonly #features: Features;
  readonly #blockSize: number;
  readonly #limiter: IoLimiter;
  /** Requests up to this size use positioned sync I/O (0: never). */
  readonly syncIoMaxBytes: number;
  #closed = false;
  #closing: Promise<void> | undefined;
  /** copy_file_range has not failed as unsupported on this device yet. */
  #copyRange = true;
  /** See {@link FileOpenOptions.noFlush}. */
  readonly #noFlush: boolean;

  private constructor(init: {
    path: string;
    readOnly: boolean;
    handle: FileHandle;
    kind: FileKind;
    size: number;
    libc: Libc | undefined;
    features: Features;
    blockSize: number;
    lockMechanism: LockMechanism;
    maxInFlight: number;
    syncIoMaxBytes: number;
    noFlush: boolean;
  }) {
    this.path = init.path;
    this.readOnly = init.readOnly;
    this.description = `file:${init.path}`;
    this.#handle = init.handle;
    this.#fd = init.handle.fd;
    this.#kind = init.kind;
    this.#size = init.size;
    this.#libc = init.libc;
    this.#features = init.features;
    this.#blockSize = init.blockSize;
    this.lockMechanism = init.lockMechanism;
    this.#limiter = new IoLimiter(init.maxInFlight);
    this.syncIoMaxBytes = init.syncIoMaxBytes;
    this.#noFlush = init.noFlush;
  }

  /** Opens an existing file or block device. */
  static async open(path: string, options: FileOpenOptions = {}): Promise<FileBlockDevice> {
    const readOnly = options.readOnly ?? false;
    const forceShare = options.forceShare ?? false;
    if (forceShare && !readOnly) {
      throw new BlockDeviceError('EINVAL', `open: ${path}: forceShare needs a read-only open`);
    }
    let handle: FileHandle;
    try {
      const opening = open(path, readOnly ? 'r' : 'r+');
      loadLibcWhileWaiting(options);
      handle = await opening;
    } catch (error) {
      throw fsError('open', path, error);
    }
    return FileBlockDevice.#setUp(path, handle, readOnly, forceShare, options, false);
  }

  /** Creates a sparse file of `size` bytes and opens it for writing. */
  static async create(path: string, size: number, options: FileCreateOptions = {}): Promise<FileBlockDevice> {
    validateSize(size);
    let handle: FileHandle;
    try {
      // No O_TRUNC: an existing file is emptied only once its lock is ours.
      const flags = constants.O_RDWR | constants.O_CREAT | (options.overwrite ? 0 : constants.O_EXCL);
      const opening = open(path, flags, 0o644);
      loadLibcWhileWaiting(options);
      handle = await opening;
    } catch (error) {
      throw fsError('create', path, error);
    }
    try {
      return await FileBlockDevice.#setUp(path, handle, false, false, options, true, size);
    } catch (error) {
      // A file this call created is removed again; an existing one is left as it was.
      if (!options.overwrite) await unlink(path).catch(() => {});
      throw error;
    }
  }

  static async #setUp(
    path: string,
    handle: FileHandle,
    readOnly: boolean,
    forceShare: boolean,
    options: FileOpenOptions,
    create: boolean,
    createSize = 0,
  ): Promise<FileBlockDevice> {
    try {
      const libc = options.native === false ? undefined : loadLibc();
      const maxInFlight = options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
      if (!Number.isSafeInteger(maxInFlight) || maxInFlight < 1) {
        throw new BlockDeviceError(
          'EINVAL',
          `open: ${path}: maxInFlight ${maxInFlight} is not a positive integer`,
        );
      }
      let stats: Stats;
      // The file system's kind alongside (one round trip through the pool for both): a file held in
      // memory needs neither the ext4/xfs close workaround nor a probe for hole punching below.
      // Asked only where it decides something: inline I/O, or a writable file's probe and close.
      const onMemory =
        options.syncIoMaxBytes === 'memory-backed' || !readOnly
          ? memoryFileSystem(path)
          : Promise.resolve(undefined);
      try {
        stats = await handle.stat();
      } catch (error) {
        await onMemory;
        throw fsError('stat', path, error);
      }
      const memory = (await onMemory) ?? 'none';
      const kind: FileKind | undefined = stats.isFile()
        ? 'file'
        : stats.isBlockDevice()
          ? 'block'
          : undefined;
      /** The file system holding a regular file in memory (/dev's nodes are on devtmpfs too). */
      const memoryFile = kind === 'file' ? memory : 'none';
      if (kind === undefined) {
        throw new BlockDeviceError('EINVAL', `open: ${path}: not a regular file or block device`);
      }
      if (create && kind !== 'file') {
        throw new BlockDeviceError('EINVAL', `create: ${path}: not a regular file`);
      }
      const mode = options.lock ?? (readOnly ? 'shared' : 'exclusive');
      const lockMechanism = acquireLock(
        libc,
        handle.fd,
        path,
        lockPlan(readOnly, mode, forceShare),
        forceShare,
      );

      let size: number;
      if (create) {
        try {
          await handle.truncate(0);
          if (createSize > 0) await handle.truncate(createSize);
        } catch (error) {
          throw fsError('create', path, error);
        }
        if (options.noFlush === true && memoryFile === 'none') await forgetTruncation(path);
        size = createSize;
      } else if (kind === 'file') {
        size = stats.size;
      } else {
        size = blockDeviceSize(libc, handle.fd, path);
      }

      const features: Features = { seekData: false, punchHole: false, zeroRange: false };
      if (libc !== undefined) {
        const probe = libc.lseek(handle.fd, 0, SEEK_DATA);
        features.seekData = probe.ok || probe.code === 'ENXIO';
        if (!readOnly) {
          if (memoryFile === 'tmpfs') {
            features.punchHole = true; // tmpfs punches holes since Linux 3.5
          } else if (kind === 'file') {
            // Punching past the end changes nothing and tells whether the file system can punch.
            const punch = await libc.fallocate(
              handle.fd,
              FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
              size,
              1,
            );
            features.punchHole = punch.ok;
          } else {
            features.punchHole = true; // block devices punch since Linux 4.9; dropped on EOPNOTSUPP
          }
          features.zeroRange = true; // tried on first use, dropped on EOPNOTSUPP
        }
      }
      const blockSize = kind === 'file' && stats.blksize > 0 ? stats.blksize : 4096;
      const syncIoMaxBytes =
        options.syncIoMaxBytes === 'memory-backed'
          ? memoryFile !== 'none'
            ? SYNC_IO_MAX_BYTES
            : 0
          : (options.syncIoMaxBytes ?? 0);
      if (!Number.isSafeInteger(syncIoMaxBytes) || syncIoMaxBytes < 0) {
        throw new BlockDeviceError(
          'EINVAL',
          `open: ${path}: syncIoMaxBytes ${syncIoMaxBytes} is not a non-negative integer`,
        );
      }
      return new FileBlockDevice({
        path,
        readOnly,
        handle,
        kind,
        size,
        libc,
        features,
        blockSize,
        lockMechanism,
        maxInFlight,
        syncIoMaxBytes,
        noFlush: options.noFlush ?? false,
      });
    } catch (error) {
      await handle.close().catch(() => {});
      throw error;
    }
  }

  /**
   * The open file descriptor, valid until `close()`: for callers that move the file's bytes
   * without reading them into memory (the NBD server's sendfile(2) of READ replies). Reads through
   * it see every write made through this device.
   */
  get fd(): number {
    return this.#fd;
  }

  get size(): number {
    return this.#size;
  }

  get capabilities(): BlockDeviceCapabilities {
    const f = this.#features;
    const fastZero = !this.readOnly && (f.punchHole || (f.zeroRange && this.#kind === 'block'));
    return {
      discard: !this.readOnly && f.punchHole,
      writeZeroes: fastZero,
      fastZero,
      blockStatus: f.seekData,
      flush: !this.#noFlush,
      fua: false,
      resize: this.#kind === 'file',
      minimumAlignment: 1,
      preferredAlignment: this.#blockSize,
      maximumTransfer: MAXIMUM_TRANSFER,
    };
  }

  async read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    validateRange(this.#size, offset, length, 'read');
    const buffer = new Uint8Array(length);
    await this.readInto(buffer, offset, options);
    return buffer;
  }

  readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    // Not async: the hot path creates one promise per request, not three.
    try {
      this.#check('read', options);
      validateRange(this.#size, offset, buffer.length, 'read');
    } catch (error) {
      return Promise.reject(error);
    }
    if (buffer.length === 0) return Promise.resolve();
    return buffer.length <= this.syncIoMaxBytes
      ? this.#readNow(buffer, offset)
      : this.#readFully(buffer, offset);
  }

  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    try {
      this.#check('write', options);
      assertWritable(this, 'write');
      validateRange(this.#size, offset, data.length, 'write');
    } catch (error) {
      return Promise.reject(error);
    }
    const written =
      data.length === 0
        ? Promise.resolve()
        : data.length <= this.syncIoMaxBytes
          ? this.#writeNow(data, offset)
          : this.#writeFully(data, offset);
    return options?.fua ? written.then(() => this.#datasync()) : written;
  }

  async writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    this.#check('writeZeroes', options);
    assertWritable(this, 'writeZeroes');
    validateRange(this.#size, offset, length, 'writeZeroes');
    if (length > 0) {
      const done = options?.mayUnmap
        ? await this.#punch(offset, length)
        : await this.#zeroInPlace(offset, length);
      if (!done) {
        if (options?.fastOnly) {
          throw new BlockDeviceError(
            'ENOTSUP',
            `writeZeroes: ${this.path}: no fast way to write zeros here`,
            {
              offset,
            },
          );
        }
        await this.#writeZeros(offset, length);
      }
    }
    if (options?.fua) await this.#datasync();
  }

  async discard(offset: number, length: number, options?: RequestOptions): Promise<void> {
    this.#check('discard', options);
    assertWritable(this, 'discard');
    validateRange(this.#size, offset, length, 'discard');
    if (length > 0) await this.#punch(offset, length);
  }

  async flush(options?: RequestOptions): Promise<void> {
    this.#check('flush', options);
    if (!this.readOnly) await this.#datasync();
  }

  async blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    this.#check('blockStatus', options);
    validateRange(this.#size, offset, length, 'blockStatus');
    if (length === 0) return [];
    const end = offset + length;
    const libc = this.#libc;
    if (!this.#features.seekData || libc === undefined) {
      return [dataExtent(offset, length)];
    }
    const extents: Extent[] = [];
    let position = offset;
    while (position < end && extents.length < MAX_EXTENTS_PER_CALL) {
      const data = libc.lseek(this.#fd, position, SEEK_DATA);
      let dataStart: number;
      if (data.ok) dataStart = data.value;
      else if (data.code === 'ENXIO')
        dataStart = end; // nothing but hole up to the end of file
      else throw errnoError('blockStatus', this.path, data.code, position);
      if (dataStart > position) {
        const holeEnd = Math.min(dataStart, end);
        extents.push(holeExtent(position, holeEnd - position));
        position = holeEnd;
        continue;
      }
      const hole = libc.lseek(this.#fd, position, SEEK_HOLE);
      // ENXIO here means the file shrank under us: the rest reads as zeros.
      if (!hole.ok && hole.code !== 'ENXIO') throw errnoError('blockStatus', this.path, hole.code, position);
      const dataEnd = hole.ok ? Math.min(Math.max(hole.value, position + 1), end) : position;
      if (dataEnd === position) {
        extents.push(holeExtent(position, end - position));
        position = end;
      } else {
        extents.push(dataExtent(position, dataEnd - position));
        position = dataEnd;
      }
    }
    return extents;
  }

  /**
   * Copies `length` bytes at `sourceOffset` of this file to `targetOffset` of `target` with
   * copy_file_range(2): the kernel moves the data (or shares it, on file systems that can), no
   * buffer passes through JavaScript. Where the call is unavailable (no native binding, files on
   * different file systems before Linux 5.3, a file system or block device that refuses it:
   * EXDEV, ENOSYS, EOPNOTSUPP, EINVAL) it falls back to reads and writes through a buffer, and
   * remembers not to try again on this device. Source bytes past the end of this file (it shrank)
   * arrive as zeros, as `read` returns them.
   */
  async copyTo(
    target: FileBlockDevice,
    sourceOffset: number,
    targetOffset: number,
    length: number,
    options?: RequestOptions,
  ): Promise<void> {
    this.#check('read', options);
    target.#check('write', options);
    assertWritable(target, 'write');
    validateRange(this.#size, sourceOffset, length, 'read');
    validateRange(target.#size, targetOffset, length, 'write');
    let done = 0;
    const copyFileRange = this.#libc?.copyFileRange;
    if (copyFileRange !== undefined && this.#copyRange) {
      while (done < length) {
        const step = Math.min(length - done, COPY_RANGE_STEP);
        const at = done;
        const r = await this.#limiter.run(() =>
          copyFileRange(this.#fd, sourceOffset + at, target.#fd, targetOffset + at, step),
        );
        if (!r.ok) {
          if (!isUnsupported(r.code) && r.code !== 'EXDEV') {
            throw errnoError('copy_file_range', `${this.path} -> ${target.path}`, r.code, sourceOffset + at);
          }
          this.#copyRange = false;
          break;
        }
        if (r.value === 0) break; // the end of this file: the rest goes through read, as zeros
        done += r.value;
      }
    }
    if (done < length)
      await this.#copyByBuffer(target, sourceOffset + done, targetOffset + done, length - done);
  }

  async #copyByBuffer(target: FileBlockDevice, sourceOffset: number, targetOffset: number, length: number) {
    const buffer = new Uint8Array(Math.min(length, COPY_BUFFER));
    for (let done = 0; done < length; done += buffer.length) {
      const view = buffer.subarray(0, Math.min(buffer.length, length - done));
      await this.readInto(view, sourceOffset + done);
      await target.write(targetOffset + done, view);
    }
  }

  async resize(newSize: number): Promise<void> {
    assertOpen(this.#closed, this.description, 'resize');
    assertWritable(this, 'resize');
    validateSize(newSize, 'resize');
    if (this.#kind !== 'file') {
      throw new BlockDeviceError('ENOTSUP', `resize: ${this.path}: a block device cannot be resized`);
    }
    await this.#limiter.run(async () => {
      try {
        await this.#handle.truncate(newSize);
      } catch (error) {
        throw fsError('resize', this.path, error);
      }
    });
    this.#size = newSize;
  }

  /** Bytes of storage the file occupies (st_blocks x 512), as `qemu-img info` reports. */
  async allocatedBytes(): Promise<number> {
    assertOpen(this.#closed, this.description, 'allocatedBytes');
    try {
      const stats = await this.#handle.stat();
      return stats.blocks * 512;
    } catch (error) {
      throw fsError('stat', this.path, error);
    }
  }

  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  async #close(): Promise<void> {
    this.#closed = true;
    await this.#limiter.whenIdle();
    let failure: unknown;
    if (!this.readOnly) await this.#datasyncNow().catch((error: unknown) => (failure = error));
    await this.#handle.close().catch((error: unknown) => (failure ??= fsError('close', this.path, error)));
    if (failure !== undefined) throw failure;
  }

  #check(kind: string, options: RequestOptions | undefined): void {
    assertOpen(this.#closed, this.description, kind);
    throwIfAborted(options?.signal);
  }

  /** Positioned read on this thread (small requests on memory-backed files). */
  #readNow(buffer: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    try {
      while (done < buffer.length) {
        const bytesRead = readSync(this.#fd, buffer, done, buffer.length - done, offset + done);
        if (bytesRead === 0) {
          // The file shrank under us: the rest reads as zeros.
          buffer.fill(0, done);
          break;
        }
        done += bytesRead;
      }
    } catch (error) {
      return Promise.reject(fsError('read', this.path, error, offset + done));
    }
    return Promise.resolve();
  }

  /** Positioned write on this thread (small requests on memory-backed files). */
  #writeNow(data: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    try {
      while (done < data.length) {
        const written = writeSync(this.#fd, data, done, data.length - done, offset + done);
        if (written === 0) {
          return Promise.reject(
            new BlockDeviceError('EIO', `write: ${this.path}: no progress`, { offset: offset + done }),
          );
        }
        done += written;
      }
    } catch (error) {
      return Promise.reject(fsError('write', this.path, error, offset + done));
    }
    return Promise.resolve();
  }

  #readFully(buffer: Uint8Array, offset: number): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#limiter.submit((release) => {
        const step = (done: number): void => {
          fsRead(this.#fd, buffer, done, buffer.length - done, offset + done, (error, bytesRead) => {
            if (error) {
              release();
              reject(fsError('read', this.path, error, offset + done));
              return;
            }
            const total = done + bytesRead;
            if (total < buffer.length && bytesRead > 0) {
              step(total);
              return;
            }
            // bytesRead 0 before the end: the file shrank under us, the rest reads as zeros.
            if (total < buffer.length) buffer.fill(0, total);
            release();
            resolve();
          });
        };
        step(0);
      });
    });
  }

  #writeFully(data: Uint8Array, offset: number): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#limiter.submit((release) => {
        const step = (done: number): void => {
          fsWrite(this.#fd, data, done, data.length - done, offset + done, (error, written) => {
            if (error || written === 0) {
              release();
              reject(
                error
                  ? fsError('write', this.path, error, offset + done)
                  : new BlockDeviceError('EIO', `write: ${this.path}: no progress`, {
                      offset: offset + done,
                    }),
              );
              return;
            }
            const total = done + written;
            if (total < data.length) {
              step(total);
              return;
            }
            release();
            resolve();
          });
        };
        step(0);
      });
    });
  }

  /** Writes zeros in 1 MiB chunks, a few at a time (never a promise per chunk of a huge range). */
  async #writeZeros(offset: number, length: number): Promise<void> {
    const end = offset + length;
    let position = offset;
    let failure: unknown;
    const lane = async (): Promise<void> => {
      while (position < end && failure === undefined) {
        const at = position;
        const chunk = Math.min(ZERO_CHUNK, end - at);
        position += chunk;
        try {
          await this.#writeFully(zeros(chunk), at);
        } catch (error) {
          failure ??= error;
        }
      }
    };
    const lanes = Math.min(ZERO_LANES, Math.ceil(length / ZERO_CHUNK));
    await Promise.all(Array.from({ length: lanes }, lane));
    if (failure !== undefined) throw failure;
  }

  /** Deallocates the block-aligned middle of the range and writes zeros on its edges. Returns false
   * (having done nothing) where the file system cannot punch holes. */
  async #punch(offset: number, length: number): Promise<boolean> {
    const libc = this.#libc;
    if (!this.#features.punchHole || libc === undefined) return false;
    const end = offset + length;
    const alignedStart = Math.ceil(offset / this.#blockSize) * this.#blockSize;
    const alignedEnd = Math.floor(end / this.#blockSize) * this.#blockSize;
    if (alignedStart >= alignedEnd) {
      await this.#writeZeros(offset, length);
      return true;
    }
    const r = await this.#limiter.run(() =>
      libc.fallocate(
        this.#fd,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        alignedStart,
        alignedEnd - alignedStart,
      ),
    );
    if (!r.ok) {
      if (isUnsupported(r.code)) {
        this.#features.punchHole = false;
        return false;
      }
      throw errnoError('punch hole', this.path, r.code, alignedStart);
    }
    const edges: Promise<void>[] = [];
    if (offset < alignedStart) edges.push(this.#writeZeros(offset, alignedStart - offset));
    if (alignedEnd < end) edges.push(this.#writeZeros(alignedEnd, end - alignedEnd));
    await settleAll(edges);
    return true;
  }

  /** Zeros the range keeping it allocated: FALLOC_FL_ZERO_RANGE, else punch then allocate again.
   * Returns false (having done nothing) where neither works. */
  async #zeroInPlace(offset: number, length: number): Promise<boolean> {
    const libc = this.#libc;
    if (libc === undefined) return false;
    if (this.#features.zeroRange) {
      const r = await this.#limiter.run(() =>
        libc.fallocate(this.#fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length),
      );
      if (r.ok) return true;
      if (!isUnsupported(r.code)) throw errnoError('zero range', this.path, r.code, offset);
      this.#features.zeroRange = false;
    }
    if (this.#kind !== 'file' || !(await this.#punch(offset, length))) return false;
    const r = await this.#limiter.run(() => libc.fallocate(this.#fd, FALLOC_FL_KEEP_SIZE, offset, length));
    if (!r.ok && !isUnsupported(r.code)) throw errnoError('allocate', this.path, r.code, offset);
    return true;
  }

  #datasync(): Promise<void> {
    return this.#limiter.run(() => this.#datasyncNow());
  }

  #datasyncNow(): Promise<void> {
    if (this.#noFlush) return Promise.resolve();
    return new Promise((resolve, reject) => {
      fdatasync(this.#fd, (error) => (error ? reject(fsError('flush', this.path, error)) : resolve()));
    });
  }
}

/**
 * ext4 (auto_da_alloc) and xfs mark a file truncated to zero bytes; when a descriptor of it is
 * closed, they start writeback of everything written to it and wait for its blocks to be
 * allocated: the close of a new 1 GiB target holding 512 MiB took 0.15-0.35 s on ext4 here, most
 * of what a flush costs. A descriptor closed before anything is written clears the mark (QEMU
 * empties a new image through a descriptor it closes, so it never pays this). Only for `noFlush`
 * files: with a flush at close, the close finds nothing left to write back anyway. The locks
 * (OFD, flock) belong to the other descriptor's open file description and stay. Exported for
 * other writers of new files without a flush (qcow2-writer's file sinks).
 */
export async function forgetTruncation(path: string): Promise<void> {
  try {
    await (await open(path, 'r')).close();
  } catch {
    // Not readable: the close stays slower, nothing else changes.
  }
}

/**
 * Loads the libc binding (once per process, ~2.5 ms of this thread: koffi's binary and its
 * function table) while the thread pool opens the file, instead of after: the first open of a
 * run also waits for the pool's threads to start.
 */
function loadLibcWhileWaiting(options: FileOpenOptions): void {
  if (options.native !== false) loadLibc();
}

function dataExtent(offset: number, length: number): Extent {
  return { offset, length, zero: false, data: true, present: true, depth: 0, hostOffset: offset };
}

function holeExtent(offset: number, length: number): Extent {
  return { offset, length, zero: true, data: false, present: false, depth: 0 };
}

function isUnsupported(code: string): boolean {
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'EINVAL';
}

function blockDeviceSize(libc: Libc | undefined, fd: number, path: string): number {
  if (libc === undefined) {
    throw new BlockDeviceError('ENOTSUP', `open: ${path}: block devices need the native binding (koffi)`);
  }
  const bySeek = libc.lseek(fd, 0, SEEK_END);
  if (bySeek.ok && bySeek.value > 0) return bySeek.value;
  const byIoctl = libc.blockDeviceSize(fd);
  if (byIoctl.ok) return byIoctl.value;
  throw errnoError('open', path, byIoctl.code);
}

/** Waits for every promise, then rethrows the first failure (so no write is left running). */
async function settleAll(promises: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(promises);
  for (const result of results) if (result.status === 'rejected') throw result.reason;
}
