/**
 * When the writer's file sinks call fdatasync (`flush`: 'on-close' by default, 'never' as qemu-img
 * convert's default cache mode, 'every-write' as cache=writethrough), counted through a spy on
 * node:fs: the random-access sink of the read-once conversions (both write modes), the streaming
 * sink, and convertToQcow2 into a path.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { afterAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { openFileSink } from '../src/node/file-sink.js';
import { convertToQcow2, type FileFlush } from '../src/node/index.js';
import { openRandomAccessFile } from '../src/node/random-access-file.js';

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

vi.mock('node:fs/promises', async (importOriginal) => {
  const fs = await importOriginal<typeof import('node:fs/promises')>();
  return {
    ...fs,
    open: async (...args: Parameters<typeof fs.open>) => {
      const handle = await fs.open(...args);
      const datasync = handle.datasync.bind(handle);
      handle.datasync = () => {
        syncs.count++;
        return datasync();
      };
      return handle;
    },
  };
});

const dir = mkdtempSync(join(tmpdir(), 'qcow2-writer-flush-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let counter = 0;
const fresh = () => join(dir, `f${counter++}.bin`);

beforeEach(() => {
  syncs.count = 0;
});

const cases: { flush: FileFlush | undefined; perWrite: number; atClose: number }[] = [
  { flush: undefined, perWrite: 0, atClose: 1 },
  { flush: 'on-close', perWrite: 0, atClose: 1 },
  { flush: 'never', perWrite: 0, atClose: 0 },
  { flush: 'every-write', perWrite: 1, atClose: 1 },
];

describe.each([false, true])('openRandomAccessFile (inline %s)', (inline) => {
  it.each(cases)(
    'flush $flush: $perWrite per write, $atClose at close',
    async ({ flush, perWrite, atClose }) => {
      const path = fresh();
      const sink = await openRandomAccessFile(path, { inline, flush });
      await Promise.all([
        sink.writeAt(0, new Uint8Array(4).fill(1)),
        sink.writeAt(8, new Uint8Array(4).fill(2)),
      ]);
      expect(syncs.count).toBe(2 * perWrite);
      await sink.close(12);
      expect(syncs.count).toBe(2 * perWrite + atClose);
      expect([...readFileSync(path)]).toEqual([1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2]);
    },
  );

  it('abort never flushes', async () => {
    const sink = await openRandomAccessFile(fresh(), { inline });
    await sink.writeAt(0, new Uint8Array(4));
    await sink.abort();
    expect(syncs.count).toBe(0);
  });
});

describe('openFileSink', () => {
  it.each(cases)(
    'flush $flush: $perWrite per write, $atClose at close',
    async ({ flush, perWrite, atClose }) => {
      const path = fresh();
      const sink = await openFileSink(path, { flush });
      await sink.write(new Uint8Array(4).fill(3));
      await sink.skip?.(4);
      await sink.write(new Uint8Array(4).fill(4));
      await sink.close();
      expect(syncs.count).toBe(2 * perWrite + atClose);
      expect([...readFileSync(path)]).toEqual([3, 3, 3, 3, 0, 0, 0, 0, 4, 4, 4, 4]);
    },
  );
});

describe('flush never over an existing file', () => {
  it('the old bytes are gone (the file is still emptied first), and no flush', async () => {
    const path = fresh();
    writeFileSync(path, Buffer.alloc(65536, 0xee));
    const sink = await openRandomAccessFile(path, { flush: 'never' });
    await sink.writeAt(4, new Uint8Array(2).fill(5));
    await sink.close(8);
    expect([...readFileSync(path)]).toEqual([0, 0, 0, 0, 5, 5, 0, 0]);
    writeFileSync(path, Buffer.alloc(65536, 0xee));
    const stream = await openFileSink(path, { flush: 'never' });
    await stream.skip?.(2);
    await stream.write(new Uint8Array(2).fill(6));
    await stream.close();
    expect([...readFileSync(path)]).toEqual([0, 0, 6, 6]);
    expect(syncs.count).toBe(0);
  });
});

describe('flush checked', () => {
  it('refuses an unknown mode before creating the file', async () => {
    const path = fresh();
    const bad = { flush: 'sometimes' as FileFlush };
    await expect(openRandomAccessFile(path, bad)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(openFileSink(path, bad)).rejects.toMatchObject({ code: 'EINVAL' });
    expect(() => readFileSync(path)).toThrow();
  });
});

describe('convertToQcow2 into a path', () => {
  const source = new MemoryBlockDevice(4 * 2 ** 20);
  beforeEach(async () => {
    await source.write(2 ** 20, new Uint8Array(65536).fill(9));
  });

  it.each([
    { what: 'read-once', options: {} },
    { what: 'planned (metadata preallocation)', options: { preallocation: 'metadata' as const } },
  ])('$what: no fdatasync with flush never, one with the default', async ({ options }) => {
    await convertToQcow2(source, fresh(), { ...options, flush: 'never' });
    expect(syncs.count).toBe(0);
    await convertToQcow2(source, fresh(), options);
    expect(syncs.count).toBe(1);
  });
});
