/**
 * A file as a {@link RandomAccessSink}: each `writeAt` is one positioned write on libuv's thread
 * pool (callback API: no FileHandle promise machinery per call); the caller bounds concurrency.
 * On a memory-backed file system (tmpfs, ramfs) writes are done inline on the calling thread
 * instead: there a write is a memory copy that never waits for a disk, and writes to one file
 * take its inode lock in the kernel anyway, so writes on the pool only waited on each other and
 * added a thread hand-off each (raw -> qcow2 of a 1 GiB guest holding 512 MiB on /dev/shm: about
 * 50 ms less CPU). Closing sets the length and flushes once (fdatasync).
 */
import { close, fdatasync, ftruncate, open, write, writeSync } from 'node:fs';
import { dirname } from 'node:path';
import { promisify } from 'node:util';
import { BlockDeviceError } from '@qcowkit/blockdev';
import { isMemoryBacked } from '@qcowkit/blockdev/node';
import type { RandomAccessSink } from '../direct-convert.js';

const openFile = promisify(open);
const closeFile = promisify(close);
const truncateFile = promisify(ftruncate);
const datasyncFile = promisify(fdatasync);

export interface RandomAccessFileOptions {
  /** Write inline on the calling thread: true, false, or `auto` (default): where the file's folder
   * is memory-backed. */
  readonly inlineWrites?: boolean | 'auto';
}

export async function openRandomAccessFile(
  path: string,
  options: RandomAccessFileOptions = {},
): Promise<RandomAccessSink> {
  const mode = options.inlineWrites ?? 'auto';
  const inline = mode === 'auto' ? await isMemoryBacked(dirname(path)) : mode;
  const fd = await openFile(path, 'w');
  const inFlight = new Set<Promise<void>>();
  let closed = false;
  const noProgress = (at: number) =>
    new BlockDeviceError('EIO', `write: ${path}: no progress`, { offset: at });
  const writeAll = (bytes: Uint8Array, at: number): Promise<void> =>
    new Promise((resolve, reject) => {
      const step = (done: number) => {
        write(fd, bytes, done, bytes.length - done, at + done, (error, written) => {
          if (error) reject(error);
          else if (done + written >= bytes.length) resolve();
          else if (written === 0) reject(noProgress(at + done));
          else step(done + written);
        });
      };
      step(0);
    });
  const writeNow = (bytes: Uint8Array, at: number): Promise<void> => {
    try {
      for (let done = 0; done < bytes.length; ) {
        const written = writeSync(fd, bytes, done, bytes.length - done, at + done);
        if (written === 0) return Promise.reject(noProgress(at + done));
        done += written;
      }
    } catch (error) {
      return Promise.reject(error);
    }
    return Promise.resolve();
  };
  const settle = async () => {
    await Promise.allSettled([...inFlight]);
  };
  return {
    writeAt(hostOffset, bytes) {
      if (closed) return Promise.reject(new BlockDeviceError('EINVAL', `write: ${path}: the sink is closed`));
      if (bytes.length === 0) return Promise.resolve();
      if (inline) return writeNow(bytes, hostOffset);
      const pending = writeAll(bytes, hostOffset);
      inFlight.add(pending);
      const forget = () => inFlight.delete(pending);
      pending.then(forget, forget);
      return pending;
    },
    async close(length) {
      if (closed) return;
      closed = true;
      try {
        await settle();
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
      await settle();
      await closeFile(fd);
    },
  };
}
