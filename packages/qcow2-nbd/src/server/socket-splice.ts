/**
 * WRITE payloads moved from the socket into the export's file inside the kernel, by splice(2)
 * through a pipe: the socket's bytes are handed to the pipe without a copy on unix sockets (the
 * pipe takes references to the socket buffer's pages) and copied once, into the file's pages. The
 * ordinary way copies them twice (recv into our buffer, then pwrite from it) with a hand-off to
 * libuv's pool in between.
 *
 * For memory-backed files only: the file side never waits, so every call runs on the event loop's
 * thread and returns at once; the socket is non-blocking (EAGAIN when it holds nothing more).
 *
 * One pipe serves the whole process: every move empties it before returning (calls are
 * synchronous), so it holds nothing between calls. Linux only, through blockdev's libc binding;
 * without it (or without a pipe) `openSocketSplicer` returns undefined and nothing changes.
 */
import { readSync } from 'node:fs';
import { F_SETPIPE_SZ, loadLibc, O_CLOEXEC, SPLICE_F_MOVE, SPLICE_F_NONBLOCK } from '@qcowkit/blockdev/node';

/** The pipe's capacity asked for (the kernel caps it at /proc/sys/fs/pipe-max-size for non-root). */
const PIPE_SIZE = 1024 * 1024;
/** The capacity every pipe has. */
const DEFAULT_PIPE_SIZE = 64 * 1024;

/** What one `move` did. */
export interface SpliceResult {
  /** Payload bytes taken from the socket (written to the file unless `stopped` is 'file'). */
  readonly taken: number;
  /**
   * Why it stopped short of `length`: 'again' when the socket holds nothing more for now (or its
   * peer has gone: the socket's own reads will see the end); 'socket' when splicing from the socket
   * failed otherwise (`errno`): it is not worth trying again on that socket, whose own reads will
   * report a real failure; 'file' when writing to the file failed (`errno`): the bytes taken were
   * read out of the pipe and dropped.
   */
  readonly stopped: 'done' | 'again' | 'socket' | 'file';
  readonly errno?: string;
}

export interface SocketSplicer {
  /** Moves up to `length` bytes from the socket `socketFd` into `fileFd` at `fileOffset`. */
  move(socketFd: number, fileFd: number, fileOffset: number, length: number): SpliceResult;
}

let shared: SocketSplicer | null | undefined;

/** The process's splicer, or undefined where splice or pipes are unavailable. Made once. */
export function openSocketSplicer(): SocketSplicer | undefined {
  if (shared === undefined) shared = makeSplicer();
  return shared ?? undefined;
}

function makeSplicer(): SocketSplicer | null {
  const libc = loadLibc();
  const splice = libc?.splice;
  const pipe = libc?.pipe?.(O_CLOEXEC);
  if (libc === undefined || splice === undefined || pipe === undefined || !pipe.ok) return null;
  const { readFd, writeFd } = pipe;
  const resized = libc.fcntlInt?.(writeFd, F_SETPIPE_SZ, PIPE_SIZE);
  const capacity = resized?.ok === true ? resized.value : DEFAULT_PIPE_SIZE;
  /** Drops `count` bytes left in the pipe after the file refused them. */
  const discard = (count: number) => {
    const scratch = Buffer.allocUnsafe(Math.min(count, DEFAULT_PIPE_SIZE));
    let left = count;
    while (left > 0) {
      const got = readSync(readFd, scratch, 0, Math.min(left, scratch.length), null);
      if (got <= 0) break;
      left -= got;
    }
  };
  return {
    move(socketFd, fileFd, fileOffset, length) {
      let taken = 0;
      while (taken < length) {
        const into = splice(
          socketFd,
          undefined,
          writeFd,
          undefined,
          Math.min(length - taken, capacity),
          SPLICE_F_MOVE | SPLICE_F_NONBLOCK,
        );
        if (!into.ok) {
          return into.code === 'EAGAIN' || into.code === 'EINTR'
            ? { taken, stopped: 'again' }
            : { taken, stopped: 'socket', errno: into.code };
        }
        if (into.value === 0) return { taken, stopped: 'again' };
        let left = into.value;
        while (left > 0) {
          const out = splice(readFd, undefined, fileFd, fileOffset + taken, left, SPLICE_F_MOVE);
          if (!out.ok && out.code === 'EINTR') continue;
          if (!out.ok || out.value === 0) {
            discard(left);
            // A file that takes nothing more is full (tmpfs past its size).
            return { taken: taken + left, stopped: 'file', errno: out.ok ? 'ENOSPC' : out.code };
          }
          left -= out.value;
          taken += out.value;
        }
      }
      return { taken, stopped: 'done' };
    },
  };
}
