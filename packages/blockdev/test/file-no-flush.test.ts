/**
 * FileBlockDevice's `noFlush` (QEMU's cache=unsafe): flush(), `fua` writes and close() make no
 * fdatasync call, counted through a spy on node:fs; without it each of them makes one.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { afterAll, describe, expect, it, vi } from 'vitest';

const syncs = vi.hoisted(() => ({ count: 0 }));

vi.mock('node:fs', async (importOriginal) => {
  const fs = await importOriginal<typeof import('node:fs')>();
  return {
    ...fs,
    fdatasync: (fd: number, callback: (error: NodeJS.ErrnoException | null) => void) => {
      syncs.count++;
      fs.fdatasync(fd, callback);
    },
  };
});

const dir = mkdtempSync(join(tmpdir(), 'qcowkit-noflush-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe.each([
  { noFlush: true, flushes: 0 },
  { noFlush: false, flushes: 1 },
])('FileBlockDevice noFlush $noFlush', ({ noFlush, flushes }) => {
  it('flush, a fua write, a fua zero write and close', async () => {
    const path = join(dir, `noflush-${noFlush}.raw`);
    const file = await FileBlockDevice.create(path, 8192, { noFlush });
    expect(file.capabilities.flush).toBe(!noFlush);
    syncs.count = 0;
    await file.write(0, new Uint8Array(4).fill(1));
    expect(syncs.count).toBe(0);
    await file.flush();
    expect(syncs.count).toBe(flushes);
    await file.write(4096, new Uint8Array(4).fill(2), { fua: true });
    expect(syncs.count).toBe(2 * flushes);
    await file.writeZeroes(0, 2, { fua: true });
    expect(syncs.count).toBe(3 * flushes);
    await file.close();
    expect(syncs.count).toBe(4 * flushes);
    const bytes = readFileSync(path);
    expect([...bytes.subarray(0, 4)]).toEqual([0, 0, 1, 1]);
    expect([...bytes.subarray(4096, 4100)]).toEqual([2, 2, 2, 2]);
    // Creating over an existing file empties it first, noFlush or not.
    const over = await FileBlockDevice.create(path, 4096, { noFlush, overwrite: true });
    expect([...(await over.read(0, 4096))].every((byte) => byte === 0)).toBe(true);
    await over.close();
    expect(readFileSync(path).length).toBe(4096);
    // Opening an existing file takes the option too.
    const again = await FileBlockDevice.open(path, { noFlush });
    syncs.count = 0;
    await again.close();
    expect(syncs.count).toBe(flushes);
  });
});
