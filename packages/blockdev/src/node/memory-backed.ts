/**
 * Whether a path lives on a file system held in memory (tmpfs, ramfs). There a read or a write is
 * a memory copy that never waits for a disk, so doing it inline on the calling thread (see
 * `FileOpenOptions.syncIoMaxBytes`) saves the thread pool's hand-off (a futex wake, a context
 * switch and a callback through the event loop) without ever blocking on I/O.
 */
import { stat, statfs } from 'node:fs/promises';

/** statfs(2) f_type values of file systems held in memory. */
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

/** A bound of synchronous I/O for memory-backed files (see `FileOpenOptions.syncIoMaxBytes`). */
export const SYNC_IO_MAX_BYTES = 64 * 1024;

/** True when the file system holding `path` is tmpfs or ramfs (statfs alone: also for /dev's
 * nodes, which the caller tells apart); false when unknown. */
export async function onMemoryFileSystem(path: string): Promise<boolean> {
  return (await memoryFileSystem(path)) !== undefined;
}

/** Which memory-held file system holds `path` (statfs alone, as {@link onMemoryFileSystem}):
 * tmpfs (which punches holes) or ramfs (which does not); undefined for any other or unknown. */
export async function memoryFileSystem(path: string): Promise<'tmpfs' | 'ramfs' | undefined> {
  try {
    const { type } = await statfs(path);
    return type === TMPFS_MAGIC ? 'tmpfs' : type === RAMFS_MAGIC ? 'ramfs' : undefined;
  } catch {
    return undefined;
  }
}

/**
 * True when `path`, a regular file or a folder, is on tmpfs or ramfs; false when unknown, and for
 * device nodes: /dev is devtmpfs, which statfs reports as tmpfs, but a block device's I/O goes to
 * its disk.
 */
export async function isMemoryBacked(path: string): Promise<boolean> {
  if (!(await onMemoryFileSystem(path))) return false;
  try {
    // Only then the node's kind (one system call fewer on every other file system).
    const stats = await stat(path);
    return stats.isFile() || stats.isDirectory();
  } catch {
    return false;
  }
}

/**
 * The `syncIoMaxBytes` to open the file at `path` with when the caller wants inline I/O only where
 * it cannot block: {@link SYNC_IO_MAX_BYTES} on tmpfs or ramfs, 0 (the thread pool) elsewhere.
 * `FileBlockDevice.open(path, { syncIoMaxBytes: 'memory-backed' })` decides the same at open.
 */
export async function inlineIoMaxBytes(path: string): Promise<number> {
  return (await isMemoryBacked(path)) ? SYNC_IO_MAX_BYTES : 0;
}
