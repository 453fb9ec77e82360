import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockDeviceError } from '@qcowkit/blockdev';
import {
  convertDirect,
  convertDirectCompressed,
  type RandomAccessSink,
  resolveGeometry,
} from '@qcowkit/qcow2-writer';
import { createCompressorPool } from '@qcowkit/qcow2-writer/node';
import { describe, expect, it } from 'vitest';
import { readChunks } from '../src/direct-convert.js';
import { openRandomAccessFile } from '../src/node/random-access-file.js';
import { expectSameBytes, memorySource, openChecked } from './helpers.js';

/**
 * A sink whose writes land late and in scrambled order, copying `bytes` only when they land: if the
 * pipeline refilled a buffer before its writes resolved, the image would hold the wrong data.
 */
function lateSink(): { sink: RandomAccessSink; bytes(): Uint8Array; maxInFlight(): number } {
  const pieces: { at: number; bytes: Uint8Array }[] = [];
  let length = 0;
  let inFlight = 0;
  let maxInFlight = 0;
  let turn = 0;
  const sink: RandomAccessSink = {
    writeAt(hostOffset, bytes) {
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      // 0-3 macrotask hops, varying per call: later writes often land first.
      const hops = (turn++ * 7) % 4;
      return new Promise((resolve) => {
        const land = (left: number) => {
          if (left > 0) {
            setImmediate(() => land(left - 1));
            return;
          }
          pieces.push({ at: hostOffset, bytes: bytes.slice() });
          inFlight--;
          resolve();
        };
        land(hops);
      });
    },
    async close(fileLength) {
      length = fileLength;
    },
    async abort() {},
  };
  return {
    sink,
    bytes() {
      const out = new Uint8Array(length);
      for (const piece of pieces) out.set(piece.bytes.subarray(0, Math.max(0, length - piece.at)), piece.at);
      return out;
    },
    maxInFlight: () => maxInFlight,
  };
}

/** 3 MiB guest: data runs of varying lengths, an all-zero run inside an allocated range, a tail. */
function pattern(size: number): { offset: number; data: Uint8Array }[] {
  const writes: { offset: number; data: Uint8Array }[] = [];
  for (let index = 0; index < 24; index++) {
    const length = (1 + (index % 5)) * 16384;
    const data = new Uint8Array(length);
    for (let at = 0; at < length; at++) data[at] = (index * 31 + at * 7 + 1) & 0xff || 1;
    if (index % 6 === 3) data.fill(0); // allocated in the source, but zero: dropped
    writes.push({ offset: (index * 131072 + (index % 3) * 4096) % (size - length), data });
  }
  return writes;
}

describe('readChunks: candidates gathered into reads', () => {
  const ranges = (list: [number, number][]) => list.map(([cluster, count]) => ({ cluster, count }));

  it('takes in the holes between candidates up to the chunk size, never across an L2 table', () => {
    const reads = [
      ...readChunks(
        ranges([
          [0, 16],
          [32, 16],
          [64, 16],
          [96, 16],
        ]),
        8192,
        64,
      ),
    ];
    expect(reads).toEqual([
      {
        cluster: 0,
        count: 48,
        pieces: ranges([
          [0, 16],
          [32, 16],
        ]),
      },
      {
        cluster: 64,
        count: 48,
        pieces: ranges([
          [64, 16],
          [96, 16],
        ]),
      },
    ]);
    // Tables of 40 entries: the candidate across cluster 40 is cut there, its second half read apart.
    const byTable = [
      ...readChunks(
        ranges([
          [0, 8],
          [32, 16],
        ]),
        40,
        64,
      ),
    ];
    expect(byTable).toEqual([
      {
        cluster: 0,
        count: 40,
        pieces: ranges([
          [0, 8],
          [32, 8],
        ]),
      },
      { cluster: 40, count: 8, pieces: ranges([[40, 8]]) },
    ]);
    // A candidate longer than a read is cut into whole reads.
    expect(
      [...readChunks(ranges([[0, 100]]), 8192, 64)].map(({ cluster, count }) => [cluster, count]),
    ).toEqual([
      [0, 64],
      [64, 36],
    ]);
  });

  it('a sparse source (holes between data runs, zero clusters inside them) converts to the same guest', async () => {
    const size = 4 * 1024 * 1024;
    const writes: { offset: number; data: Uint8Array }[] = [];
    for (let offset = 0; offset < size; offset += 192 * 1024) {
      const data = new Uint8Array(64 * 1024);
      // Data, then a zero 4 KiB cluster, then data: only the data clusters may be allocated.
      data.fill((offset / 65536) & 0xff || 1, 0, 8192);
      data.fill(0x5a, 12288);
      writes.push({ offset, data });
    }
    const source = await memorySource(size, writes);
    const late = lateSink();
    const geometry = resolveGeometry({ clusterSize: 4096 }, size);
    await convertDirect(source, geometry, late.sink, {
      readDepth: 2,
      chunkBytes: 256 * 1024,
      signal: undefined,
    });
    const image = await openChecked(late.bytes());
    expectSameBytes(await image.read(0, size), await source.read(0, size));
    // 15 data clusters per 64 KiB run (the zero one is left out), nothing from the holes.
    const allocated = (await image.blockStatus(0, size)).filter((extent) => extent.data && !extent.zero);
    expect(allocated.reduce((sum, extent) => sum + extent.length, 0)).toBe(writes.length * 15 * 4096);
    await image.close();
  });
});

describe('convertDirect pipeline', () => {
  it('keeps each buffer until its writes land, with writes overlapping', async () => {
    const size = 3 * 1024 * 1024;
    const source = await memorySource(size, pattern(size));
    const late = lateSink();
    const geometry = resolveGeometry({ clusterSize: 4096 }, size);
    await convertDirect(source, geometry, late.sink, {
      readDepth: 3,
      chunkBytes: 64 * 1024,
      signal: undefined,
    });
    expect(late.maxInFlight()).toBeGreaterThan(1);
    const image = await openChecked(late.bytes());
    expectSameBytes(await image.read(0, size), await source.read(0, size));
    await image.close();
  });

  it('rejects with the sink error and aborts the sink when a write fails', async () => {
    const size = 1024 * 1024;
    const source = await memorySource(size, pattern(size));
    let aborted = false;
    let writes = 0;
    const sink: RandomAccessSink = {
      async writeAt() {
        if (++writes === 4) throw new BlockDeviceError('ENOSPC', 'write: no space left');
      },
      async close() {},
      async abort() {
        aborted = true;
      },
    };
    const geometry = resolveGeometry({ clusterSize: 4096 }, size);
    await expect(
      convertDirect(source, geometry, sink, { readDepth: 2, chunkBytes: 16384, signal: undefined }),
    ).rejects.toMatchObject({ code: 'ENOSPC' });
    expect(aborted).toBe(true);
  });
});

describe('into a file written inline (as on tmpfs) or on the thread pool', () => {
  for (const inline of [true, false]) {
    it(`inline ${inline}: plain and compressed images read back as the source`, async () => {
      const folder = mkdtempSync(join(tmpdir(), 'qcowkit-writer-inline-'));
      const pool = createCompressorPool(1);
      try {
        const size = 3 * 1024 * 1024;
        const source = await memorySource(size, pattern(size));
        const geometry = resolveGeometry({ clusterSize: 4096 }, size);
        const plainPath = join(folder, 'plain.qcow2');
        const plainLength = await convertDirect(
          source,
          geometry,
          await openRandomAccessFile(plainPath, { inline }),
          {
            readDepth: 3,
            chunkBytes: 64 * 1024,
            signal: undefined,
          },
        );
        const compressedPath = join(folder, 'compressed.qcow2');
        await convertDirectCompressed(
          source,
          geometry,
          await openRandomAccessFile(compressedPath, { inline }),
          {
            compressor: pool,
            depth: 3,
            chunkBytes: 64 * 1024,
            signal: undefined,
          },
        );
        for (const path of [plainPath, compressedPath]) {
          const bytes = new Uint8Array(readFileSync(path));
          if (path === plainPath) expect(bytes.length).toBe(plainLength);
          const image = await openChecked(bytes);
          expectSameBytes(await image.read(0, size), await source.read(0, size));
          await image.close();
        }
      } finally {
        await pool.close();
        rmSync(folder, { recursive: true, force: true });
      }
    });
  }
});
