/**
 * RawImage over a file whose length is not a multiple of 512: read-only, a guest of whole sectors
 * (the tail reads as zeros and is a zero extent), as QEMU's block layer sees it; writable, the
 * file's own length.
 */
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { describe, expect, it } from 'vitest';
import { RawImage } from '../src/raw-image.js';

const text = new TextEncoder().encode('twenty-five bytes of text');

describe('RawImage of a 25-byte file', () => {
  it('read-only: a 512-byte guest, the tail zeros', async () => {
    const image = new RawImage(MemoryBlockDevice.from(text, { readOnly: true }));
    expect(image.size).toBe(512);
    const all = await image.read(0, 512);
    expect(all.subarray(0, 25)).toEqual(text);
    expect(all.subarray(25).every((byte) => byte === 0)).toBe(true);
    expect(await image.read(20, 10)).toEqual(new Uint8Array([...text.subarray(20), 0, 0, 0, 0, 0]));
    expect(await image.read(100, 12)).toEqual(new Uint8Array(12));
    const extents = await image.blockStatus(0, 512);
    expect(extents.at(-1)).toEqual({
      offset: 25,
      length: 487,
      zero: true,
      data: false,
      present: true,
      depth: 0,
      hostOffset: 25,
    });
    expect(extents.reduce((sum, extent) => sum + extent.length, 0)).toBe(512);
    await expect(image.read(500, 13)).rejects.toMatchObject({ code: 'EINVAL' });
  });

  it('writable: the file length, unchanged', async () => {
    const image = new RawImage(MemoryBlockDevice.from(text));
    expect(image.size).toBe(25);
    await expect(image.read(20, 10)).rejects.toMatchObject({ code: 'EINVAL' });
  });
});
