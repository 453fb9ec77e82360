/**
 * How the CLI's files do their I/O (`--aio`). `threads` sends every read and write through libuv's
 * thread pool; `sync` serves requests up to 64 KiB with positioned I/O on the main thread; `auto`
 * (the default) does the same as `sync` when the file lives on a memory-backed file system (tmpfs,
 * ramfs), where a read or a write is a memory copy that never waits for a disk, and uses the pool
 * everywhere else (so on disks it is `threads`, as qemu-nbd's default). On tmpfs the pool only adds
 * a thread hand-off per request (a futex wake, a context switch, a callback through the event
 * loop): inline 4 KiB requests took half the server CPU and, on a quiet machine, 0.53-0.76 of the
 * time (the nbd-aio bench jobs). Only on a machine saturated by other processes did the pool's
 * threads win the server a larger share of the CPU and finish first: `--aio=threads` is there for
 * that. Large requests always use the pool, where their copies overlap the socket writes.
 */
import { inlineIoMaxBytes, SYNC_IO_MAX_BYTES } from '@qcowkit/blockdev/node';

export type AioMode = 'threads' | 'sync' | 'auto';

export interface FileIoOptions {
  readonly syncIoMaxBytes: number;
}

/** FileBlockDevice options for the file at `path` under `--aio MODE`. */
export async function fileIoOptions(mode: AioMode, path: string): Promise<FileIoOptions> {
  switch (mode) {
    case 'threads':
      return { syncIoMaxBytes: 0 };
    case 'sync':
      return { syncIoMaxBytes: SYNC_IO_MAX_BYTES };
    case 'auto':
      return { syncIoMaxBytes: await inlineIoMaxBytes(path) };
  }
}
