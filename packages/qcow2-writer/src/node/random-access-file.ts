/**
 * A file as a {@link RandomAccessSink}: positioned writes on libuv's thread pool (callback API: no
 * FileHandle promise machinery per call), one at a time in the order they were asked for, as
 * qemu-img convert writes without `-W`. Writes to one file take its inode lock in the kernel
 * (tmpfs, ext4 and xfs alike for buffered writes), so parallel writes only waited for each other
 * on the pool's threads; one at a time leaves those threads to the reads. Closing sets the length
 * and flushes once (fdatasync).
 */
import { close, fdatasync, ftruncate, open, write } from 'node:fs';
import { promisify } from 'node:util';
import { BlockDeviceError } from '@qcowkit/blockdev';
import type { RandomAccessSink } from '../direct-convert.js';

const openFile = promisify(open);
const closeFile = promisify(close);
const truncateFile = promisify(ftruncate);
const datasyncFile = promisify(fdatasync);

export async function openRandomAccessFile(path: string): Promise<RandomAccessSink> {
  const fd = await openFile(path, 'w');
  /** Settles when the last write asked for is done (never rejects). */
  let tail: Promise<void> = Promise.resolve();
  let closed = false;
  const writeAll = (bytes: Uint8Array, at: number): Promise<void> =>
    new Promise((resolve, reject) => {
      const step = (done: number) => {
        write(fd, bytes, done, bytes.length - done, at + done, (error, written) => {
          if (error) reject(error);
          else if (done + written >= bytes.length) resolve();
          else if (written === 0)
            reject(new BlockDeviceError('EIO', `write: ${path}: no progress`, { offset: at + done }));
          else step(done + written);
        });
      };
      step(0);
    });
  return {
    writeAt(hostOffset, bytes) {
      if (closed) return Promise.reject(new BlockDeviceError('EINVAL', `write: ${path}: the sink is closed`));
      if (bytes.length === 0) return Promise.resolve();
      const pending = tail.then(() => writeAll(bytes, hostOffset));
      tail = pending.catch(() => undefined);
      return pending;
    },
    async close(length) {
      if (closed) return;
      closed = true;
      try {
        await tail;
        await truncateFile(fd, length);
        // One flush at the end, as qemu-img convert does (its default target cache mode flushes).
        await datasyncFile(fd);
      } finally {
        await closeFile(fd);
      }
    },
    async abort() {
      if (closed) return;
      closed = true;
      await tail;
      await closeFile(fd);
    },
  };
}
