/**
 * A file as a sink: positioned writes, holes for skipped ranges, the length set at the end.
 */
import { open } from 'node:fs/promises';
import type { ByteSink } from '../sink.js';

/** Opens (creating or truncating) `path` for writing an image. */
export async function openFileSink(path: string): Promise<ByteSink> {
  const handle = await open(path, 'w');
  let position = 0;
  let closed = false;
  return {
    async write(chunk) {
      let done = 0;
      while (done < chunk.length) {
        const { bytesWritten } = await handle.write(chunk, done, chunk.length - done, position + done);
        done += bytesWritten;
      }
      position += chunk.length;
    },
    async skip(length) {
      position += length;
    },
    async close() {
      if (closed) return;
      closed = true;
      await handle.truncate(position);
      await handle.close();
    },
    async abort() {
      if (closed) return;
      closed = true;
      await handle.close();
    },
  };
}
