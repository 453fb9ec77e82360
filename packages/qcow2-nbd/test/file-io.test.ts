import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { type FileBlockDevice, isMemoryBacked, SYNC_IO_MAX_BYTES } from '@qcowkit/blockdev/node';
import { Qcow2Image } from '@qcowkit/qcow2-core';
import { describe, expect, it } from 'vitest';
import { fileIoOptions } from '../src/cli/file-io.js';
import { openExports } from '../src/cli/open-exports.js';
import { parseArgs } from '../src/cli/options.js';

describe('--aio', () => {
  it('threads and sync are fixed; auto goes inline only on memory-backed file systems', async () => {
    expect(await fileIoOptions('threads', '/dev/shm')).toEqual({ syncIoMaxBytes: 0 });
    expect(await fileIoOptions('sync', '/proc')).toEqual({ syncIoMaxBytes: SYNC_IO_MAX_BYTES });
    // /dev/shm is tmpfs on Linux; /proc is not memory-backed storage; a missing path is unknown.
    expect(await isMemoryBacked('/dev/shm')).toBe(true);
    expect(await isMemoryBacked('/proc')).toBe(false);
    expect(await isMemoryBacked('/no/such/file')).toBe(false);
    expect(await fileIoOptions('auto', '/dev/shm')).toEqual({ syncIoMaxBytes: SYNC_IO_MAX_BYTES });
    expect(await fileIoOptions('auto', '/proc')).toEqual({ syncIoMaxBytes: 0 });
  });
});

describe('--aio reaches every kind of export', () => {
  it('a read-only qcow2 export on tmpfs reads its file inline (auto), through the pool with threads', async () => {
    const dir = mkdtempSync(join('/dev/shm', 'qcowkit-aio-'));
    try {
      const path = join(dir, 'disk.qcow2');
      const memory = new MemoryBlockDevice(0);
      const created = await Qcow2Image.create(memory, { size: 1 << 20 });
      await created.flush();
      writeFileSync(path, await memory.read(0, memory.size));
      await created.close();
      for (const [flags, expected] of [
        [[], SYNC_IO_MAX_BYTES],
        [['--aio=threads'], 0],
      ] as const) {
        const parsed = parseArgs(['-r', '-f', 'qcow2', ...flags, path], '1.0.0');
        if (parsed.kind !== 'run') throw new Error('expected options');
        const opened = await openExports(parsed.options);
        try {
          const image = opened.exports[0]?.device as Qcow2Image;
          expect((image.file as FileBlockDevice).syncIoMaxBytes).toBe(expected);
        } finally {
          await opened.close();
        }
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
