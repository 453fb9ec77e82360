/**
 * `FileBlockDevice.copyTo` (copy_file_range with a read/write fallback) and `convert -S`: with
 * `-S 0` the target is fully allocated and data ranges of a raw or qcow2 file are copied file to
 * file; other sizes decide which zero runs become holes.
 */
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { convertToRaw } from '../src/commands/convert.js';
import { parseSparseSize } from '../src/commands/convert-args.js';

const MiB = 2 ** 20;

function pattern(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  for (let index = 0; index < length; index++) bytes[index] = (index * 31 + seed) & 0xff || 1;
  return bytes;
}

describe('FileBlockDevice.copyTo', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qcow2-cli-copy-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test.each([
    ['copy_file_range', true],
    ['read and write (no native binding)', false],
  ])('%s: copies unaligned ranges between two files', async (_name, native) => {
    const bytes = pattern(3 * MiB + 123, 7);
    writeFileSync(join(dir, 'source.raw'), bytes);
    const source = await FileBlockDevice.open(join(dir, 'source.raw'), { readOnly: true, native });
    const target = await FileBlockDevice.create(join(dir, 'target.raw'), 4 * MiB, {
      overwrite: true,
      native,
    });
    await source.copyTo(target, 1001, 4097, 2 * MiB + 77);
    await source.copyTo(target, 0, 0, 10);
    await source.copyTo(target, 5, 4 * MiB - 3, 3);
    await expect(source.copyTo(target, 3 * MiB, 0, MiB)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(target.copyTo(source, 0, 0, 10)).rejects.toMatchObject({ code: 'EROFS' });
    await source.close();
    await target.close();
    const copied = readFileSync(join(dir, 'target.raw'));
    const expected = Buffer.alloc(4 * MiB);
    bytes.copy(expected, 4097, 1001, 1001 + 2 * MiB + 77);
    bytes.copy(expected, 0, 0, 10);
    bytes.copy(expected, 4 * MiB - 3, 5, 8);
    expect(copied.equals(expected)).toBe(true);
  });
});

describe('convert -S', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qcow2-cli-sparse-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test('-S takes multiples of 512 up to 16 MiB, with suffixes, as qemu-img', () => {
    expect(parseSparseSize('0')).toBe(0);
    expect(parseSparseSize('4k')).toBe(4096);
    expect(parseSparseSize('512')).toBe(512);
    expect(parseSparseSize('16M')).toBe(16 * MiB);
    for (const bad of ['1000', '17M', 'x', '-1'])
      expect(() => parseSparseSize(bad), bad).toThrow(/^Invalid (buffer|sparse) size/);
  });

  test('-S 0: every byte allocated, data copied file to file from the host offsets', async () => {
    const bytes = pattern(4 * MiB, 3);
    bytes.fill(0, MiB, 2 * MiB); // zeros inside data: allocated too with -S 0
    writeFileSync(join(dir, 'source.raw'), bytes);
    const source = await FileBlockDevice.open(join(dir, 'source.raw'), { readOnly: true });
    const target = join(dir, 'full.raw');
    const progress: number[] = [];
    await convertToRaw(source, target, 'full.raw', {
      chunkSize: MiB,
      parallel: 3,
      sparseSize: 0,
      hostFile: (depth) => (depth === 0 ? source : undefined),
      onProgress: (done, total) => progress.push(done / total),
    });
    await source.close();
    expect(readFileSync(target).equals(bytes)).toBe(true);
    expect(statSync(target).blocks * 512).toBeGreaterThanOrEqual(4 * MiB);
    expect(progress[progress.length - 1]).toBe(1);
  });

  test('-S 0 from a device without host files: zero ranges allocated as zeros', async () => {
    const device = new MemoryBlockDevice(3 * MiB);
    await device.write(MiB + 5, pattern(1000, 9));
    const target = join(dir, 'memory.raw');
    await convertToRaw(device, target, 'memory.raw', { chunkSize: MiB, parallel: 2, sparseSize: 0 });
    expect(readFileSync(target).equals(Buffer.from(await device.read(0, device.size)))).toBe(true);
    expect(statSync(target).blocks * 512).toBeGreaterThanOrEqual(3 * MiB);
    await device.close();
  });

  test('-S 64k: only aligned 64 KiB runs of zeros become holes', async () => {
    const device = new MemoryBlockDevice(MiB);
    const data = pattern(MiB, 5);
    data.fill(0, 4096, 65536); // 60 KiB of zeros: not a whole 64 KiB block, stays data
    data.fill(0, 128 * 1024, 256 * 1024); // two whole blocks: holes
    await device.write(0, data);
    const target = join(dir, 'sparse64k.raw');
    await convertToRaw(device, target, 'sparse64k.raw', { chunkSize: MiB, parallel: 2, sparseSize: 65536 });
    expect(readFileSync(target).equals(data)).toBe(true);
    expect(statSync(target).blocks * 512).toBeLessThanOrEqual(MiB - 128 * 1024);
    expect(statSync(target).blocks * 512).toBeGreaterThan(MiB - 192 * 1024);
    await device.close();
  });
});
