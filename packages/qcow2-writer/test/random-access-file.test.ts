/**
 * The file sink of the read-once conversions: positioned writes, one at a time in the order asked
 * for, the file closed at the length given; on the thread pool or inline (memory-backed files).
 */
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isMemoryBacked } from '@qcowkit/blockdev/node';
import { afterAll, describe, expect, it } from 'vitest';
import { openRandomAccessFile } from '../src/node/random-access-file.js';

describe.each([
  { mode: 'on the thread pool', inline: false },
  { mode: 'inline', inline: true },
])('openRandomAccessFile $mode', ({ inline }) => {
  const dir = mkdtempSync(join(tmpdir(), 'qcow2-writer-raf-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('writes at any offset, overlapping calls in the order asked, and closes at the length given', async () => {
    const path = join(dir, 'sink.bin');
    const sink = await openRandomAccessFile(path, { inline });
    const expected = Buffer.alloc(3 * 65536 + 100);
    const writes: Promise<void>[] = [];
    const order: number[] = [];
    for (const [at, length, fill] of [
      [65536, 65536, 0x11],
      [0, 1000, 0x22],
      [3 * 65536, 100, 0x33],
      [131072 + 7, 9, 0x44],
      [65536 + 5, 10, 0x55], // over the first write: lands after it
    ] as const) {
      const bytes = Buffer.alloc(length, fill);
      bytes.copy(expected, at);
      writes.push(sink.writeAt(at, bytes).then(() => void order.push(fill)));
    }
    writes.push(sink.writeAt(500, new Uint8Array(0)));
    await Promise.all(writes);
    expect(order).toEqual([0x11, 0x22, 0x33, 0x44, 0x55]);
    await sink.close(expected.length);
    expect(statSync(path).size).toBe(expected.length);
    expect(readFileSync(path).equals(expected)).toBe(true);
    await expect(sink.writeAt(0, new Uint8Array(1))).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it('a failed write rejects its caller and the writes after it still run', async () => {
    const path = join(dir, 'failing.bin');
    const sink = await openRandomAccessFile(path, { inline });
    const bad = sink.writeAt(Number.MAX_SAFE_INTEGER - 10, new Uint8Array(10).fill(1)); // EFBIG
    const good = sink.writeAt(4, new Uint8Array(4).fill(2));
    await expect(bad).rejects.toThrow();
    await good;
    await sink.close(8);
    expect([...readFileSync(path)]).toEqual([0, 0, 0, 0, 2, 2, 2, 2]);
  });
});

describe('openRandomAccessFile default', () => {
  it('writes inline exactly when the file is on a memory-backed file system', async () => {
    for (const parent of [tmpdir(), '/dev/shm']) {
      let dir: string;
      try {
        dir = mkdtempSync(join(parent, 'qcow2-writer-raf-'));
      } catch {
        continue; // no such folder here (not Linux)
      }
      try {
        const path = join(dir, 'auto.bin');
        const sink = await openRandomAccessFile(path);
        const pending = sink.writeAt(0, new Uint8Array(8).fill(7));
        // Inline, the bytes are in the file before writeAt returns; on the pool, not yet.
        const landed = readFileSync(path).length === 8;
        await pending;
        await sink.close(8);
        expect(landed).toBe(await isMemoryBacked(dir));
        expect([...readFileSync(path)]).toEqual(new Array(8).fill(7));
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  });
});
