import { FaultInjectingBlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { patternBytes } from '@qcowkit/blockdev/testing';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

const bytes = (...values: number[]) => new Uint8Array(values);

describe('FaultInjectingBlockDevice', () => {
  it('fails every request after failAfter operations, with the code asked for', async () => {
    const device = new FaultInjectingBlockDevice(new MemoryBlockDevice(1024), {
      failAfter: 2,
      failWith: 'ENOSPC',
    });
    await device.write(0, bytes(1));
    await device.read(0, 1);
    await expect(device.read(0, 1)).rejects.toMatchObject({ code: 'ENOSPC' });
    await expect(device.flush()).rejects.toMatchObject({ code: 'ENOSPC' });
    expect(device.operations).toBe(4);
    expect(device.crashed).toBe(false);
  });

  it('fails only the requests failWhen picks', async () => {
    const device = new FaultInjectingBlockDevice(new MemoryBlockDevice(8192), {
      failWhen: ({ kind, offset, operation }) => (kind === 'write' && offset >= 4096) || operation === 5,
    });
    await device.write(0, bytes(1));
    await expect(device.write(4096, bytes(1))).rejects.toMatchObject({ code: 'EIO', offset: 4096 });
    await device.read(4096, 1);
    await device.writeZeroes(4096, 10);
    await expect(device.flush()).rejects.toMatchObject({ code: 'EIO' });
    await device.flush();
    expect(await device.read(0, 1)).toEqual(bytes(1));
    expect(device.operations).toBe(7);
  });

  it('loses unflushed writes at a crash and keeps flushed ones', async () => {
    const inner = new MemoryBlockDevice(1024);
    const device = new FaultInjectingBlockDevice(inner, { crashAfter: 5 });
    await device.write(0, bytes(1, 1)); // 1
    await device.writeZeroes(100, 10); // 2
    await device.flush(); // 3
    await device.write(1, bytes(2)); // 4: never flushed
    expect(await device.read(0, 2)).toEqual(bytes(1, 2)); // 5: reads see unflushed data
    expect(await inner.read(0, 2)).toEqual(bytes(1, 1));
    await expect(device.flush()).rejects.toMatchObject({ code: 'EIO' }); // 6: crashed
    expect(device.crashed).toBe(true);
    await expect(device.read(0, 1)).rejects.toMatchObject({ code: 'EIO' });
    expect(await inner.read(0, 2)).toEqual(bytes(1, 1));
    await device.close();
    expect(await inner.read(0, 1)).toEqual(bytes(1)); // the inner device stays open after a crash
  });

  it('makes fua writes durable at once and applies changes in order at flush', async () => {
    const inner = new MemoryBlockDevice(1024);
    const device = new FaultInjectingBlockDevice(inner);
    await device.write(0, bytes(1, 1, 1));
    await device.discard(1, 1);
    await device.write(2, bytes(3), { fua: true });
    expect(await inner.read(0, 3)).toEqual(bytes(1, 0, 3));
    await device.write(5, bytes(5));
    expect(device.unflushedChanges).toBe(1);
    device.crashNow();
    expect(await inner.read(5, 1)).toEqual(bytes(0));
    await expect(device.write(0, bytes(1))).rejects.toMatchObject({ code: 'EIO' });
  });

  it('reports unflushed changes as data in blockStatus', async () => {
    const device = new FaultInjectingBlockDevice(new MemoryBlockDevice(128 * 1024));
    await device.write(70_000, bytes(1));
    const extents = await device.blockStatus(65_536, 65_536);
    expect(extents).toEqual([
      { offset: 65_536, length: 65_536, zero: false, data: true, present: true, depth: 0 },
    ]);
  });

  it('leaves the inner device exactly as of the last completed flush, wherever the crash falls', async () => {
    const SIZE = 8192;
    const step = fc.oneof(
      fc.record({
        kind: fc.constant<'write'>('write'),
        offset: fc.integer({ min: 0, max: SIZE - 1 }),
        length: fc.integer({ min: 1, max: 3000 }),
        seed: fc.nat(),
        fua: fc.boolean(),
      }),
      fc.record({
        kind: fc.constantFrom<'zero' | 'discard'>('zero', 'discard'),
        offset: fc.integer({ min: 0, max: SIZE - 1 }),
        length: fc.integer({ min: 1, max: 3000 }),
      }),
      fc.constant({ kind: 'flush' as const }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(step, { maxLength: 25 }), fc.nat(30), async (steps, crashAfter) => {
        const inner = new MemoryBlockDevice(SIZE);
        const device = new FaultInjectingBlockDevice(inner, { crashAfter });
        const current = new Uint8Array(SIZE);
        let durable = current.slice();
        for (const entry of steps) {
          try {
            if (entry.kind === 'flush') {
              await device.flush();
              durable = current.slice();
              continue;
            }
            const length = Math.min(entry.length, SIZE - entry.offset);
            if (entry.kind === 'write') {
              const data = patternBytes(entry.seed, length);
              await device.write(entry.offset, data, { fua: entry.fua });
              current.set(data, entry.offset);
              if (entry.fua) durable = current.slice();
            } else {
              await (entry.kind === 'zero'
                ? device.writeZeroes(entry.offset, length)
                : device.discard(entry.offset, length));
              current.fill(0, entry.offset, entry.offset + length);
            }
          } catch (error) {
            expect(device.crashed).toBe(true);
            expect((error as { code?: string }).code).toBe('EIO');
            break;
          }
        }
        if (!device.crashed) device.crashNow();
        expect(Buffer.from(await inner.read(0, SIZE)).equals(durable)).toBe(true);
      }),
      { numRuns: 150 },
    );
  });
});
