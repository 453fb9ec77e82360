/**
 * The file sink of the read-once conversions: positioned writes on the thread pool or inline (what
 * `auto` picks on a memory-backed folder), the same bytes either way.
 */
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openRandomAccessFile } from '../src/node/random-access-file.js';

describe('openRandomAccessFile', () => {
  const dir = mkdtempSync(join(tmpdir(), 'qcow2-writer-raf-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it.each([
    ['on the thread pool', false],
    ['inline', true],
  ])(
    'writes at any offset, overlapping calls included, and closes at the length given (%s)',
    async (_name, inlineWrites) => {
      const path = join(dir, `sink-${inlineWrites}.bin`);
      const sink = await openRandomAccessFile(path, { inlineWrites });
      const expected = Buffer.alloc(3 * 65536 + 100);
      const writes: Promise<void>[] = [];
      for (const [at, length, fill] of [
        [65536, 65536, 0x11],
        [0, 1000, 0x22],
        [3 * 65536, 100, 0x33],
        [131072 + 7, 9, 0x44],
      ] as const) {
        const bytes = Buffer.alloc(length, fill);
        bytes.copy(expected, at);
        writes.push(sink.writeAt(at, bytes));
      }
      writes.push(sink.writeAt(500, new Uint8Array(0)));
      await Promise.all(writes);
      await sink.close(expected.length);
      expect(statSync(path).size).toBe(expected.length);
      expect(readFileSync(path).equals(expected)).toBe(true);
      await expect(sink.writeAt(0, new Uint8Array(1))).rejects.toMatchObject({ code: 'EINVAL' });
    },
  );

  it('a failed inline write rejects (the file was closed under the sink)', async () => {
    const sink = await openRandomAccessFile(join(dir, 'aborted.bin'), { inlineWrites: true });
    await sink.abort();
    await expect(sink.writeAt(0, new Uint8Array(1))).rejects.toMatchObject({ code: 'EINVAL' });
  });
});
