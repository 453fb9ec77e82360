import { type BlockDevice, type Extent, MemoryBlockDevice } from '@qcowkit/blockdev';
import fc from 'fast-check';
import { describe, expect, test } from 'vitest';
import { walkExtents } from '../src/extents.js';
import { type MapLayer, qemuMapView } from '../src/qemu-map-view.js';

async function collect(device: BlockDevice, start: number, end: number): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const extent of walkExtents(device, start, end)) out.push(extent);
  return out;
}

/** Counts blockStatus calls and the lengths asked. */
function counting(device: BlockDevice): { device: BlockDevice; asked: number[] } {
  const asked: number[] = [];
  const wrapped = Object.create(device) as BlockDevice;
  Object.defineProperty(wrapped, 'blockStatus', {
    value: (offset: number, length: number) => {
      asked.push(length);
      return device.blockStatus(offset, length);
    },
  });
  return { device: wrapped, asked };
}

describe('walkExtents', () => {
  test('covers [start, end) exactly, in order, whatever was written', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.integer({ min: 0, max: 1_000_000 }), fc.integer({ min: 1, max: 50_000 })), {
          maxLength: 8,
        }),
        fc.integer({ min: 0, max: 1_048_576 }),
        fc.integer({ min: 0, max: 1_048_576 }),
        async (writes, a, b) => {
          const device = new MemoryBlockDevice(1_048_576);
          for (const [offset, length] of writes) {
            await device.write(offset, new Uint8Array(Math.min(length, 1_048_576 - offset)).fill(7));
          }
          const [start, end] = a <= b ? [a, b] : [b, a];
          const extents = await collect(device, start, end);
          let position = start;
          for (const extent of extents) {
            expect(extent.offset).toBe(position);
            position += extent.length;
          }
          expect(position).toBe(end);
          await device.close();
        },
      ),
      { numRuns: 50 },
    );
  });

  test('a sparse 8 TiB device takes a few dozen lookups, not one per 64 MiB', async () => {
    const size = 8 * 2 ** 40;
    const memory = new MemoryBlockDevice(size);
    await memory.write(0, new Uint8Array(4096).fill(1));
    await memory.write(size - 4096, new Uint8Array(4096).fill(2));
    const { device, asked } = counting(memory);
    const extents = await collect(device, 0, size);
    expect(extents.filter((extent) => !extent.zero).length).toBeGreaterThanOrEqual(2);
    expect(asked.length).toBeLessThan(64);
    await memory.close();
  });

  test('a device answering nothing is an error, not a hang', async () => {
    const memory = new MemoryBlockDevice(65536);
    const broken = Object.create(memory) as BlockDevice;
    Object.defineProperty(broken, 'blockStatus', { value: async () => [] });
    await expect(collect(broken, 0, 65536)).rejects.toThrow(/no extent/);
  });
});

describe('qemuMapView', () => {
  const hole = (offset: number, length: number, depth: number): Extent => ({
    offset,
    length,
    depth,
    present: false,
    zero: true,
    data: false,
  });

  test('holes of a raw layer are present, at the guest offset', () => {
    const layers: MapLayer[] = [
      { format: 'qcow2', size: 4096 * 4 },
      { format: 'raw', size: 4096 * 4 },
    ];
    expect(qemuMapView(hole(4096, 8192, 1), layers)).toEqual([
      { offset: 4096, length: 8192, depth: 1, present: true, zero: true, data: false, hostOffset: 4096 },
    ]);
  });

  test('past the end of a shorter backing file the layer above answers', () => {
    const layers: MapLayer[] = [
      { format: 'qcow2', size: 4 * 65536 },
      { format: 'raw', size: 65536 },
    ];
    expect(qemuMapView(hole(0, 4 * 65536, 1), layers)).toEqual([
      { offset: 0, length: 65536, depth: 1, present: true, zero: true, data: false, hostOffset: 0 },
      { offset: 65536, length: 3 * 65536, depth: 0, present: false, zero: true, data: false },
    ]);
  });

  test('compressed flags are dropped and present extents pass through', () => {
    const extent: Extent = {
      offset: 0,
      length: 512,
      depth: 0,
      present: true,
      zero: false,
      data: true,
      compressed: true,
    };
    expect(qemuMapView(extent, [{ format: 'qcow2', size: 512 }])).toEqual([
      { offset: 0, length: 512, depth: 0, present: true, zero: false, data: true },
    ]);
  });
});
