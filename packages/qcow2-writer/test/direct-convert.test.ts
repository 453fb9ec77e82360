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
