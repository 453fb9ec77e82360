/**
 * A file as a {@link RandomAccessSink}: each `writeAt` is one positioned write on libuv's thread
 * pool (callback API: no FileHandle promise machinery per call); the caller bounds concurrency.
 * Closing sets the length and flushes once (fdatasync).
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
  const inFlight = new Set<Promise<void>>();
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
  const settle = async () => {
    await Promise.allSettled([...inFlight]);
  };
  return {
    writeAt(hostOffset, bytes) {
      if (closed) return Promise.reject(new BlockDeviceError('EINVAL', `write: ${path}: the sink is closed`));
      if (bytes.length === 0) return Promise.resolve();
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
