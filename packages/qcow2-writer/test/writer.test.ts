import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { decodeHeader, headerFlags } from '@qcowkit/qcow2-core';
import { planConversion as planConversionPure } from '@qcowkit/qcow2-writer';
import {
  type ConvertOptions,
  convertToQcow2,
  createCompressorPool,
  createEmptyImage,
  measure,
  planConversion,
  planEmptyImage,
} from '@qcowkit/qcow2-writer/node';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { expectSameBytes, memorySink, memorySource, openChecked } from './helpers.js';

const pool = createCompressorPool(2);
afterAll(() => pool.close());

const OPTION_SETS: Record<string, ConvertOptions> = {
  default: {},
  'compat 0.10': { version: 2 },
  '512 B clusters, 1-bit refcounts': { clusterSize: 512, refcountBits: 1 },
  '4 KiB clusters, 64-bit refcounts': { clusterSize: 4096, refcountBits: 64 },
  '2 MiB clusters': { clusterSize: 2 * 1024 * 1024 },
  'extended L2': { extendedL2: true, clusterSize: 32768 },
  'lazy refcounts': { lazyRefcounts: true },
  'preallocation metadata': { preallocation: 'metadata', clusterSize: 4096 },
  compressed: { compress: true, compressor: pool },
  'compressed, 512 B clusters, 2-bit refcounts': {
    compress: true,
    compressor: pool,
    clusterSize: 512,
    refcountBits: 2,
  },
  'compressed, extended L2': { compress: true, compressor: pool, extendedL2: true },
  'compressed zstd': { compress: true, compressor: pool, compressionType: 'zstd' },
  'compressed zstd, 4 KiB clusters, 8-bit refcounts': {
    compress: true,
    compressor: pool,
    compressionType: 'zstd',
    clusterSize: 4096,
    refcountBits: 8,
  },
  'compressed by a plain ClusterCompressor (no compressBatch)': {
    compress: true,
    compressor: {
      compressClusters: (data, clusterSize, type) => pool.compressClusters(data, clusterSize, type),
    },
    chunkBytes: 3 * 65536,
  },
  'compressed, nothing cached (temporary-file spool)': { compress: true, compressor: pool, cacheBytes: 0 },
  'uncompressed, nothing cached (read twice)': { cacheBytes: 0, chunkBytes: 65536 },
  'no zero detection (zero clusters kept, written as zeros)': { detectZeroes: false },
};

describe('empty images', () => {
  for (const [name, options] of Object.entries(OPTION_SETS)) {
    if (options.compress) continue;
    it(`${name}: opens clean, reads zeros, has the planned length`, async () => {
      const size = 5 * 1024 * 1024 + 512;
      const out = memorySink();
      const written = await createEmptyImage(out.sink, { ...options, size });
      const bytes = out.bytes();
      expect(bytes.length).toBe(written);
      expect(written).toBe(planEmptyImage({ ...options, size }).fileSize);
      const header = decodeHeader(bytes.subarray(0, 65536));
      expect(header.size).toBe(size);
      expect(header.version).toBe(options.version ?? 3);
      expect(headerFlags(header).lazyRefcounts).toBe(options.lazyRefcounts ?? false);
      const image = await openChecked(bytes);
      expectSameBytes(await image.read(size - 4096, 4096), new Uint8Array(4096));
      await image.close();
    });
  }

  it('records the backing file, its format and the data file name', async () => {
    const out = memorySink();
    await createEmptyImage(out.sink, { size: 1 << 30, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
    const header = decodeHeader(out.bytes().subarray(0, 65536));
    expect(header.backingFileName).toBe('base.qcow2');
    expect(header.extensions.backingFormat).toBe('qcow2');
    const data = memorySink();
    await createEmptyImage(data.sink, { size: 1 << 30, dataFile: 'disk.raw', dataFileRaw: true });
    const dataHeader = decodeHeader(data.bytes().subarray(0, 65536));
    expect(dataHeader.extensions.dataFileName).toBe('disk.raw');
    expect(headerFlags(dataHeader)).toMatchObject({ dataFile: true, dataFileRaw: true });
  });

  it('refuses options QEMU refuses', async () => {
    const bad: Partial<ConvertOptions>[] = [
      { clusterSize: 1000 },
      { clusterSize: 256 },
      { refcountBits: 3 },
      { version: 2, lazyRefcounts: true },
      { version: 2, refcountBits: 8 },
      { extendedL2: true, clusterSize: 4096 },
      { size: 2 ** 40, clusterSize: 512 }, // L1 above 32 MiB
    ];
    for (const options of bad) {
      await expect(createEmptyImage(() => {}, { size: 1 << 20, ...options })).rejects.toMatchObject({
        code: 'EINVAL',
      });
    }
  });
});

/** A source with random data, runs of zeros written as data, text, and holes. */
const sourceArbitrary = fc
  .record({
    size: fc.integer({ min: 1, max: 3 * 1024 * 1024 }).map((n) => Math.ceil(n / 512) * 512),
    writes: fc.array(
      fc.record({
        offset: fc.integer({ min: 0, max: 3 * 1024 * 1024 }),
        length: fc.integer({ min: 1, max: 200_000 }),
        fill: fc.oneof(fc.constant(-2), fc.constant(-1), fc.constant(0), fc.integer({ min: 1, max: 255 })),
      }),
      { maxLength: 8 },
    ),
  })
  .map(({ size, writes }) => ({
    size,
    writes: writes
      .filter((write) => write.offset < size)
      .map(({ offset, length, fill }) => {
        const data = new Uint8Array(Math.min(length, size - offset));
        if (fill === -2) {
          // Incompressible: stored plain even when compressing (xorshift32).
          let state = (offset | 1) >>> 0;
          for (let index = 0; index < data.length; index++) {
            state ^= state << 13;
            state ^= state >>> 17;
            state ^= state << 5;
            data[index] = state & 0xff;
          }
        } else if (fill === -1)
          for (let index = 0; index < data.length; index++) data[index] = (index * 7919 + offset) % 251;
        else data.fill(fill);
        return { offset, data };
      }),
  }));

describe('conversion reads back as the source', () => {
  for (const [name, options] of Object.entries(OPTION_SETS)) {
    it(name, async () => {
      await fc.assert(
        fc.asyncProperty(sourceArbitrary, async ({ size, writes }) => {
          const source = await memorySource(size, writes);
          const plan = await planConversion(source, options);
          const out = memorySink();
          const written = await plan.write(out.sink);
          const bytes = out.bytes();
          expect(bytes.length).toBe(written);
          expect(written).toBe(plan.fileSize);
          const image = await openChecked(bytes);
          expect(image.size).toBe(size);
          expectSameBytes(await image.read(0, size), await source.read(0, size));
          await image.close();
        }),
        { numRuns: options.compress ? 6 : 12 },
      );
    });
  }
});

it('without a spool, compresses again what the cache did not hold', async () => {
  const size = 2 * 1024 * 1024;
  const source = await memorySource(size, [
    { offset: 0, data: new Uint8Array(size).map((_, i) => (i * 31) % 7) },
  ]);
  const plan = await planConversionPure(source, { compress: true, compressor: pool, cacheBytes: 1000 });
  const out = memorySink();
  await plan.write(out.sink);
  const image = await openChecked(out.bytes());
  expectSameBytes(await image.read(0, size), await source.read(0, size));
  await image.close();
});

describe('to a file path (read once, metadata finished at the end)', () => {
  for (const [name, options] of Object.entries(OPTION_SETS)) {
    if (options.preallocation !== undefined || options.detectZeroes === false) continue;
    it(name, async () => {
      const folder = mkdtempSync(join(tmpdir(), 'qcowkit-writer-unit-'));
      try {
        await fc.assert(
          fc.asyncProperty(sourceArbitrary, async ({ size, writes }) => {
            const source = await memorySource(size, writes);
            const path = join(folder, 'out.qcow2');
            const written = await convertToQcow2(source, path, options);
            const bytes = new Uint8Array(readFileSync(path));
            expect(bytes.length).toBe(written);
            const image = await openChecked(bytes);
            expectSameBytes(await image.read(0, size), await source.read(0, size));
            await image.close();
          }),
          { numRuns: 8 },
        );
      } finally {
        rmSync(folder, { recursive: true, force: true });
      }
    });
  }
});

describe('over a backing file', () => {
  for (const version of [2, 3] as const) {
    it(`v${version}: stores only clusters that differ, zeros included`, async () => {
      const clusterSize = 65536;
      const size = 16 * clusterSize;
      const backing = await memorySource(size, [
        { offset: 0, data: new Uint8Array(8 * clusterSize).fill(7) },
      ]);
      const source = await memorySource(size, [{ offset: 0, data: new Uint8Array(8 * clusterSize).fill(7) }]);
      await source.write(2 * clusterSize + 100, new Uint8Array([1, 2, 3])); // differs: stored
      await source.writeZeroes(4 * clusterSize, clusterSize); // zero over data: zero entry (v3)
      await source.write(12 * clusterSize, new Uint8Array(10).fill(9)); // past the backing's data
      const plan = await planConversion(source, {
        version,
        backing,
        backingFile: 'base.qcow2',
        backingFormat: 'raw',
      });
      expect(plan.layout.map.dataClusters).toBe(version === 3 ? 2 : 3);
      const out = memorySink();
      await plan.write(out.sink);
      const image = await openChecked(out.bytes(), backing);
      expectSameBytes(await image.read(0, size), await source.read(0, size));
      await image.close();
    });
  }
});

describe('sinks and sources', () => {
  it('writes to a web WritableStream and reads a raw stream of known size', async () => {
    const size = 1024 * 1024 + 512;
    const source = await memorySource(size, [{ offset: 1000, data: new Uint8Array(300_000).fill(5) }]);
    const content = await source.read(0, size);
    async function* chunks() {
      for (let at = 0; at < size; at += 77_777) yield content.subarray(at, Math.min(size, at + 77_777));
    }
    const collected: Uint8Array[] = [];
    const stream = new WritableStream<Uint8Array>({
      write(chunk) {
        collected.push(chunk.slice());
      },
    });
    const written = await convertToQcow2({ size, stream: chunks() }, stream);
    const bytes = new Uint8Array(written);
    let at = 0;
    for (const chunk of collected) {
      bytes.set(chunk, at);
      at += chunk.length;
    }
    expect(at).toBe(written);
    const image = await openChecked(bytes);
    expectSameBytes(await image.read(0, size), content);
    await image.close();
  });

  it('writes to a Node Writable with backpressure (small highWaterMark)', async () => {
    const size = 2 * 1024 * 1024;
    const source = await memorySource(size, [{ offset: 4096, data: new Uint8Array(1024 * 1024).fill(9) }]);
    const chunks: Buffer[] = [];
    const writable = new Writable({
      highWaterMark: 1024,
      write(chunk: Buffer, _encoding, callback) {
        chunks.push(Buffer.from(chunk));
        setImmediate(callback);
      },
    });
    const written = await convertToQcow2(source, writable);
    const bytes = Buffer.concat(chunks);
    expect(bytes.length).toBe(written);
    const image = await openChecked(new Uint8Array(bytes));
    expectSameBytes(await image.read(0, size), await source.read(0, size));
    await image.close();
  });

  it('stops with the abort reason when the signal is aborted', async () => {
    const source = await memorySource(1 << 20, [{ offset: 0, data: new Uint8Array(100).fill(1) }]);
    const controller = new AbortController();
    controller.abort(new Error('stop here'));
    await expect(convertToQcow2(source, () => {}, { signal: controller.signal })).rejects.toThrow(
      'stop here',
    );
  });

  it('fails with EIO when a raw stream ends early', async () => {
    async function* short() {
      yield new Uint8Array(1000);
    }
    await expect(convertToQcow2({ size: 1 << 20, stream: short() }, () => {})).rejects.toMatchObject({
      code: 'EIO',
    });
  });

  it('compresses zstd clusters QEMU can read: one frame each, incompressible ones stored plain', async () => {
    const clusterSize = 65536;
    const random = new Uint8Array(clusterSize);
    for (let index = 0; index < clusterSize; index++) random[index] = (index * 2654435761) >>> 24;
    const source = await memorySource(4 * clusterSize, [
      { offset: 0, data: new Uint8Array(clusterSize).fill(3) },
      { offset: 2 * clusterSize, data: random },
    ]);
    const out = memorySink();
    await convertToQcow2(source, out.sink, { compress: true, compressor: pool, compressionType: 'zstd' });
    const bytes = out.bytes();
    const header = decodeHeader(bytes);
    expect(header.compressionType).toBe(1);
    const image = await openChecked(bytes);
    expectSameBytes(await image.read(0, 4 * clusterSize), await source.read(0, 4 * clusterSize));
    await image.close();
    // zstd frame magic 0xfd2fb528 somewhere after the metadata.
    const frames = Buffer.from(bytes).indexOf(Buffer.from([0x28, 0xb5, 0x2f, 0xfd]));
    expect(frames).toBeGreaterThan(0);
  });

  it('a sparse 1 TiB source with little data makes a small image', async () => {
    const size = 2 ** 40;
    const source = new MemoryBlockDevice(size);
    await source.write(size / 2, new Uint8Array(4096).fill(1));
    const plan = await planConversion(source);
    expect(plan.layout.map.dataClusters).toBe(1);
    expect(plan.fileSize).toBeLessThan(1024 * 1024);
  });
});

describe('measure', () => {
  it('matches qemu-img measure figures for a size', async () => {
    // qemu-img measure -O qcow2 --size 1G; and -o cluster_size=512,refcount_bits=1 --size 1000
    expect(await measure(1 << 30)).toEqual({ required: 393216, fullyAllocated: 1074135040 });
    expect(await measure(1000, { clusterSize: 512, refcountBits: 1 })).toEqual({
      required: 2560,
      fullyAllocated: 3584,
    });
  });

  it('counts the clusters a source holds data in', async () => {
    const source = await memorySource(10 * 1024 * 1024, [
      { offset: 70_000, data: new Uint8Array(3).fill(1) },
    ]);
    const result = await measure(source);
    const empty = await measure(10 * 1024 * 1024);
    expect(result.fullyAllocated).toBe(empty.fullyAllocated);
    expect(result.required - empty.required).toBe(65536);
  });
});
