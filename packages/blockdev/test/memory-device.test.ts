import { blockStatusAll, isBlockDeviceError, MemoryBlockDevice } from '@qcowkit/blockdev';
import { describe, expect, it } from 'vitest';

const PiB = 2 ** 50;
const KiB64 = 64 * 1024;

describe('MemoryBlockDevice', () => {
  it('keeps a 1 PiB device sparse: one byte at the end costs one chunk', async () => {
    const device = new MemoryBlockDevice(PiB);
    expect(device.allocatedBytes).toBe(0);
    await device.write(PiB - 1, new Uint8Array([0x42]));
    expect(device.allocatedBytes).toBe(KiB64);
    expect(await device.read(PiB - 2, 2)).toEqual(new Uint8Array([0, 0x42]));
    expect(await blockStatusAll(device, 0, PiB)).toEqual([
      { offset: 0, length: PiB - KiB64, zero: true, data: false, present: false, depth: 0 },
      { offset: PiB - KiB64, length: KiB64, zero: false, data: true, present: true, depth: 0 },
    ]);
    await device.close();
  });

  it('does not allocate for zeros and frees chunks that become zero', async () => {
    const device = new MemoryBlockDevice(4 * KiB64);
    await device.write(100, new Uint8Array(3 * KiB64));
    expect(device.allocatedBytes).toBe(0);
    await device.write(KiB64 - 1, new Uint8Array([1, 2]));
    expect(device.allocatedBytes).toBe(2 * KiB64);
    await device.write(KiB64, new Uint8Array(1));
    expect(device.allocatedBytes).toBe(KiB64);
    await device.writeZeroes(0, KiB64, { mayUnmap: true });
    expect(device.allocatedBytes).toBe(0);
    await device.write(2 * KiB64, new Uint8Array(KiB64).fill(7));
    await device.discard(2 * KiB64 + 10, KiB64 - 10);
    expect(device.allocatedBytes).toBe(KiB64);
    await device.discard(2 * KiB64, 10);
    expect(device.allocatedBytes).toBe(0);
  });

  it('reports holes and data chunks clipped to the range asked', async () => {
    const device = new MemoryBlockDevice(4 * KiB64);
    await device.write(KiB64 + 5, new Uint8Array([9]));
    expect(await device.blockStatus(10, KiB64)).toEqual([
      { offset: 10, length: KiB64 - 10, zero: true, data: false, present: false, depth: 0 },
      { offset: KiB64, length: 10, zero: false, data: true, present: true, depth: 0 },
    ]);
  });

  it('shrinks, dropping data past the end, and grows back with zeros', async () => {
    const device = MemoryBlockDevice.from(new Uint8Array(3 * KiB64).fill(0xff));
    await device.resize(KiB64 + 3);
    expect(device.allocatedBytes).toBe(2 * KiB64);
    await device.resize(3 * KiB64);
    const bytes = await device.read(0, 3 * KiB64);
    expect(bytes.subarray(0, KiB64 + 3).every((b) => b === 0xff)).toBe(true);
    expect(bytes.subarray(KiB64 + 3).every((b) => b === 0)).toBe(true);
  });

  it('copies the bytes given to from() and can be read-only', async () => {
    const source = new Uint8Array([1, 2, 3]);
    const device = MemoryBlockDevice.from(source, { readOnly: true });
    source[0] = 9;
    expect(await device.read(0, 3)).toEqual(new Uint8Array([1, 2, 3]));
    await expect(device.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: 'EROFS' });
    expect(device.capabilities.blockStatus).toBe(true);
  });

  it('refuses bad sizes and chunk sizes', () => {
    for (const make of [
      () => new MemoryBlockDevice(-1),
      () => new MemoryBlockDevice(1.5),
      () => new MemoryBlockDevice(10, { chunkSize: 1000 }),
      () => new MemoryBlockDevice(10, { chunkSize: 256 }),
    ]) {
      let caught: unknown;
      try {
        make();
      } catch (error) {
        caught = error;
      }
      expect(isBlockDeviceError(caught, 'EINVAL')).toBe(true);
    }
  });
});
