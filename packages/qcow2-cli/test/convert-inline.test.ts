/**
 * `convert -O raw` writes its target on the main thread only where that cannot block: a regular
 * file on a memory-backed file system (tmpfs). Elsewhere (a disk file system, a block device) the
 * writes stay on libuv's pool. Either way the bytes, the holes and the errors are the same.
 */
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { isMemoryBacked } from '@qcowkit/blockdev/node';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { convertToRaw, isMemoryBackedFile } from '../src/commands/convert.js';

const KiB = 1024;
const MiB = 2 ** 20;
/** Linux's memory-backed folder (tmpfs): present wherever these tests run. */
const SHM = '/dev/shm';

describe('where convert writes inline', () => {
  let disk: string;
  let shm: string;
  beforeAll(async () => {
    disk = mkdtempSync(join(tmpdir(), 'qcow2-cli-inline-'));
    shm = mkdtempSync(join(SHM, 'qcow2-cli-inline-'));
    // The test's premise: /dev/shm is tmpfs; the other folder is judged as it is.
    expect(await isMemoryBacked(shm)).toBe(true);
  });
  afterAll(() => {
    rmSync(disk, { recursive: true, force: true });
    rmSync(shm, { recursive: true, force: true });
  });

  test('a regular file on tmpfs (or one to be made there) is memory-backed; a device node is not', async () => {
    writeFileSync(join(shm, 'exists.raw'), 'x');
    expect(await isMemoryBackedFile(join(shm, 'exists.raw'))).toBe(true);
    expect(await isMemoryBackedFile(join(shm, 'exists.raw'), true)).toBe(true);
    // A file about to be created is judged by its folder; one that must exist (-n) is not.
    expect(await isMemoryBackedFile(join(shm, 'new.raw'), true)).toBe(true);
    expect(await isMemoryBackedFile(join(shm, 'new.raw'))).toBe(false);
    // /dev is devtmpfs, which statfs reports as tmpfs: its nodes are devices, never inline
    // (blockdev's isMemoryBacked says so itself since 92cd9dd).
    expect(await isMemoryBacked('/dev/null')).toBe(false);
    expect(await isMemoryBackedFile('/dev/null')).toBe(false);
    expect(await isMemoryBackedFile('/dev/null', true)).toBe(false);
    // A folder is not a file.
    expect(await isMemoryBackedFile(shm)).toBe(false);
    const onDisk = await isMemoryBacked(disk);
    writeFileSync(join(disk, 'exists.raw'), 'x');
    expect(await isMemoryBackedFile(join(disk, 'exists.raw'))).toBe(onDisk);
    expect(await isMemoryBackedFile(join(disk, 'new.raw'), true)).toBe(onDisk);
  });

  /** A guest of 1 MiB runs with holes between them, a zero 4 KiB block inside one run. */
  async function guest(): Promise<MemoryBlockDevice> {
    const device = new MemoryBlockDevice(12 * MiB + 3 * KiB);
    for (let index = 0; index < 6; index++) {
      const run = new Uint8Array(MiB).map((_, at) => (at * 13 + index) & 0xff || 7);
      if (index === 2) run.fill(0, 256 * KiB, 260 * KiB);
      await device.write(index * 2 * MiB, run);
    }
    await device.write(12 * MiB + 1000, new Uint8Array(2000).fill(0x44));
    return device;
  }

  test.each([
    ['tmpfs, inline by default', () => shm, undefined],
    ['a disk folder, pool by default', () => disk, undefined],
    ['tmpfs, forced onto the pool', () => shm, false],
    ['a disk folder, forced inline', () => disk, true],
  ] as const)('%s: the same bytes and holes, new file or -n', async (_name, folder, inlineWrites) => {
    const device = await guest();
    const expected = Buffer.from(await device.read(0, device.size));
    const target = join(folder(), 'out.raw');
    await convertToRaw(device, target, 'out.raw', { chunkSize: 2 * MiB, parallel: 3, inlineWrites });
    expect(readFileSync(target).equals(expected)).toBe(true);
    // 6 MiB of data and a 2 KiB tail, less the zero block: holes elsewhere.
    expect(statSync(target).blocks * 512).toBeLessThanOrEqual(6 * MiB + 8 * KiB);
    // -n into a file full of other bytes: the guest's zeros are written as zeros too.
    writeFileSync(target, Buffer.alloc(device.size + 5000, 0xee));
    await convertToRaw(device, target, 'out.raw', {
      chunkSize: 2 * MiB,
      parallel: 3,
      noCreate: true,
      inlineWrites,
    });
    const written = readFileSync(target);
    expect(written.subarray(0, device.size).equals(expected)).toBe(true);
    expect(written.subarray(device.size).every((byte) => byte === 0xee)).toBe(true);
    rmSync(target);
    await device.close();
  });

  test('a read failing mid-copy with inline writes rejects with its error; nothing written after it', async () => {
    const device = await guest();
    const failAt = 6 * MiB;
    const before = Buffer.from(await device.read(0, failAt));
    const original = device.readInto.bind(device);
    device.readInto = async (buffer, offset) => {
      if (offset >= failAt) throw new Error('read: injected failure');
      return original(buffer, offset);
    };
    const target = join(shm, 'fail.raw');
    await expect(
      convertToRaw(device, target, 'fail.raw', { chunkSize: MiB, parallel: 3, inlineWrites: true }),
    ).rejects.toThrow(/injected failure/);
    const written = readFileSync(target);
    expect(written.subarray(0, failAt).equals(before)).toBe(true);
    expect(written.subarray(failAt).every((byte) => byte === 0)).toBe(true);
    rmSync(target);
    await device.close();
  });
});
