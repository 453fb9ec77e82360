import { MemoryBlockDevice } from '@qcowkit/blockdev';
import type { Qcow2Header } from '@qcowkit/qcow2-core';
import { describe, expect, test } from 'vitest';
import { persistentBitmapsSize, readBitmapList } from '../src/qcow2-bitmaps.js';

/** A header carrying only what the bitmap reader looks at. */
function header(nbBitmaps: number, size: number, autoclear = 1): Qcow2Header {
  return {
    clusterSize: 65536,
    autoclearFeatures: { high: 0, low: autoclear },
    extensions: { bitmaps: { nbBitmaps, bitmapDirectoryOffset: 65536, bitmapDirectorySize: size } },
  } as unknown as Qcow2Header;
}

/** One directory entry, padded to 8 bytes. */
function entry(name: string, flags: number, granularityBits: number, extra = 0): Uint8Array {
  const nameBytes = new TextEncoder().encode(name);
  const length = Math.ceil((24 + extra + nameBytes.length) / 8) * 8;
  const bytes = new Uint8Array(length);
  const view = new DataView(bytes.buffer);
  view.setUint32(12, flags);
  view.setUint8(16, 1);
  view.setUint8(17, granularityBits);
  view.setUint16(18, nameBytes.length);
  view.setUint32(20, extra);
  bytes.set(nameBytes, 24 + extra);
  return bytes;
}

async function deviceWith(directory: Uint8Array): Promise<MemoryBlockDevice> {
  const device = new MemoryBlockDevice(65536 + Math.max(directory.length, 8));
  await device.write(65536, directory);
  return device;
}

describe('readBitmapList', () => {
  test('names, granularities and flags in directory order, extra data skipped', async () => {
    const a = entry('nightly', 0b10, 16);
    const b = entry('wéekly', 0b01, 17, 8);
    const directory = new Uint8Array(a.length + b.length);
    directory.set(a);
    directory.set(b, a.length);
    const device = await deviceWith(directory);
    expect(await readBitmapList(device, header(2, directory.length))).toEqual([
      { name: 'nightly', granularity: 65536, flags: ['auto'] },
      { name: 'wéekly', granularity: 131072, flags: ['in-use'] },
    ]);
  });

  test('bitmaps invalidated by a program that cleared the autoclear bit are not listed', async () => {
    const device = await deviceWith(entry('x', 2, 16));
    expect(await readBitmapList(device, header(1, 32, 0))).toEqual([]);
  });

  test('a directory that lies is refused with ECORRUPT', async () => {
    const device = await deviceWith(entry('x', 2, 16));
    await expect(readBitmapList(device, header(2, 32))).rejects.toMatchObject({ code: 'ECORRUPT' });
    await expect(readBitmapList(device, header(1, 1 << 30))).rejects.toMatchObject({ code: 'ECORRUPT' });
    const bad = entry('x', 2, 40);
    await expect(readBitmapList(await deviceWith(bad), header(1, bad.length))).rejects.toThrow(/granularity/);
  });
});

describe('persistentBitmapsSize', () => {
  const bitmap = (name: string, granularity: number) => ({ name, granularity, flags: [] });
  test('no bitmaps: nothing', () => {
    expect(persistentBitmapsSize([], 2 ** 30, 65536)).toBe(0);
  });
  test('data, tables and directory rounded to clusters, as qemu-img measure counts them', () => {
    // 3 GiB guest, 64 KiB clusters: 6 KiB of bits (1 cluster) + its table (1 cluster); 96 KiB of
    // bits (2 clusters) + table (1 cluster); a directory of 32 + 48 bytes (1 cluster).
    const list = [bitmap('b0', 65536), bitmap('a-longer-bitmap-name', 4096)];
    expect(persistentBitmapsSize(list, 3 * 2 ** 30, 65536)).toBe(6 * 65536);
    // 4 KiB clusters: 2 + 1, 24 + 1, 1 clusters.
    expect(persistentBitmapsSize(list, 3 * 2 ** 30, 4096)).toBe(29 * 4096);
  });
  test('names count in UTF-8 bytes', () => {
    const ascii = persistentBitmapsSize([bitmap('x'.repeat(250), 65536)], 2 ** 20, 512);
    const wide = persistentBitmapsSize([bitmap('é'.repeat(250), 65536)], 2 ** 20, 512);
    expect(wide - ascii).toBe(512);
  });
});
