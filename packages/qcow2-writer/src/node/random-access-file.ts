/** A file as a {@link RandomAccessSink}: up to 4 positioned writes in flight. */
import { open } from 'node:fs/promises';
import type { RandomAccessSink } from '../direct-convert.js';

const WRITES_IN_FLIGHT = 4;

export async function openRandomAccessFile(path: string): Promise<RandomAccessSink> {
  const handle = await open(path, 'w');
  const inFlight: Promise<void>[] = [];
  let failure: unknown;
  let closed = false;
  const writeAll = async (bytes: Uint8Array, at: number) => {
    let done = 0;
    while (done < bytes.length) {
      const { bytesWritten } = await handle.write(bytes, done, bytes.length - done, at + done);
      done += bytesWritten;
    }
  };
  const drain = async (limit: number) => {
    while (inFlight.length > limit) await inFlight.shift();
    if (failure !== undefined) throw failure;
  };
  return {
    async writeAt(hostOffset, bytes) {
      if (failure !== undefined) throw failure;
      inFlight.push(
        writeAll(bytes, hostOffset).catch((error: unknown) => {
          failure ??= error;
        }),
      );
      await drain(WRITES_IN_FLIGHT - 1);
    },
    async close(length) {
      if (closed) return;
      closed = true;
      try {
        await drain(0);
        await handle.truncate(length);
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
