/**
 * Whether a path lives on a file system held in memory (tmpfs, ramfs). There a read or a write is
 * a memory copy that never waits for a disk, so doing it inline on the calling thread (see
 * `FileOpenOptions.syncIoMaxBytes`) saves the thread pool's hand-off (a futex wake, a context
 * switch and a callback through the event loop) without ever blocking on I/O.
 */
import { stat, statfs } from 'node:fs/promises';
import { SYNC_IO_MAX_BYTES } from './file-device.js';

/** statfs(2) f_type values of file systems held in memory. */
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

/**
 * True when `path`, a regular file or a folder, is on tmpfs or ramfs; false when unknown, and for
 * device nodes: /dev is devtmpfs, which statfs reports as tmpfs, but a block device's I/O goes to
 * its disk.
 */
export async function isMemoryBacked(path: string): Promise<boolean> {
  try {
    const { type } = await statfs(path);
    if (type !== TMPFS_MAGIC && type !== RAMFS_MAGIC) return false;
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
 */
export async function inlineIoMaxBytes(path: string): Promise<number> {
  return (await isMemoryBacked(path)) ? SYNC_IO_MAX_BYTES : 0;
}
