/**
 * Conversions that take data chunks in place from the source (`viewSource`; the node entry maps
 * a raw source file on tmpfs) instead of reading them into buffers.
 */
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import {
  convertDirect,
  type RandomAccessSink,
  resolveGeometry,
  type SourceView,
} from '@qcowkit/qcow2-writer';
import { convertToQcow2 } from '@qcowkit/qcow2-writer/node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { expectSameBytes, memorySource, openChecked } from './helpers.js';

const MiB = 1024 * 1024;

/** Data every other 256 KiB, a zero run inside one of them, a hole at the end. */
function sourceBytes(size: number): Buffer {
  const bytes = Buffer.alloc(size);
  for (let at = 0; at < size - MiB; at += 512 * 1024) {
    for (let index = 0; index < 256 * 1024; index++)
      bytes[at + index] = ((at >>> 10) + index * 13) & 0xff || 1;
  }
  bytes.fill(0, 64 * 1024, 128 * 1024);
  return bytes;
}

/** A sink whose writes copy their bytes only when they land, a few turns later. */
function lateSink(): { sink: RandomAccessSink; bytes(): Uint8Array } {
  const pieces: { at: number; bytes: Uint8Array }[] = [];
  let length = 0;
  let turn = 0;
  return {
    sink: {
      writeAt(hostOffset, bytes) {
        const hops = (turn++ * 5) % 4;
        return new Promise((resolve) => {
          const land = (left: number) => {
            if (left > 0) return void setImmediate(() => land(left - 1));
            pieces.push({ at: hostOffset, bytes: bytes.slice() });
            resolve();
          };
          land(hops);
        });
      },
      async close(fileLength) {
        length = fileLength;
      },
      async abort() {},
    },
    bytes() {
      const out = new Uint8Array(length);
      for (const piece of pieces) out.set(piece.bytes.subarray(0, Math.max(0, length - piece.at)), piece.at);
      return out;
    },
  };
}

/** Views over copies of `bytes` that are scribbled over when released: a write from a view
 * after its release would carry the scribble into the image. */
function scribbledViews(bytes: Uint8Array) {
  let held = 0;
  let given = 0;
  const viewSource = (offset: number, length: number): SourceView | undefined => {
    // Every third chunk is read instead (mixed paths).
    if (given++ % 3 === 2) return undefined;
    const copy = new Uint8Array(bytes.subarray(offset, offset + length));
    held++;
    let released = false;
    return {
      bytes: copy,
      words: new Uint32Array(copy.buffer, 0, length >>> 2),
      release: () => {
        if (released) return;
        released = true;
        held--;
        copy.fill(0xee);
      },
    };
  };
  return { viewSource, held: () => held, given: () => given };
}

describe('convertDirect from source views', () => {
  it('keeps each view until its writes land, releases every one, and writes the same image', async () => {
    const size = 6 * MiB;
    const bytes = sourceBytes(size);
    const source = await memorySource(size, [{ offset: 0, data: bytes }]);
    const views = scribbledViews(bytes);
    const late = lateSink();
    const geometry = resolveGeometry({ clusterSize: 65536 }, size);
    await convertDirect(source, geometry, late.sink, {
      readDepth: 4,
      chunkBytes: 256 * 1024,
      signal: undefined,
      viewSource: views.viewSource,
    });
    expect(views.given()).toBeGreaterThan(3);
    expect(views.held()).toBe(0);
    const image = await openChecked(late.bytes());
    expectSameBytes(await image.read(0, size), bytes);
    await image.close();
  });

  it('releases the views of chunks started ahead when the conversion is aborted', async () => {
    const size = 6 * MiB;
    const bytes = sourceBytes(size);
    const source = await memorySource(size, [{ offset: 0, data: bytes }]);
    const views = scribbledViews(bytes);
    const controller = new AbortController();
    const late = lateSink();
    const sink: RandomAccessSink = {
      ...late.sink,
      writeAt(hostOffset, data) {
        if (hostOffset > 2 * MiB) controller.abort(new Error('stop here'));
        return late.sink.writeAt(hostOffset, data);
      },
    };
    const geometry = resolveGeometry({ clusterSize: 65536 }, size);
    await expect(
      convertDirect(source, geometry, sink, {
        readDepth: 4,
        chunkBytes: 128 * 1024,
        signal: controller.signal,
        viewSource: views.viewSource,
      }),
    ).rejects.toThrow(/stop here/);
    // Releases of views whose writes were in flight run once those writes land.
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(views.held()).toBe(0);
  });
});

describe('convertToQcow2 of a raw file on tmpfs', () => {
  let dir: string;
  let rawPath: string;
  let bytes: Buffer;
  beforeAll(() => {
    dir = mkdtempSync(join('/dev/shm', 'qcow2-writer-mapped-'));
    rawPath = join(dir, 'source.raw');
    bytes = sourceBytes(8 * MiB);
    writeFileSync(rawPath, bytes.subarray(0, 7 * MiB));
    truncateSync(rawPath, 8 * MiB); // the last MiB a hole
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** Converts with the source opened as given; returns the data reads the source saw. */
  const convert = async (options: { forceShare?: boolean }, out: string) => {
    const source = await FileBlockDevice.open(rawPath, { readOnly: true, ...options });
    const reads: number[] = [];
    const readInto = source.readInto.bind(source);
    source.readInto = (buffer, offset, requestOptions) => {
      reads.push(offset);
      return readInto(buffer, offset, requestOptions);
    };
    try {
      await convertToQcow2(source, join(dir, out), { clusterSize: 65536, flush: 'never' });
    } finally {
      await source.close();
    }
    const image = await openChecked(readFileSync(join(dir, out)));
    expectSameBytes(await image.read(0, bytes.length), bytes);
    await image.close();
    return reads;
  };

  it('takes the data from a mapping of the file, and writes what a read-through conversion writes', async () => {
    const mappedReads = await convert({}, 'mapped.qcow2');
    expect(mappedReads).toEqual([]);
    // -U (force share): writers are not locked out, so no mapping: every chunk is read.
    const readReads = await convert({ forceShare: true }, 'read.qcow2');
    expect(readReads.length).toBeGreaterThan(0);
    expect(readFileSync(join(dir, 'mapped.qcow2')).equals(readFileSync(join(dir, 'read.qcow2')))).toBe(true);
  });
});
