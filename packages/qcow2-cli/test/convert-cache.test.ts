/**
 * `qcow2 convert -t CACHE`: when the target is flushed. fdatasync is counted through a spy on
 * node:fs (the raw target's FileBlockDevice, the writer's file sinks and the image opened for
 * `-n` all flush through it); the source is only read, so every flush counted is the target's.
 * qemu-img convert 7.2 under strace: no fdatasync after the data by default (`unsafe`), one at
 * the end with `writeback`/`none`, one after every write with `writethrough`/`directsync`.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBlockDevice, type WriteOptions, type WriteZeroesOptions } from '@qcowkit/blockdev';
import { afterAll, beforeEach, describe, expect, test, vi } from 'vitest';
import { convertToRaw } from '../src/commands/convert.js';
import { targetFlush, WriteThroughDevice } from '../src/commands/convert-cache.js';
import { CACHE_MODES } from '../src/commands/register-ops.js';
import type { CliIo } from '../src/io.js';
import { run } from '../src/run.js';

const syncs = vi.hoisted(() => ({ count: 0 }));

vi.mock('node:fs', async (importOriginal) => {
  const fs = await importOriginal<typeof import('node:fs')>();
  return {
    ...fs,
    fdatasync: (fd: number, callback: (error: NodeJS.ErrnoException | null) => void) => {
      syncs.count++;
      fs.fdatasync(fd, callback);
    },
    fdatasyncSync: (fd: number) => {
      syncs.count++;
      fs.fdatasyncSync(fd);
    },
  };
});

const MiB = 2 ** 20;
const dir = mkdtempSync(join(tmpdir(), 'qcow2-cli-cache-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let counter = 0;
const fresh = (ext: string) => join(dir, `t${counter++}.${ext}`);

const errors: string[] = [];
const io: CliIo = {
  stdout: { write: () => {} },
  stderr: { write: (chunk) => void errors.push(chunk) },
  cwd: dir,
  env: {},
  isTTY: false,
};

/** A raw source of 4 MiB: two runs of data far apart (two writes into a raw target). */
const sourcePath = join(dir, 'source.raw');
const sourceBytes = Buffer.alloc(4 * MiB);
sourceBytes.fill(0x5a, 0, 64 * 1024);
sourceBytes.fill(0xa5, 2 * MiB, 2 * MiB + 64 * 1024);
writeFileSync(sourcePath, sourceBytes);

beforeEach(() => {
  errors.length = 0;
  syncs.count = 0;
});

/** Runs `qcow2 args...` and returns how many fdatasync calls it made. */
async function flushesOf(args: string[]): Promise<number> {
  syncs.count = 0;
  expect(await run(args, io), errors.join('')).toBe(0);
  return syncs.count;
}

describe('targetFlush', () => {
  test('every cache mode qemu-img takes, and the default', () => {
    const expected: Record<(typeof CACHE_MODES)[number], string> = {
      unsafe: 'never',
      writeback: 'on-close',
      none: 'on-close',
      off: 'on-close',
      writethrough: 'every-write',
      directsync: 'every-write',
    };
    for (const mode of CACHE_MODES) expect(targetFlush(mode), mode).toBe(expected[mode]);
    expect(targetFlush(undefined)).toBe('never');
  });
});

describe.each(['raw', 'qcow2'])('convert -O %s', (format) => {
  const convert = async (cacheArgs: string[]) => {
    const target = fresh(format);
    const flushes = await flushesOf(['convert', '-f', 'raw', '-O', format, ...cacheArgs, sourcePath, target]);
    // Whatever the mode, the same image.
    expect(await run(['compare', '-f', 'raw', '-F', format, sourcePath, target], io), errors.join('')).toBe(
      0,
    );
    if (format === 'raw') expect(readFileSync(target).equals(sourceBytes)).toBe(true);
    return flushes;
  };

  test('no -t (unsafe, as qemu-img): the target is never flushed', async () => {
    expect(await convert([])).toBe(0);
    expect(await convert(['-t', 'unsafe', '-T', 'none'])).toBe(0);
  });

  test('-t writeback and -t none: flushed once, at the end', async () => {
    expect(await convert(['-t', 'writeback'])).toBe(1);
    expect(await convert(['-t', 'none', '-T', 'writeback'])).toBe(1);
  });

  test('-t writethrough and -t directsync: flushed after every write (and at the end)', async () => {
    // Two runs of data: at least two writes, each followed by a flush, and the one at close.
    expect(await convert(['-t', 'writethrough'])).toBeGreaterThanOrEqual(3);
    expect(await convert(['-t', 'directsync'])).toBeGreaterThanOrEqual(3);
  });

  test('-n into an existing image: never flushed by default, flushed with -t writeback', async () => {
    const target = fresh(format);
    expect(await run(['create', '-f', format, target, '4M'], io), errors.join('')).toBe(0);
    const into = (cacheArgs: string[]) =>
      flushesOf(['convert', '-n', '-f', 'raw', '-O', format, ...cacheArgs, sourcePath, target]);
    expect(await into([])).toBe(0);
    const writeback = await into(['-t', 'writeback']);
    // A raw file: once at close; a qcow2 image also flushes between its metadata updates.
    if (format === 'raw') expect(writeback).toBe(1);
    else expect(writeback).toBeGreaterThanOrEqual(1);
    expect(await into(['-t', 'writethrough'])).toBeGreaterThan(writeback);
    expect(await run(['compare', '-f', 'raw', '-F', format, sourcePath, target], io), errors.join('')).toBe(
      0,
    );
  });
});

describe('convertToRaw flush', () => {
  const guest = async () => {
    const device = new MemoryBlockDevice(4 * MiB);
    await device.write(0, sourceBytes.subarray(0, 64 * 1024));
    await device.write(2 * MiB, sourceBytes.subarray(2 * MiB, 2 * MiB + 64 * 1024));
    return device;
  };
  const options = { chunkSize: MiB, parallel: 2 };

  test.each([
    { flush: undefined, expected: 1 },
    { flush: 'on-close' as const, expected: 1 },
    { flush: 'never' as const, expected: 0 },
    { flush: 'every-write' as const, expected: 3 },
  ])('flush $flush: $expected fdatasync', async ({ flush, expected }) => {
    for (const [inlineWrites, sparseSize] of [
      [true, 4096],
      [false, 4096],
      [false, 0], // -S 0: fully allocated, every range written (zeros too)
    ] as const) {
      syncs.count = 0;
      const target = fresh('raw');
      await convertToRaw(await guest(), target, 'out', { ...options, flush, inlineWrites, sparseSize });
      // -S 0 writes each extent cut at 1 MiB: two data runs and four zero ranges.
      const writes = sparseSize === 0 ? 6 : 2;
      expect(syncs.count, `inline ${inlineWrites}, -S ${sparseSize}`).toBe(
        flush === 'every-write' ? writes + 1 : expected,
      );
      expect(readFileSync(target).equals(sourceBytes)).toBe(true);
    }
  });
});

describe('WriteThroughDevice', () => {
  test('every write and zero write asks for fua, a discard is followed by a flush; reads pass through', async () => {
    const asked: string[] = [];
    class Recording extends MemoryBlockDevice {
      override async write(offset: number, data: Uint8Array, options?: WriteOptions) {
        asked.push(`write ${offset} fua=${options?.fua === true}`);
        return super.write(offset, data, options);
      }
      override async writeZeroes(offset: number, length: number, options?: WriteZeroesOptions) {
        asked.push(`zeroes ${offset} fua=${options?.fua === true} unmap=${options?.mayUnmap === true}`);
        return super.writeZeroes(offset, length, options);
      }
      override async discard(offset: number, length: number) {
        asked.push(`discard ${offset}`);
        return super.discard(offset, length);
      }
      override async flush() {
        asked.push('flush');
        return super.flush();
      }
    }
    const inner = new Recording(MiB);
    const device = new WriteThroughDevice(inner);
    expect(device.size).toBe(MiB);
    expect(device.description).toBe(inner.description);
    await device.write(512, new Uint8Array(512).fill(7));
    await device.writeZeroes(4096, 4096, { mayUnmap: true });
    await device.discard(8192, 4096);
    expect(asked).toEqual(['write 512 fua=true', 'zeroes 4096 fua=true unmap=true', 'discard 8192', 'flush']);
    expect([...(await device.read(510, 4))]).toEqual([0, 0, 7, 7]);
    await device.close();
    // Closing the wrapper leaves the inner device to its opener.
    expect(inner.size).toBe(MiB);
    await expect(inner.read(0, 1)).resolves.toHaveLength(1);
    await inner.close();
  });
});
