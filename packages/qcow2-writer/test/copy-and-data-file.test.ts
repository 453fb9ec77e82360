import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type BlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { pureCodecs, Qcow2Image } from '@qcowkit/qcow2-core';
import {
  type ConvertOptions,
  convertToQcow2,
  copyInto,
  createCompressorPool,
  planConversion,
  type RandomAccessSink,
} from '@qcowkit/qcow2-writer/node';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { expectSameBytes, memorySink, memorySource } from './helpers.js';

const pool = createCompressorPool(2);
afterAll(() => pool.close());

const writesArbitrary = (size: number) =>
  fc.array(
    fc.record({
      offset: fc.integer({ min: 0, max: size - 1 }),
      length: fc.integer({ min: 1, max: 200_000 }),
      fill: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 255 })),
    }),
    { maxLength: 8 },
  );

async function deviceWith(size: number, writes: { offset: number; length: number; fill: number }[]) {
  const device = new MemoryBlockDevice(size);
  for (const { offset, length, fill } of writes) {
    if (offset >= size) continue;
    const end = Math.min(size, offset + length);
    if (fill === 0) await device.writeZeroes(offset, end - offset);
    else await device.write(offset, new Uint8Array(end - offset).fill(fill));
  }
  return device;
}

/** Counts the writes reaching `device`. */
function counting(device: BlockDevice): { device: BlockDevice; writes: () => number } {
  let writes = 0;
  const wrapped = new Proxy(device, {
    get(target, property) {
      if (property === 'write' || property === 'writeZeroes') writes++;
      const value = Reflect.get(target, property, target) as unknown;
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  return { device: wrapped, writes: () => writes };
}

describe('copyInto (convert -n)', () => {
  it('leaves the target equal to the source over its size, the rest untouched', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 3 * 1024 * 1024 }),
        fc.integer({ min: 0, max: 300_000 }),
        writesArbitrary(3 * 1024 * 1024),
        writesArbitrary(3 * 1024 * 1024),
        async (size, extra, sourceWrites, targetWrites) => {
          const source = await deviceWith(size, sourceWrites);
          const target = await deviceWith(size + extra, targetWrites);
          const before = await target.read(size, extra);
          await copyInto(source, target, { chunkBytes: 256 * 1024, readDepth: 3 });
          expectSameBytes(await target.read(0, size), await source.read(0, size));
          expectSameBytes(await target.read(size, extra), before);
        },
      ),
      { numRuns: 40 },
    );
  });

  it('writes nothing where both sides read zeros', async () => {
    const size = 4 * 1024 * 1024;
    const source = await deviceWith(size, [{ offset: 1024 * 1024, length: 65536, fill: 9 }]);
    const target = counting(new MemoryBlockDevice(size));
    await copyInto(source, target.device);
    expect(target.writes()).toBe(1);
    const again = counting(new MemoryBlockDevice(size));
    await again.device.write(3 * 1024 * 1024, new Uint8Array(10).fill(1));
    await copyInto(new MemoryBlockDevice(size), again.device);
    expect(again.writes()).toBe(2); // one write above, one zeroing of the target's data
    expect((await again.device.read(3 * 1024 * 1024, 10)).every((byte) => byte === 0)).toBe(true);
  });

  it('with detectZeroes: false writes data ranges whole, zero blocks in them included (convert -C)', async () => {
    const size = 1024 * 1024;
    const source = new MemoryBlockDevice(size, { chunkSize: 256 * 1024 });
    const data = new Uint8Array(256 * 1024).fill(3);
    data.fill(0, 64 * 1024, 192 * 1024); // zeros stored as data
    await source.write(256 * 1024, data);
    const whole = counting(new MemoryBlockDevice(size, { chunkSize: 4096 }));
    await copyInto(source, whole.device, { detectZeroes: false });
    expectSameBytes(await whole.device.read(0, size), await source.read(0, size));
    expect(whole.writes()).toBe(1);
    const scanned = counting(new MemoryBlockDevice(size, { chunkSize: 4096 }));
    await copyInto(source, scanned.device);
    expect(scanned.writes()).toBe(2); // the data around the zeros, which are skipped
  });

  it('refuses a smaller or read-only target', async () => {
    await expect(copyInto(new MemoryBlockDevice(2048), new MemoryBlockDevice(1024))).rejects.toMatchObject({
      code: 'EINVAL',
    });
    const readOnly = new MemoryBlockDevice(2048, { readOnly: true });
    await expect(copyInto(new MemoryBlockDevice(1024), readOnly)).rejects.toMatchObject({ code: 'EROFS' });
  });

  it('hands whole aligned blocks to writeCompressed, partial ones to write', async () => {
    const blockBytes = 65536;
    const source = await deviceWith(4 * blockBytes, [{ offset: 1000, length: 2 * blockBytes, fill: 5 }]);
    const target = new MemoryBlockDevice(4 * blockBytes);
    const compressed: number[] = [];
    await copyInto(source, target, {
      blockBytes,
      writeCompressed: async (offset, data) => {
        expect(offset % blockBytes).toBe(0);
        expect(data.length).toBe(blockBytes);
        compressed.push(offset);
        await target.write(offset, data);
      },
    });
    expect(compressed).toContain(blockBytes);
    expect(compressed).not.toContain(3 * blockBytes);
    expectSameBytes(await target.read(0, 4 * blockBytes), await source.read(0, 4 * blockBytes));
  });
});

/** A memory RandomAccessSink (the data file). */
function memoryDataSink(): RandomAccessSink & { device: MemoryBlockDevice; length: number } {
  const state = { device: new MemoryBlockDevice(0), length: -1 };
  const grow = async (end: number) => {
    if (end > state.device.size) await state.device.resize(end);
  };
  return {
    get device() {
      return state.device;
    },
    get length() {
      return state.length;
    },
    async writeAt(offset, bytes) {
      await grow(offset + bytes.length);
      await state.device.write(offset, bytes.slice());
    },
    async close(length) {
      await grow(length);
      state.length = length;
    },
    async abort() {},
  };
}

describe('external data files', () => {
  const cases: Record<string, ConvertOptions> = {
    data_file: { dataFile: 'disk.data' },
    'data_file, 4 KiB clusters': { dataFile: 'disk.data', clusterSize: 4096 },
    'data_file_raw=on (every cluster mapped)': { dataFile: 'disk.data', dataFileRaw: true },
    'data_file, no zero detection': { dataFile: 'disk.data', detectZeroes: false },
  };
  for (const [name, options] of Object.entries(cases)) {
    it(name, async () => {
      await fc.assert(
        fc.asyncProperty(
          fc.integer({ min: 1, max: 2 * 1024 * 1024 }),
          writesArbitrary(2 * 1024 * 1024),
          async (size, writes) => {
            const source = await memorySource(
              size,
              writes
                .filter(({ offset }) => offset < size)
                .map(({ offset, length, fill }) => ({ offset, data: new Uint8Array(length).fill(fill) })),
            );
            const data = memoryDataSink();
            const plan = await planConversion(source, { ...options, dataSink: data });
            const out = memorySink();
            await plan.write(out.sink);
            const image = await Qcow2Image.open(MemoryBlockDevice.from(out.bytes()), {
              codecs: pureCodecs,
              resolveDataFile: async (fileName) => {
                expect(fileName).toBe('disk.data');
                return data.device;
              },
            });
            const check = await image.check();
            expect({ corruptions: check.corruptions, leaks: check.leaks }).toEqual({
              corruptions: 0,
              leaks: 0,
            });
            expectSameBytes(
              await image.read(0, image.size),
              await source.read(0, size).then((b) => padTo(b, image.size)),
            );
            const clusterSize = options.clusterSize ?? 65536;
            if (options.dataFileRaw) {
              // The data file alone reads as the guest.
              expect(data.length).toBe(Math.ceil(image.size / clusterSize) * clusterSize);
              expectSameBytes(await data.device.read(0, size), await source.read(0, size));
            } else {
              expect(data.length).toBeGreaterThanOrEqual(image.size);
            }
            await image.close();
          },
        ),
        { numRuns: 8 },
      );
    });
  }

  it('to a file path, the data file goes where dataFilePath says', async () => {
    const folder = mkdtempSync(join(tmpdir(), 'qcowkit-writer-datafile-'));
    try {
      const source = await memorySource(300_000, [{ offset: 70_000, data: new Uint8Array(100_000).fill(3) }]);
      await convertToQcow2(source, join(folder, 'disk.qcow2'), {
        dataFile: 'disk.data',
        dataFilePath: join(folder, 'disk.data'),
      });
      const bytes = new Uint8Array(readFileSync(join(folder, 'disk.data')));
      expectSameBytes(bytes.subarray(0, 300_000), await source.read(0, 300_000));
    } finally {
      rmSync(folder, { recursive: true, force: true });
    }
  });

  it('refuses compression with a data file', async () => {
    const source = await memorySource(65536, [{ offset: 0, data: new Uint8Array(10).fill(1) }]);
    await expect(
      planConversion(source, { dataFile: 'x', compress: true, compressor: pool, dataSink: memoryDataSink() }),
    ).rejects.toMatchObject({ code: 'EINVAL' });
  });
});

function padTo(bytes: Uint8Array, length: number): Uint8Array {
  if (bytes.length === length) return bytes;
  const out = new Uint8Array(length);
  out.set(bytes);
  return out;
}
