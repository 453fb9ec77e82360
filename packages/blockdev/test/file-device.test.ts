import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type BlockDeviceError, blockStatusAll, isBlockDeviceError } from '@qcowkit/blockdev';
import { FileBlockDevice, MAX_EXTENTS_PER_CALL } from '@qcowkit/blockdev/node';
import { describeBlockDeviceConformance } from '@qcowkit/blockdev/testing';
import { afterAll, describe, expect, it } from 'vitest';
import { blockErrorCodeFor, fsError } from '../src/node/fs-errors.js';

const dir = mkdtempSync(join(tmpdir(), 'qcowkit-file-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let counter = 0;
const freshPath = (name = 'disk') => join(dir, `${name}-${counter++}.raw`);

const TiB = 2 ** 40;
const MiB = 2 ** 20;

async function expectCode(promise: Promise<unknown>, code: string): Promise<BlockDeviceError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(isBlockDeviceError(error), `expected a BlockDeviceError ${code}, got ${String(error)}`).toBe(true);
  expect((error as BlockDeviceError).code).toBe(code);
  return error as BlockDeviceError;
}

describeBlockDeviceConformance({
  name: 'FileBlockDevice',
  create: (size) => FileBlockDevice.create(freshPath('conf'), size),
  reopen: async (device) => {
    const path = (device as FileBlockDevice).path;
    await device.close();
    return FileBlockDevice.open(path);
  },
  createReadOnly: async (content) => {
    const path = freshPath('ro');
    writeFileSync(path, content);
    return FileBlockDevice.open(path, { readOnly: true });
  },
  supportsResize: true,
  numRuns: 25,
});

describeBlockDeviceConformance({
  name: 'FileBlockDevice without native calls (plain Node fallback)',
  create: (size) => FileBlockDevice.create(freshPath('plain'), size, { native: false }),
  sizes: [4097, 197_635],
  numRuns: 15,
  supportsResize: true,
  // Without fallocate, discard cannot release anything and leaves the bytes (as documented).
  discardReadsZero: false,
});

describe('FileBlockDevice', () => {
  it('finds exactly the data at both ends of a sparse 8 TiB file in one call', async () => {
    await using device = await FileBlockDevice.create(freshPath('sparse'), 8 * TiB);
    await device.write(0, new Uint8Array(4096).fill(1));
    await device.write(8 * TiB - 8192, new Uint8Array(8192).fill(2));
    expect(device.capabilities.blockStatus).toBe(true);
    // One call answers for the whole 8 TiB: the cost is in the extents, not the size.
    const extents = await device.blockStatus(0, device.size);
    expect(extents).toEqual([
      { offset: 0, length: 4096, zero: false, data: true, present: true, depth: 0, hostOffset: 0 },
      { offset: 4096, length: 8 * TiB - 8192 - 4096, zero: true, data: false, present: false, depth: 0 },
      {
        offset: 8 * TiB - 8192,
        length: 8192,
        zero: false,
        data: true,
        present: true,
        depth: 0,
        hostOffset: 8 * TiB - 8192,
      },
    ]);
    // A query starting inside a hole, ending inside data.
    expect(await device.blockStatus(TiB, 7 * TiB - 4096)).toEqual([
      { offset: TiB, length: 7 * TiB - 8192, zero: true, data: false, present: false, depth: 0 },
      {
        offset: 8 * TiB - 8192,
        length: 4096,
        zero: false,
        data: true,
        present: true,
        depth: 0,
        hostOffset: 8 * TiB - 8192,
      },
    ]);
  });

  it('caps the extents of one blockStatus call', async () => {
    await using device = await FileBlockDevice.create(freshPath('many'), (MAX_EXTENTS_PER_CALL + 100) * 8192);
    const block = new Uint8Array(4096).fill(7);
    for (let i = 0; i < MAX_EXTENTS_PER_CALL / 2 + 50; i++) await device.write(i * 8192, block);
    const first = await device.blockStatus(0, device.size);
    expect(first).toHaveLength(MAX_EXTENTS_PER_CALL);
    const all = await blockStatusAll(device, 0, device.size);
    expect(all.filter((e) => e.data)).toHaveLength(MAX_EXTENTS_PER_CALL / 2 + 50);
    expect(all.at(-1)).toMatchObject({ zero: true, offset: (MAX_EXTENTS_PER_CALL / 2 + 49) * 8192 + 4096 });
  });

  it('punches holes on discard, zeroing unaligned edges, and allocatedBytes shrinks', async () => {
    await using device = await FileBlockDevice.create(freshPath('punch'), 4 * MiB);
    await device.write(0, new Uint8Array(4 * MiB).fill(0x5a));
    await device.flush();
    const before = await device.allocatedBytes();
    expect(before).toBeGreaterThanOrEqual(4 * MiB);
    expect(device.capabilities.discard).toBe(true);
    await device.discard(100, 2 * MiB);
    const after = await device.allocatedBytes();
    expect(before - after).toBeGreaterThanOrEqual(2 * MiB - 8192);
    const bytes = await device.read(0, 3 * MiB);
    expect(bytes.subarray(0, 100).every((b) => b === 0x5a)).toBe(true);
    expect(bytes.subarray(100, 100 + 2 * MiB).every((b) => b === 0)).toBe(true);
    expect(bytes.subarray(100 + 2 * MiB).every((b) => b === 0x5a)).toBe(true);
    const extents = await blockStatusAll(device, 0, device.size);
    expect(extents.some((e) => !e.data && e.offset === 4096 && e.length === 2 * MiB - 4096)).toBe(true);
  });

  // Both the test machine's temporary directory (often ext4, with FALLOC_FL_ZERO_RANGE) and
  // /dev/shm (tmpfs: no ZERO_RANGE, so punch then allocate again) where it exists.
  const zeroDirs = [dir, ...(existsSync('/dev/shm') ? ['/dev/shm'] : [])];
  it.each(zeroDirs)(
    'writeZeroes keeps storage without mayUnmap and releases it with mayUnmap (in %s)',
    async (base) => {
      const path = join(base, `qcowkit-zero-${process.pid}-${counter++}.raw`);
      try {
        await using device = await FileBlockDevice.create(path, 4 * MiB);
        await device.write(0, new Uint8Array(4 * MiB).fill(3));
        const full = await device.allocatedBytes();
        await device.writeZeroes(1000, MiB, { fastOnly: true });
        expect(await device.allocatedBytes()).toBeGreaterThanOrEqual(full);
        await device.writeZeroes(2 * MiB, MiB, { mayUnmap: true, fastOnly: true });
        expect(await device.allocatedBytes()).toBeLessThanOrEqual(full - MiB);
        await device.writeZeroes(3 * MiB + 1, 10, { fastOnly: true });
        const bytes = await device.read(0, 4 * MiB);
        const expected = new Uint8Array(4 * MiB).fill(3);
        expected.fill(0, 1000, 1000 + MiB);
        expected.fill(0, 2 * MiB, 3 * MiB);
        expected.fill(0, 3 * MiB + 1, 3 * MiB + 11);
        expect(Buffer.from(bytes).equals(Buffer.from(expected))).toBe(true);
      } finally {
        rmSync(path, { force: true });
      }
    },
  );

  it('falls back to plain Node I/O without native calls', async () => {
    await using device = await FileBlockDevice.create(freshPath('fallback'), 8 * MiB, { native: false });
    expect(device.lockMechanism).toBe('none');
    expect(device.capabilities).toMatchObject({ blockStatus: false, discard: false, fastZero: false });
    await device.write(MiB, new Uint8Array(4096).fill(9));
    expect(await device.blockStatus(0, device.size)).toEqual([
      { offset: 0, length: 8 * MiB, zero: false, data: true, present: true, depth: 0, hostOffset: 0 },
    ]);
    await expectCode(device.writeZeroes(MiB, 4096, { fastOnly: true }), 'ENOTSUP');
    await device.writeZeroes(MiB, 4096, { mayUnmap: true });
    expect((await device.read(MiB, 4096)).every((b) => b === 0)).toBe(true);
  });

  it('reads into the caller buffer, including a view into a larger buffer', async () => {
    await using device = await FileBlockDevice.create(freshPath('view'), MiB);
    await device.write(
      4096,
      Uint8Array.from({ length: 300 }, (_, i) => i & 0xff),
    );
    const backing = new Uint8Array(1000).fill(0xee);
    const view = backing.subarray(100, 400);
    await device.readInto(view, 4096);
    expect(view).toEqual(Uint8Array.from({ length: 300 }, (_, i) => i & 0xff));
    expect(backing[99]).toBe(0xee);
    expect(backing[400]).toBe(0xee);
  });

  it('resizes and reports the new size after reopening', async () => {
    const path = freshPath('resize');
    const device = await FileBlockDevice.create(path, MiB);
    await device.write(MiB - 10, new Uint8Array(10).fill(1));
    await device.resize(3 * MiB);
    expect((await device.read(MiB - 10, 20)).subarray(10).every((b) => b === 0)).toBe(true);
    await device.resize(MiB - 5);
    await device.close();
    await using again = await FileBlockDevice.open(path, { readOnly: true });
    expect(again.size).toBe(MiB - 5);
    expect(again.capabilities.discard).toBe(false);
  });
});

describe('FileBlockDevice errors', () => {
  it('ENOENT names the path and keeps the cause', async () => {
    const path = join(dir, 'missing.raw');
    const error = await expectCode(FileBlockDevice.open(path), 'ENOENT');
    expect(error.message).toContain(path);
    expect((error.cause as { code?: string }).code).toBe('ENOENT');
  });

  it('refuses to create over an existing file unless asked to', async () => {
    const path = freshPath('exists');
    writeFileSync(path, 'hello');
    await expectCode(FileBlockDevice.create(path, 4096), 'EINVAL');
    await using device = await FileBlockDevice.create(path, 4096, { overwrite: true });
    expect(device.size).toBe(4096);
    expect((await device.read(0, 5)).every((b) => b === 0)).toBe(true);
  });

  it('EROFS on writes to a read-only device, ECLOSED after close', async () => {
    const path = freshPath('rofs');
    writeFileSync(path, new Uint8Array(8192));
    const device = await FileBlockDevice.open(path, { readOnly: true });
    await expectCode(device.write(0, new Uint8Array(1)), 'EROFS');
    await expectCode(device.discard(0, 512), 'EROFS');
    await expectCode(device.resize(0), 'EROFS');
    await device.close();
    await device.close();
    await expectCode(device.read(0, 1), 'ECLOSED');
  });

  it('maps operating-system errors to stable codes', () => {
    const cause = Object.assign(new Error('EROFS: read-only file system, open'), { code: 'EROFS' });
    const error = fsError('open', '/x.raw', cause, 512);
    expect(error.code).toBe('EROFS');
    expect(error.message).toBe('open: /x.raw: read-only file system (EROFS) (at 0x200)');
    expect(error.cause).toBe(cause);
    expect(blockErrorCodeFor('EACCES')).toBe('EACCES');
    expect(blockErrorCodeFor('ENOSPC')).toBe('ENOSPC');
    expect(blockErrorCodeFor('EIO')).toBe('EIO');
    expect(blockErrorCodeFor('ESOMETHINGELSE')).toBe('EIO');
  });

  it('a failed create leaves no file behind', async () => {
    const path = freshPath('failed');
    // The bad option is noticed only after the file exists.
    await expectCode(FileBlockDevice.create(path, 4096, { maxInFlight: 0 }), 'EINVAL');
    expect(existsSync(path)).toBe(false);
  });

  it('forceShare needs a read-only open', async () => {
    const path = freshPath('force');
    writeFileSync(path, new Uint8Array(512));
    await expectCode(FileBlockDevice.open(path, { forceShare: true }), 'EINVAL');
  });
});

describe('FileBlockDevice locking', () => {
  it('refuses a second writer and plain readers in the same process; readers share', async () => {
    const path = freshPath('lock');
    writeFileSync(path, new Uint8Array(4096));
    const writer = await FileBlockDevice.open(path);
    expect(writer.lockMechanism).toBe('ofd');
    const error = await expectCode(FileBlockDevice.open(path), 'EBUSY');
    expect(error.message).toBe(
      `${path}: locked by another process (opened for writing elsewhere); use forceShare / -U to open read-only anyway`,
    );
    await expectCode(FileBlockDevice.open(path, { readOnly: true }), 'EBUSY');
    const forced = await FileBlockDevice.open(path, { readOnly: true, forceShare: true });
    await forced.close();
    await writer.close();

    const reader1 = await FileBlockDevice.open(path, { readOnly: true });
    const reader2 = await FileBlockDevice.open(path, { readOnly: true });
    await expectCode(FileBlockDevice.open(path), 'EBUSY');
    await reader1.close();
    await reader2.close();
    const unlockedWriter = await FileBlockDevice.open(path);
    await unlockedWriter.close();

    // Writers in shared mode write side by side; an exclusive writer is refused meanwhile.
    const shared1 = await FileBlockDevice.open(path, { lock: 'shared' });
    const shared2 = await FileBlockDevice.open(path, { lock: 'shared' });
    await expectCode(FileBlockDevice.open(path, { lock: 'exclusive' }), 'EBUSY');
    const unlocked = await FileBlockDevice.open(path, { lock: 'none' });
    expect(unlocked.lockMechanism).toBe('none');
    await Promise.all([shared1.close(), shared2.close(), unlocked.close()]);
  });

  it('refuses a writer while another process holds the file for writing', async () => {
    const path = freshPath('xproc');
    writeFileSync(path, new Uint8Array(4096));
    const entry = fileURLToPath(new URL('../dist/node/index.js', import.meta.url));
    // The child opens the file for writing, says so, and exits when its stdin closes.
    const child = spawn(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `const { FileBlockDevice } = await import(${JSON.stringify(entry)});
         const d = await FileBlockDevice.open(${JSON.stringify(path)});
         process.stdout.write('locked\\n');
         process.stdin.resume();
         process.stdin.on('end', async () => { await d.close(); process.exit(0); });`,
      ],
      { stdio: ['pipe', 'pipe', 'inherit'] },
    );
    try {
      await new Promise<void>((resolve, reject) => {
        child.stdout.on('data', (chunk: Buffer) => chunk.toString().includes('locked') && resolve());
        child.on('exit', (code) => reject(new Error(`child exited early with ${code}`)));
      });
      await expectCode(FileBlockDevice.open(path), 'EBUSY');
      await expectCode(FileBlockDevice.open(path, { readOnly: true }), 'EBUSY');
    } finally {
      const exited = new Promise((resolve) => child.on('exit', resolve));
      child.stdin.end();
      await exited;
    }
    const device = await FileBlockDevice.open(path);
    await device.close();
  });
});
