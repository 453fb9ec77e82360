/**
 * A file as a sink: positioned writes (up to 4 in flight, each at its own fixed position), holes
 * for skipped ranges, the length set at the end.
 */
import { open } from 'node:fs/promises';
import { forgetTruncation } from '@qcowkit/blockdev/node';
import type { ByteSink } from '../sink.js';
import { checkFlush, type FileFlush } from './random-access-file.js';

const WRITES_IN_FLIGHT = 4;

export interface FileSinkOptions {
  /** When the file is flushed to stable storage (default `'on-close'`): see {@link FileFlush}. */
  readonly flush?: FileFlush | undefined;
}

/** Opens (creating or truncating) `path` for writing an image. */
export async function openFileSink(path: string, options: FileSinkOptions = {}): Promise<ByteSink> {
  const flush = checkFlush(path, options.flush);
  const handle = await open(path, 'w');
  if (flush === 'never') await forgetTruncation(path);
  let position = 0;
  let closed = false;
  let failure: unknown;
  const inFlight: Promise<void>[] = [];
  const writeAll = async (chunk: Uint8Array, at: number) => {
    let done = 0;
    while (done < chunk.length) {
      const { bytesWritten } = await handle.write(chunk, done, chunk.length - done, at + done);
      done += bytesWritten;
    }
    if (flush === 'every-write') await handle.datasync();
  };
  const drain = async (limit: number) => {
    while (inFlight.length > limit) await inFlight.shift();
    if (failure !== undefined) throw failure;
  };
  return {
    async write(chunk) {
      if (failure !== undefined) throw failure;
      const pending = writeAll(chunk, position).catch((error: unknown) => {
        failure ??= error;
      });
      inFlight.push(pending);
      position += chunk.length;
      await drain(WRITES_IN_FLIGHT - 1);
    },
    async skip(length) {
      position += length;
    },
    async close() {
      if (closed) return;
      closed = true;
      try {
        await drain(0);
        await handle.truncate(position);
        // qemu-img convert flushes its target only when its cache mode asks (not by default).
        if (flush !== 'never') await handle.datasync();
      } finally {
        await handle.close();
      }
    },
    async abort() {
      if (closed) return;
      closed = true;
      await Promise.all(inFlight);
      await handle.close();
    },
  };
}
