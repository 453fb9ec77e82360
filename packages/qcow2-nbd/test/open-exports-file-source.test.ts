/**
 * When the command line lets the server use an export's file directly (NbdExport.fileSource):
 * raw files on memory-backed file systems only, `writes` only when the file is written in place
 * (not -r, not -s), nothing with --aio=threads or for a file on a disk.
 */
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { isMemoryBacked } from '@qcowkit/blockdev/node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openExports } from '../src/cli/open-exports.js';
import { parseArgs } from '../src/cli/options.js';

let memoryDir: string;
let diskDir: string;

beforeAll(async () => {
  memoryDir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'qcowkit-nbd-source-'));
  // A folder on a disk: the temporary folder unless it is tmpfs, else beside this test.
  const diskBase = (await isMemoryBacked(tmpdir())) ? fileURLToPath(new URL('.', import.meta.url)) : tmpdir();
  diskDir = mkdtempSync(join(diskBase, 'qcowkit-nbd-source-'));
  for (const dir of [memoryDir, diskDir]) writeFileSync(join(dir, 'disk.raw'), Buffer.alloc(1024 * 1024));
});
afterAll(() => {
  rmSync(memoryDir, { recursive: true, force: true });
  rmSync(diskDir, { recursive: true, force: true });
});

async function fileSourceOf(argv: string[]): Promise<{ fd: number; writes?: boolean } | undefined> {
  const parsed = parseArgs(argv, '0.0.0');
  if (parsed.kind !== 'run') throw new Error('expected options');
  const opened = await openExports(parsed.options);
  try {
    const source = opened.exports[0]!.fileSource;
    return source === undefined ? undefined : { ...source };
  } finally {
    await opened.close();
  }
}

describe('fileSource from the command line', () => {
  it('the folders are what the test needs', async () => {
    expect(await isMemoryBacked(memoryDir)).toBe(true);
    expect(await isMemoryBacked(diskDir)).toBe(false);
  });

  it('a writable raw file on tmpfs: READs sent from it and large WRITE payloads placed in it', async () => {
    const source = await fileSourceOf(['-f', 'raw', join(memoryDir, 'disk.raw')]);
    expect(source).toEqual({ fd: expect.any(Number), writes: true });
  });

  it('read-only (-r): READs only', async () => {
    expect(await fileSourceOf(['-f', 'raw', '-r', join(memoryDir, 'disk.raw')])).toEqual({
      fd: expect.any(Number),
      writes: false,
    });
  });

  it('snapshot (-s), --aio=threads, a file on a disk: neither', async () => {
    expect(await fileSourceOf(['-f', 'raw', '-s', join(memoryDir, 'disk.raw')])).toBeUndefined();
    expect(
      await fileSourceOf(['-f', 'raw', '--aio', 'threads', join(memoryDir, 'disk.raw')]),
    ).toBeUndefined();
    expect(await fileSourceOf(['-f', 'raw', join(diskDir, 'disk.raw')])).toBeUndefined();
  });
});
