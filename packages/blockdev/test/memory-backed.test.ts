import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { inlineIoMaxBytes, isMemoryBacked, SYNC_IO_MAX_BYTES } from '../src/node/index.js';

const SHM = '/dev/shm';

describe('isMemoryBacked', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(SHM, 'qcowkit-memory-backed-'));
    await writeFile(join(dir, 'file'), 'x');
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it('says yes for a folder and a regular file on tmpfs', async () => {
    expect(await isMemoryBacked(dir)).toBe(true);
    expect(await isMemoryBacked(join(dir, 'file'))).toBe(true);
    expect(await inlineIoMaxBytes(join(dir, 'file'))).toBe(SYNC_IO_MAX_BYTES);
  });

  it('says no for device nodes, although /dev is devtmpfs (which statfs calls tmpfs)', async () => {
    expect(await isMemoryBacked('/dev/null')).toBe(false);
    expect(await isMemoryBacked('/dev/zero')).toBe(false);
    expect(await inlineIoMaxBytes('/dev/null')).toBe(0);
  });

  it('says no for a path that does not exist', async () => {
    expect(await isMemoryBacked(join(dir, 'missing'))).toBe(false);
  });

  it('says no for a file on a disk file system', async () => {
    const diskDir = await mkdtemp(join(tmpdir(), 'qcowkit-memory-backed-'));
    try {
      // /tmp may itself be tmpfs on some machines: only assert when it is not.
      const onTmpfs = await isMemoryBacked(diskDir);
      await writeFile(join(diskDir, 'file'), 'x');
      expect(await isMemoryBacked(join(diskDir, 'file'))).toBe(onTmpfs);
    } finally {
      await rm(diskDir, { recursive: true, force: true });
    }
  });
});
