/**
 * `convert SRC1 SRC2 ... DST`, `-C` and `-r` below the command line: the sources opened and
 * concatenated (each extent's data read from its own source's file), copy offloading's whole
 * copies, and the rate limiter seeing every byte written.
 */
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { convertToRaw } from '../src/commands/convert.js';
import { refuseConvertFlags, refuseForSeveralSources } from '../src/commands/convert-args.js';
import { openSources, snapshotOfSource } from '../src/commands/convert-sources.js';
import { openImage } from '../src/engine.js';
import type { CliIo } from '../src/io.js';
import { RateLimiter } from '../src/rate-limit.js';

const KiB = 1024;
const MiB = 2 ** 20;

function pattern(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  for (let index = 0; index < length; index++) bytes[index] = (index * 31 + seed) & 0xff || 1;
  return bytes;
}

describe('convert with several sources, -C and -r', () => {
  let dir: string;
  const stderr: string[] = [];
  let io: CliIo;
  const at = (name: string) => join(dir, name);
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qcow2-cli-sources-'));
    io = {
      stdout: { write: () => {} },
      stderr: { write: (text) => void stderr.push(text) },
      cwd: dir,
      env: {},
      isTTY: false,
    };
    const first = pattern(MiB, 1);
    first.fill(0, 256 * KiB, 512 * KiB);
    writeFileSync(at('first.raw'), first);
    // 1000 bytes: a guest of two sectors, its tail reading as zeros (as qemu-img sees it).
    writeFileSync(at('odd.raw'), pattern(1000, 2));
    writeFileSync(at('last.raw'), pattern(2 * MiB, 3));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const open = (names: string[], salvage = false) =>
    openSources(io, names, (name) => openImage(at(name), { displayName: name, format: 'raw' }), { salvage });

  test('the guests follow each other, each data range read from its own file', async () => {
    const sources = await open(['first.raw', 'odd.raw', 'last.raw']);
    try {
      expect(sources.device.size).toBe(MiB + 1024 + 2 * MiB);
      const files = new Set<FileBlockDevice>();
      for (const offset of [0, MiB + 100, MiB + 1024 + 5]) {
        const file = sources.hostFile(0, offset);
        expect(file).toBeInstanceOf(FileBlockDevice);
        files.add(file!);
      }
      expect(files.size).toBe(3);
      await convertToRaw(sources.device, at('whole.raw'), 'whole.raw', {
        chunkSize: MiB,
        parallel: 3,
        hostFile: sources.hostFile,
      });
    } finally {
      await sources.close();
    }
    const expected = Buffer.concat([
      readFileSync(at('first.raw')),
      readFileSync(at('odd.raw')),
      Buffer.alloc(24),
      readFileSync(at('last.raw')),
    ]);
    expect(readFileSync(at('whole.raw')).equals(expected)).toBe(true);
  });

  test('salvaging reads every range through the sources (never straight from a file)', async () => {
    const sources = await open(['first.raw', 'last.raw'], true);
    try {
      expect(sources.hostFile(0, 0)).toBeUndefined();
      expect(sources.hostFile(0, MiB + 1)).toBeUndefined();
    } finally {
      await sources.close();
    }
  });

  test('-C copies data whole (zeros in it stay allocated) and leaves zero ranges as holes', async () => {
    const sources = await open(['first.raw']);
    const written: number[] = [];
    const limiter = new RateLimiter(2 ** 40);
    const take = limiter.take.bind(limiter);
    limiter.take = (bytes) => {
      written.push(bytes);
      return take(bytes);
    };
    try {
      await convertToRaw(sources.device, at('offload.raw'), 'offload.raw', {
        chunkSize: MiB,
        parallel: 2,
        copyOffload: true,
        hostFile: sources.hostFile,
        rateLimiter: limiter,
      });
    } finally {
      await sources.close();
    }
    expect(readFileSync(at('offload.raw')).equals(readFileSync(at('first.raw')))).toBe(true);
    // A raw file's block status calls it all data: copied whole, its zeros allocated too.
    expect(statSync(at('offload.raw')).blocks * 512).toBeGreaterThanOrEqual(MiB);
    expect(written.reduce((sum, bytes) => sum + bytes, 0)).toBe(MiB);
  });

  test('-r counts the bytes written, not the holes left', async () => {
    const sources = await open(['first.raw']);
    let counted = 0;
    const limiter = new RateLimiter(2 ** 40);
    const take = limiter.take.bind(limiter);
    limiter.take = (bytes) => {
      counted += bytes;
      return take(bytes);
    };
    try {
      await convertToRaw(sources.device, at('limited.raw'), 'limited.raw', {
        chunkSize: MiB,
        parallel: 2,
        hostFile: sources.hostFile,
        rateLimiter: limiter,
      });
    } finally {
      await sources.close();
    }
    // The 256 KiB of zeros inside the data became a hole: not written, not counted.
    expect(counted).toBe(MiB - 256 * KiB);
  });

  test("qemu-img's refusals: flags with -C, and what several sources cannot have", () => {
    expect(() => refuseConvertFlags({ copyOffload: true, compress: true })).toThrow(
      'Cannot enable copy offloading when -c is used',
    );
    expect(() => refuseConvertFlags({ copyOffload: true, sparseGiven: true, salvage: true })).toThrow(
      'Cannot enable copy offloading when -S is used',
    );
    expect(() => refuseConvertFlags({ copyOffload: true, salvage: true })).toThrow(
      'Cannot use copy offloading in salvaging mode',
    );
    expect(() => refuseConvertFlags({ compress: true, sparseGiven: true, salvage: true })).not.toThrow();
    expect(() => refuseForSeveralSources(2, { snapshot: { idOrName: 's' }, backing: true })).toThrow(
      'No support for concatenating multiple snapshot',
    );
    expect(() => refuseForSeveralSources(2, { backing: true, bitmaps: true })).toThrow(
      /Having a backing file/,
    );
    expect(() => refuseForSeveralSources(3, { bitmaps: true })).toThrow(
      'Copying bitmaps only possible with single source',
    );
    expect(() =>
      refuseForSeveralSources(1, { snapshot: { idOrName: 's' }, backing: true, bitmaps: true }),
    ).not.toThrow();
    // A snapshot named by snapshot.name= / snapshot.id= is loaded in the first source only.
    expect(snapshotOfSource(0, 2, { name: 's' })).toEqual({ name: 's' });
    expect(snapshotOfSource(1, 2, { name: 's' })).toBeUndefined();
    expect(stderr).toEqual([]);
  });
});
