/**
 * FileBlockDevice's synchronous path for small requests: the conformance kit with requests on
 * both sides of the bound, the default (off), and option validation.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isBlockDeviceError } from '@qcowkit/blockdev';
import { FileBlockDevice, isMemoryBacked, SYNC_IO_MAX_BYTES } from '@qcowkit/blockdev/node';
import { describeBlockDeviceConformance } from '@qcowkit/blockdev/testing';
import { afterAll, describe, expect, it } from 'vitest';

const dir = mkdtempSync(join(tmpdir(), 'qcowkit-file-sync-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let counter = 0;
const freshPath = (name = 'disk') => join(dir, `${name}-${counter++}.raw`);

describeBlockDeviceConformance({
  name: 'FileBlockDevice with sync I/O up to 4 KiB',
  create: (size) => FileBlockDevice.create(freshPath('sync'), size, { syncIoMaxBytes: 4096 }),
  reopen: async (device) => {
    const path = (device as FileBlockDevice).path;
    await device.close();
    return FileBlockDevice.open(path, { syncIoMaxBytes: 4096 });
  },
  createReadOnly: async (content) => {
    const path = freshPath('ro');
    writeFileSync(path, content);
    return FileBlockDevice.open(path, { readOnly: true, syncIoMaxBytes: 4096 });
  },
  supportsResize: true,
  numRuns: 20,
});

describe('FileBlockDevice sync I/O', () => {
  it('small writes and reads on the sync path land in the file, large ones on the pool', async () => {
    const path = freshPath();
    const device = await FileBlockDevice.create(path, 1 << 20, { syncIoMaxBytes: 65536 });
    expect(device.syncIoMaxBytes).toBe(65536);
    const small = new Uint8Array(65536).fill(0xa5);
    const large = new Uint8Array(65537).fill(0x5a);
    await Promise.all([device.write(1000, small), device.write(300_000, large)]);
    await device.flush();
    const file = readFileSync(path);
    expect(file.subarray(1000, 1000 + 65536).every((b) => b === 0xa5)).toBe(true);
    expect(file.subarray(300_000, 300_000 + 65537).every((b) => b === 0x5a)).toBe(true);
    expect(file[999]).toBe(0);
    expect(await device.read(1000, 65536)).toEqual(small);
    expect(await device.read(300_000, 65537)).toEqual(large);
    await device.close();
  });

  it('errors on the sync path are BlockDeviceErrors, delivered as rejections', async () => {
    const path = freshPath();
    writeFileSync(path, new Uint8Array(8192));
    const device = await FileBlockDevice.open(path, { readOnly: true, syncIoMaxBytes: 65536 });
    const result = device.write(0, new Uint8Array(512));
    expect(result).toBeInstanceOf(Promise);
    const error = await result.catch((e: unknown) => e);
    expect(isBlockDeviceError(error)).toBe(true);
    await device.close();
    const closed = await device.read(0, 512).catch((e: unknown) => e);
    expect(isBlockDeviceError(closed) && closed.code).toBe('ECLOSED');
  });

  it('is off unless asked for', async () => {
    const path = freshPath();
    writeFileSync(path, new Uint8Array(4096));
    const device = await FileBlockDevice.open(path, { readOnly: true });
    expect(device.syncIoMaxBytes).toBe(0);
    await device.close();
    const bounded = await FileBlockDevice.open(path, { readOnly: true, syncIoMaxBytes: SYNC_IO_MAX_BYTES });
    expect(bounded.syncIoMaxBytes).toBe(65536);
    await bounded.close();
  });

  it("'memory-backed' chooses the bound on tmpfs and 0 on other file systems", async () => {
    const shm = mkdtempSync(join('/dev/shm', 'qcowkit-file-sync-'));
    try {
      for (const path of [join(shm, 'disk.raw'), freshPath()]) {
        writeFileSync(path, new Uint8Array(4096));
        const device = await FileBlockDevice.open(path, { readOnly: true, syncIoMaxBytes: 'memory-backed' });
        expect(device.syncIoMaxBytes).toBe((await isMemoryBacked(path)) ? SYNC_IO_MAX_BYTES : 0);
        await device.close();
      }
      const onShm = await FileBlockDevice.open(join(shm, 'disk.raw'), { syncIoMaxBytes: 'memory-backed' });
      expect(onShm.syncIoMaxBytes).toBe(SYNC_IO_MAX_BYTES);
      await onShm.close();
    } finally {
      rmSync(shm, { recursive: true, force: true });
    }
  });

  it('refuses a negative or fractional bound with EINVAL', async () => {
    const path = freshPath();
    writeFileSync(path, new Uint8Array(4096));
    for (const syncIoMaxBytes of [-1, 1.5]) {
      const error = await FileBlockDevice.open(path, { syncIoMaxBytes }).catch((e: unknown) => e);
      expect(isBlockDeviceError(error) && error.code).toBe('EINVAL');
    }
  });
});
