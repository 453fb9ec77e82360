/** A {@link Spool} in a temporary file, removed on close. Appends are batched in 4 MiB writes. */
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Spool } from '../spool.js';

const BATCH = 4 * 1024 * 1024;

export async function createFileSpool(directory = tmpdir()): Promise<Spool> {
  const folder = await mkdtemp(join(directory, 'qcowkit-spool-'));
  const handle = await open(join(folder, 'spool'), 'w+');
  let batch: Uint8Array = new Uint8Array(BATCH);
  let batchUsed = 0;
  let written = 0;
  const flush = async () => {
    let done = 0;
    while (done < batchUsed) {
      const { bytesWritten } = await handle.write(batch, done, batchUsed - done, written + done);
      done += bytesWritten;
    }
    written += batchUsed;
    batchUsed = 0;
  };
  return {
    async append(bytes) {
      if (bytes.length > BATCH - batchUsed) await flush();
      if (bytes.length > BATCH) {
        batch = bytes;
        batchUsed = bytes.length;
        await flush();
        batch = new Uint8Array(BATCH);
        return;
      }
      batch.set(bytes, batchUsed);
      batchUsed += bytes.length;
    },
    async read(offset, length) {
      if (batchUsed > 0) await flush();
      const out = new Uint8Array(length);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await handle.read(out, done, length - done, offset + done);
        if (bytesRead === 0) throw new Error(`spool: short read at ${offset + done}`);
        done += bytesRead;
      }
      return out;
    },
    async close() {
      await handle.close().catch(() => {});
      await rm(folder, { recursive: true, force: true });
    },
  };
}
