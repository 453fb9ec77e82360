/**
 * The few libc calls Node lacks (lseek SEEK_DATA/SEEK_HOLE, fallocate, copy_file_range, fcntl OFD
 * locks, flock, ioctl BLKGETSIZE64, int-valued getsockopt/setsockopt, sendfile, splice and pipes), reached through koffi, in
 * this one place for every package (the NBD server sizes its unix sockets' send buffers with it). Everything here is optional: when koffi cannot load
 * (unsupported platform, missing binary), `loadLibc()` returns undefined and callers fall back to
 * plain Node I/O.
 *
 * Linux only: the constants and the `struct flock` layout below are those of 64-bit Linux
 * (x86_64 and aarch64 share them).
 */
import { createRequire } from 'node:module';
import { arch, platform } from 'node:os';

type Koffi = typeof import('koffi');
type KoffiFunction = ReturnType<ReturnType<Koffi['load']>['func']>;

/** lseek whence values. */
export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

/** fallocate modes. */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** fcntl commands and lock types for open-file-description locks. */
export const F_OFD_GETLK = 36;
export const F_OFD_SETLK = 37;
export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;

/** flock operations. */
export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;

/** splice flags. */
export const SPLICE_F_MOVE = 0x01;
export const SPLICE_F_NONBLOCK = 0x02;

/** fcntl commands for a pipe's capacity. */
export const F_SETPIPE_SZ = 1031;
export const F_GETPIPE_SZ = 1032;

/** pipe2 flags. */
export const O_CLOEXEC = 0o2000000;

/** ioctl request for a block device's size in bytes (_IOR(0x12, 114, size_t)). */
const BLKGETSIZE64 = 0x80081272;

/** Size of `struct flock` on 64-bit Linux: l_type (i16 @0), l_whence (i16 @2), l_start (i64 @8),
 * l_len (i64 @16), l_pid (i32 @24), padded to 32. */
const FLOCK_STRUCT_SIZE = 32;

/** A result of a raw call: a non-negative value, or the errno name of a failure. */
export type CallResult = { ok: true; value: number } | { ok: false; errno: number; code: string };

export interface Libc {
  /** lseek(fd, offset, whence). */
  lseek(fd: number, offset: number, whence: number): CallResult;
  /** fallocate on libuv-independent worker threads (koffi's async pool); errno is recovered by
   * repeating a failed call synchronously (fallocate modes used here are idempotent). */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<CallResult>;
  /** copy_file_range(2) from `inFd` at `inOffset` to `outFd` at `outOffset` (neither file's own
   * position moves), on koffi's worker threads: resolves to the bytes copied (0 at the end of the
   * input file). errno is recovered as for `fallocate`: a failed call copied nothing, so repeating
   * it synchronously is safe. Optional: test doubles of this interface may leave it out. */
  copyFileRange?(
    inFd: number,
    inOffset: number,
    outFd: number,
    outOffset: number,
    length: number,
  ): Promise<CallResult>;
  /** Tests whether another open file description holds a lock conflicting with a write lock on
   * `[start, start + length)`. */
  ofdTestConflict(fd: number, start: number, length: number): CallResult;
  /** Takes (or releases, with F_UNLCK) an OFD lock without waiting. */
  ofdSetLock(fd: number, type: number, start: number, length: number): CallResult;
  flock(fd: number, operation: number): CallResult;
  /** Size in bytes of the block device open on `fd`. */
  blockDeviceSize(fd: number): CallResult;
  /** getsockopt(fd, level, name) of an int-valued option: its value. Optional: test doubles of
   * this interface may leave it out. */
  getSocketInt?(fd: number, level: number, name: number): CallResult;
  /** setsockopt(fd, level, name) of an int-valued option. Optional as `getSocketInt`. */
  setSocketInt?(fd: number, level: number, name: number, value: number): CallResult;
  /** sendfile(2) of `length` bytes of `inFd` from `inOffset` (its own position does not move) to
   * `outFd`, on this thread: the bytes sent (0 at the input's end). Meant for non-blocking sockets
   * and memory-backed files, where it never waits (EAGAIN when the socket is full). Optional as
   * `getSocketInt`. */
  sendFile?(outFd: number, inFd: number, inOffset: number, length: number): CallResult;
  /** splice(2) of up to `length` bytes from `inFd` to `outFd`, on this thread: the bytes moved (0
   * at the input's end). One side must be a pipe; an offset is given for the side that is a file
   * (its own position does not move) and left undefined for a pipe or a socket. Optional as
   * `getSocketInt`. */
  splice?(
    inFd: number,
    inOffset: number | undefined,
    outFd: number,
    outOffset: number | undefined,
    length: number,
    flags: number,
  ): CallResult;
  /** pipe2(2): a new pipe's read and write ends. Optional as `getSocketInt`. */
  pipe?(
    flags: number,
  ): { ok: true; readFd: number; writeFd: number } | { ok: false; errno: number; code: string };
  /** fcntl(fd, cmd, value) of a command taking an int (F_SETPIPE_SZ, F_GETPIPE_SZ). Optional as
   * `getSocketInt`. */
  fcntlInt?(fd: number, command: number, value: number): CallResult;
  /** Plain blocking calls for a thread that does nothing else (a worker serving one NBD
   * connection): see RawIo. Optional as `getSocketInt`. */
  rawIo?: RawIo;
}

/**
 * read, write, pread, pwrite, sendfile, fdatasync, close, poll and lseek(SEEK_HOLE) called directly on this
 * thread, for a thread of its own that may block in them. Each returns its count (0 or more) or a
 * failure as minus errno; nothing is allocated per call. Buffers are passed as they are (pass a
 * subarray for a part of one); `length` must not pass the buffer's end.
 */
export interface RawIo {
  read(fd: number, buffer: Uint8Array, length: number): number;
  write(fd: number, buffer: Uint8Array, length: number): number;
  pread(fd: number, buffer: Uint8Array, length: number, position: number): number;
  pwrite(fd: number, buffer: Uint8Array, length: number, position: number): number;
  /** sendfile(2) of `length` bytes of `inFd` from `inOffset` (its position does not move). */
  sendfile(outFd: number, inFd: number, inOffset: number, length: number): number;
  fdatasync(fd: number): number;
  close(fd: number): number;
  /** poll(2) of one descriptor for `events` (POLLIN 1, POLLOUT 4): its revents, 0 after
   * `timeoutMs` (-1: no limit). */
  poll(fd: number, events: number, timeoutMs: number): number;
  /** lseek(fd, offset, SEEK_HOLE): where the next hole at or after `offset` starts. */
  seekHole(fd: number, offset: number): number;
  /** The name of an errno value (`ENOSPC` for 28), as `CallResult.code` gives it. */
  errnoName(errno: number): string;
}

/** fcntl commands for file status flags, and the flag for non-blocking I/O. */
export const F_GETFL = 3;
export const O_NONBLOCK = 0o4000;
/** fcntl command duplicating a descriptor with close-on-exec set. */
export const F_DUPFD_CLOEXEC = 1030;

let cached: Libc | null | undefined;

/** The libc binding, or undefined where it is unavailable. Loaded once. */
export function loadLibc(): Libc | undefined {
  if (cached === undefined) cached = tryLoad();
  return cached ?? undefined;
}

function tryLoad(): Libc | null {
  if (platform() !== 'linux' || (arch() !== 'x64' && arch() !== 'arm64')) return null;
  try {
    const koffi = createRequire(import.meta.url)('koffi') as Koffi;
    const lib = koffi.load('libc.so.6');
    return makeLibc(koffi, {
      lseek: lib.func('int64_t lseek(int, int64_t, int)'),
      fallocate: lib.func('int fallocate(int, int, int64_t, int64_t)'),
      fcntl: lib.func('int fcntl(int, int, void *)'),
      flock: lib.func('int flock(int, int)'),
      ioctl: lib.func('int ioctl(int, unsigned long, void *)'),
      copyFileRange: lib.func('int64_t copy_file_range(int, void *, int, void *, size_t, unsigned int)'),
      getsockopt: lib.func('int getsockopt(int, int, int, _Out_ void *, _Inout_ int *)'),
      setsockopt: lib.func('int setsockopt(int, int, int, void *, int)'),
      sendfile: lib.func('int64_t sendfile(int, int, void *, size_t)'),
      splice: lib.func('int64_t splice(int, void *, int, void *, size_t, unsigned int)'),
      pipe2: lib.func('int pipe2(int *, int)'),
      fcntlInt: lib.func('fcntl', 'int', ['int', 'int', 'int']),
      read: lib.func('int64_t read(int, void *, size_t)'),
      write: lib.func('int64_t write(int, void *, size_t)'),
      pread: lib.func('int64_t pread64(int, void *, size_t, int64_t)'),
      pwrite: lib.func('int64_t pwrite64(int, void *, size_t, int64_t)'),
      fdatasync: lib.func('int fdatasync(int)'),
      close: lib.func('int close(int)'),
      poll: lib.func('int poll(void *, unsigned long, int)'),
    });
  } catch {
    return null;
  }
}

interface Functions {
  lseek: KoffiFunction;
  fallocate: KoffiFunction;
  fcntl: KoffiFunction;
  flock: KoffiFunction;
  ioctl: KoffiFunction;
  copyFileRange: KoffiFunction;
  getsockopt: KoffiFunction;
  setsockopt: KoffiFunction;
  sendfile: KoffiFunction;
  splice: KoffiFunction;
  pipe2: KoffiFunction;
  fcntlInt: KoffiFunction;
  read: KoffiFunction;
  write: KoffiFunction;
  pread: KoffiFunction;
  pwrite: KoffiFunction;
  fdatasync: KoffiFunction;
  close: KoffiFunction;
  poll: KoffiFunction;
}

/** The errno names met in normal runs, with Linux's values (the same on x86_64 and aarch64) and
 * the names koffi's table gives first (EAGAIN for 11, ENOTSUP for 95). */
const COMMON_ERRNO_NAMES: ReadonlyMap<number, string> = new Map([
  [1, 'EPERM'],
  [2, 'ENOENT'],
  [4, 'EINTR'],
  [5, 'EIO'],
  [6, 'ENXIO'],
  [9, 'EBADF'],
  [11, 'EAGAIN'],
  [13, 'EACCES'],
  [22, 'EINVAL'],
  [28, 'ENOSPC'],
  [38, 'ENOSYS'],
  [95, 'ENOTSUP'],
]);

function makeLibc(koffi: Koffi, fn: Functions): Libc {
  // The full table is built only for an errno missing from COMMON_ERRNO_NAMES (~0.3 ms of
  // every start otherwise: opening a file probes SEEK_DATA, which fails with ENXIO on a hole).
  let errnoNames: Map<number, string> | undefined;
  const errnoName = (errno: number): string => {
    const common = COMMON_ERRNO_NAMES.get(errno);
    if (common !== undefined) return common;
    if (errnoNames === undefined) {
      errnoNames = new Map();
      for (const [name, value] of Object.entries(koffi.os.errno)) {
        if (!errnoNames.has(value)) errnoNames.set(value, name);
      }
    }
    return errnoNames.get(errno) ?? `errno ${errno}`;
  };
  const fail = (): CallResult => {
    const errno = koffi.errno();
    return { ok: false, errno, code: errnoName(errno) };
  };
  const result = (value: number | bigint): CallResult => {
    const n = Number(value);
    return n < 0 ? fail() : { ok: true, value: n };
  };
  const flockStruct = (type: number, start: number, length: number): Buffer => {
    const buf = Buffer.alloc(FLOCK_STRUCT_SIZE);
    buf.writeInt16LE(type, 0);
    buf.writeInt16LE(0, 2); // SEEK_SET
    buf.writeBigInt64LE(BigInt(start), 8);
    buf.writeBigInt64LE(BigInt(length), 16);
    return buf;
  };

  /** sendFile's and splice's offset argument: synchronous calls only, so one buffer serves them all. */
  const syncOffset = Buffer.alloc(8);

  return {
    lseek: (fd, offset, whence) => result(fn.lseek(fd, offset, whence)),
    fallocate: (fd, mode, offset, length) =>
      new Promise((resolve) => {
        try {
          fn.fallocate.async(fd, mode, offset, length, (error: unknown, value: number) => {
            if (error === null && value >= 0) resolve({ ok: true, value });
            else resolve(result(fn.fallocate(fd, mode, offset, length)));
          });
        } catch {
          // koffi refuses async calls beyond its limit (max_async_calls): run this one here.
          resolve(result(fn.fallocate(fd, mode, offset, length)));
        }
      }),
    copyFileRange: (inFd, inOffset, outFd, outOffset, length) => {
      // loff_t in and out: the kernel advances them, which nobody reads afterwards.
      const offsets = Buffer.alloc(16);
      offsets.writeBigInt64LE(BigInt(inOffset), 0);
      offsets.writeBigInt64LE(BigInt(outOffset), 8);
      const inPointer = offsets.subarray(0, 8);
      const outPointer = offsets.subarray(8, 16);
      const again = () => {
        offsets.writeBigInt64LE(BigInt(inOffset), 0);
        offsets.writeBigInt64LE(BigInt(outOffset), 8);
        return result(fn.copyFileRange(inFd, inPointer, outFd, outPointer, length, 0));
      };
      return new Promise((resolve) => {
        try {
          fn.copyFileRange.async(
            inFd,
            inPointer,
            outFd,
            outPointer,
            length,
            0,
            (error: unknown, value: number | bigint) => {
              const n = Number(value);
              if (error === null && n >= 0) resolve({ ok: true, value: n });
              else resolve(again());
            },
          );
        } catch {
          resolve(again());
        }
      });
    },
    ofdTestConflict: (fd, start, length) => {
      const buf = flockStruct(F_WRLCK, start, length);
      const r = result(fn.fcntl(fd, F_OFD_GETLK, buf));
      if (!r.ok) return r;
      return { ok: true, value: buf.readInt16LE(0) === F_UNLCK ? 0 : 1 };
    },
    ofdSetLock: (fd, type, start, length) =>
      result(fn.fcntl(fd, F_OFD_SETLK, flockStruct(type, start, length))),
    flock: (fd, operation) => result(fn.flock(fd, operation)),
    blockDeviceSize: (fd) => {
      const buf = Buffer.alloc(8);
      const r = result(fn.ioctl(fd, BLKGETSIZE64, buf));
      return r.ok ? { ok: true, value: Number(buf.readBigUInt64LE(0)) } : r;
    },
    getSocketInt: (fd, level, name) => {
      const value = Buffer.alloc(4);
      const r = result(fn.getsockopt(fd, level, name, value, [4]));
      return r.ok ? { ok: true, value: value.readInt32LE(0) } : r;
    },
    setSocketInt: (fd, level, name, value) => {
      const buf = Buffer.alloc(4);
      buf.writeInt32LE(value, 0);
      return result(fn.setsockopt(fd, level, name, buf, 4));
    },
    sendFile: (outFd, inFd, inOffset, length) => {
      // off_t in and out: the kernel advances it, which nobody reads afterwards.
      syncOffset.writeBigInt64LE(BigInt(inOffset), 0);
      return result(fn.sendfile(outFd, inFd, syncOffset, length));
    },
    splice: (inFd, inOffset, outFd, outOffset, length, flags) => {
      if (inOffset !== undefined && outOffset !== undefined) {
        throw new RangeError('splice: at most one side can be a file with an offset');
      }
      // The file side's loff_t is advanced by the kernel, which nobody reads.
      let inPointer: Buffer | null = null;
      let outPointer: Buffer | null = null;
      if (inOffset !== undefined) {
        syncOffset.writeBigInt64LE(BigInt(inOffset), 0);
        inPointer = syncOffset;
      } else if (outOffset !== undefined) {
        syncOffset.writeBigInt64LE(BigInt(outOffset), 0);
        outPointer = syncOffset;
      }
      return result(fn.splice(inFd, inPointer, outFd, outPointer, length, flags));
    },
    pipe: (flags) => {
      const fds = new Int32Array(2);
      const r = result(fn.pipe2(fds, flags));
      return r.ok ? { ok: true, readFd: fds[0]!, writeFd: fds[1]! } : r;
    },
    fcntlInt: (fd, command, value) => result(fn.fcntlInt(fd, command, value)),
    rawIo: makeRawIo(koffi, fn, errnoName),
  };
}

function makeRawIo(koffi: Koffi, fn: Functions, errnoName: (errno: number) => string): RawIo {
  const raw = (value: number | bigint): number => {
    const n = Number(value);
    return n < 0 ? -koffi.errno() : n;
  };
  /** sendfile's offset argument and poll's struct pollfd: one per thread (this binding is loaded
   * once per thread, and used synchronously). */
  const offset = Buffer.alloc(8);
  const pollFd = Buffer.alloc(8);
  return {
    read: (fd, buffer, length) => raw(fn.read(fd, buffer, length)),
    write: (fd, buffer, length) => raw(fn.write(fd, buffer, length)),
    pread: (fd, buffer, length, position) => raw(fn.pread(fd, buffer, length, position)),
    pwrite: (fd, buffer, length, position) => raw(fn.pwrite(fd, buffer, length, position)),
    sendfile: (outFd, inFd, inOffset, length) => {
      offset.writeBigInt64LE(BigInt(inOffset), 0);
      return raw(fn.sendfile(outFd, inFd, offset, length));
    },
    fdatasync: (fd) => raw(fn.fdatasync(fd)),
    close: (fd) => raw(fn.close(fd)),
    poll: (fd, events, timeoutMs) => {
      pollFd.writeInt32LE(fd, 0);
      pollFd.writeInt16LE(events, 4);
      pollFd.writeInt16LE(0, 6);
      const count = raw(fn.poll(pollFd, 1, timeoutMs));
      return count > 0 ? pollFd.readInt16LE(6) : count;
    },
    seekHole: (fd, position) => raw(fn.lseek(fd, position, SEEK_HOLE)),
    errnoName,
  };
}
