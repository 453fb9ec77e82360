/**
 * The copy loop of `convert -O raw`: reads planned from extents (coalesced in the file holding the
 * data), the zero scan, and the read-ahead / one-write-at-a-time runner.
 */
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockDeviceError, type Extent, MemoryBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { convertToRaw } from '../src/commands/convert.js';
import {
  forEachDataRun,
  MAX_READ_GAP,
  planReads,
  type ReadJob,
  runCopy,
} from '../src/commands/convert-pipeline.js';

const KiB = 1024;
const MiB = 2 ** 20;

/** A guest whose data extents lie in `file` at chosen host offsets (as a qcow2 image's do). */
class MappedDevice extends MemoryBlockDevice {
  constructor(
    size: number,
    readonly layout: { guest: number; length: number; host: number }[],
  ) {
    super(size);
  }

  override async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length;
    const extents: Extent[] = [];
    let position = offset;
    for (const run of this.layout) {
      const runEnd = run.guest + run.length;
      if (runEnd <= position || run.guest >= end) continue;
      if (run.guest > position) {
        extents.push({
          offset: position,
          length: run.guest - position,
          zero: true,
          data: false,
          present: false,
          depth: 0,
        });
        position = run.guest;
      }
      const stop = Math.min(runEnd, end);
      const host = run.host + (position - run.guest);
      extents.push({
        offset: position,
        length: stop - position,
        zero: false,
        data: true,
        present: true,
        depth: 0,
        hostOffset: host,
      });
      position = stop;
    }
    if (position < end)
      extents.push({
        offset: position,
        length: end - position,
        zero: true,
        data: false,
        present: false,
        depth: 0,
      });
    return extents;
  }
}

function pattern(length: number, seed: number): Buffer {
  const bytes = Buffer.alloc(length);
  for (let index = 0; index < length; index++) bytes[index] = (index * 7 + seed) & 0xff || 1;
  return bytes;
}

async function allJobs(next: () => Promise<ReadJob | undefined>): Promise<ReadJob[]> {
  const jobs: ReadJob[] = [];
  for (let job = await next(); job !== undefined; job = await next()) jobs.push(job);
  return jobs;
}

describe('planReads', () => {
  let dir: string;
  let host: FileBlockDevice;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'qcow2-cli-pipeline-'));
    writeFileSync(join(dir, 'host.raw'), Buffer.alloc(16 * MiB));
    host = await FileBlockDevice.open(join(dir, 'host.raw'), { readOnly: true });
  });
  afterAll(async () => {
    await host.close();
    rmSync(dir, { recursive: true, force: true });
  });

  test('extents that follow each other in the host file, within a small gap, share a read', async () => {
    // 1 MiB runs of data every other MiB of the guest, an L2 table's 4 KiB between them in the file.
    const layout = [0, 1, 2, 3].map((index) => ({
      guest: index * 2 * MiB,
      length: MiB,
      host: 64 * KiB + index * (MiB + 4 * KiB),
    }));
    const device = new MappedDevice(8 * MiB, layout);
    const zeros: number[] = [];
    const jobs = await allJobs(
      planReads(device, {
        chunkSize: 2 * MiB,
        hostFile: () => host,
        onZero: async (offset, length) => {
          zeros.push(offset, length);
        },
      }),
    );
    // Two runs and their gap fit 2 MiB + MAX_READ_GAP; a third would not: it starts the next read.
    expect(jobs.map((job) => [job.sourceOffset, job.length, job.pieces])).toEqual([
      [64 * KiB, 2 * MiB + 4 * KiB, [0, 0, MiB, MiB + 4 * KiB, 2 * MiB, MiB]],
      [64 * KiB + 2 * (MiB + 4 * KiB), 2 * MiB + 4 * KiB, [0, 4 * MiB, MiB, MiB + 4 * KiB, 6 * MiB, MiB]],
    ]);
    expect(jobs.every((job) => job.hostFile === host)).toBe(true);
    expect(zeros).toEqual([MiB, MiB, 3 * MiB, MiB, 5 * MiB, MiB, 7 * MiB, MiB]);
    await device.close();
  });

  test('a gap above MAX_READ_GAP, a host offset going back, or a long extent: separate reads', async () => {
    const layout = [
      { guest: 0, length: 64 * KiB, host: 0 },
      { guest: 64 * KiB, length: 64 * KiB, host: 128 * KiB + MAX_READ_GAP + 1 },
      { guest: 128 * KiB, length: 64 * KiB, host: 64 * KiB },
      { guest: 192 * KiB, length: 5 * MiB, host: 4 * MiB },
    ];
    const device = new MappedDevice(8 * MiB, layout);
    const jobs = await allJobs(planReads(device, { chunkSize: 2 * MiB, hostFile: () => host }));
    expect(jobs.map((job) => [job.sourceOffset, job.length])).toEqual([
      [0, 64 * KiB],
      [128 * KiB + MAX_READ_GAP + 1, 64 * KiB],
      [64 * KiB, 64 * KiB],
      [4 * MiB, 2 * MiB],
      [6 * MiB, 2 * MiB],
      [8 * MiB, MiB],
    ]);
    await device.close();
  });

  test('without a host file (or past its end) the device is read, guest-contiguous data merged', async () => {
    const device = new MappedDevice(8 * MiB, [
      { guest: 0, length: MiB, host: 0 },
      { guest: MiB, length: MiB, host: 15 * MiB + 512 * KiB }, // runs past the 16 MiB host file
      { guest: 3 * MiB, length: 3 * MiB, host: 0 },
    ]);
    const jobs = await allJobs(planReads(device, { chunkSize: 2 * MiB }));
    expect(jobs.map((job) => [job.hostFile, job.sourceOffset, job.length, job.pieces])).toEqual([
      [undefined, 0, 2 * MiB, [0, 0, 2 * MiB]],
      [undefined, 3 * MiB, 2 * MiB, [0, 3 * MiB, 2 * MiB]],
      [undefined, 5 * MiB, MiB, [0, 5 * MiB, MiB]],
    ]);
    const mixed = await allJobs(planReads(device, { chunkSize: 4 * MiB, hostFile: () => host }));
    expect(mixed.map((job) => [job.hostFile === host, job.sourceOffset, job.length])).toEqual([
      [true, 0, MiB],
      [false, MiB, MiB],
      [true, 0, 3 * MiB],
    ]);
    await device.close();
  });
});

describe('forEachDataRun', () => {
  const block = 4 * KiB;
  const zeroBlock = Buffer.alloc(block);

  /** The data runs and zero runs, as [start, end, isData] in buffer offsets. */
  async function runs(data: Buffer, from: number, to: number, guestOffset: number) {
    const words = new Uint32Array(data.buffer, data.byteOffset, data.length >>> 2);
    const out: [number, number, boolean][] = [];
    await forEachDataRun(
      data,
      words,
      from,
      to,
      guestOffset,
      block,
      zeroBlock,
      async (start, end) => {
        out.push([start, end, true]);
      },
      async (start, end) => {
        out.push([start, end, false]);
      },
    );
    return out;
  }

  test('blocks are aligned in the guest, not in the buffer', async () => {
    const data = Buffer.alloc(32 * KiB, 1);
    // Guest block [8 KiB, 12 KiB) is zeros: in the buffer, the piece starts at guest 1 KiB.
    data.fill(0, 1 * KiB + 7 * KiB, 1 * KiB + 11 * KiB);
    expect(await runs(data, 1 * KiB, 1 * KiB + 20 * KiB, KiB)).toEqual([
      [KiB, 8 * KiB, true],
      [8 * KiB, 12 * KiB, false],
      [12 * KiB, 21 * KiB, true],
    ]);
  });

  test('a block whose first 16 bytes are zeros is looked at in full', async () => {
    const data = Buffer.alloc(16 * KiB);
    data[4 * KiB + 4095] = 9; // only the last byte of the second block
    data[12 * KiB + 16] = 9;
    expect(await runs(data, 0, 16 * KiB, 0)).toEqual([
      [0, 4 * KiB, false],
      [4 * KiB, 8 * KiB, true],
      [8 * KiB, 12 * KiB, false],
      [12 * KiB, 16 * KiB, true],
    ]);
  });

  test('agrees with a byte-by-byte model on random pieces', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.nat(15), fc.boolean()), { minLength: 1, maxLength: 12 }),
        fc.nat(block - 1),
        fc.nat(3 * block),
        async (spots, guestShift, from) => {
          const data = Buffer.alloc(16 * block);
          for (const [index, set] of spots) if (set) data[index * block + ((index * 37) % block)] = 1;
          const to = data.length;
          const guestOffset = 10 * block + guestShift;
          const got = await runs(data, from, to, guestOffset);
          // Model: each guest-aligned block of the piece is data when any byte is non-zero.
          const model: [number, number, boolean][] = [];
          let at = from;
          while (at < to) {
            const end = Math.min(to, at + block - ((guestOffset + at - from) % block));
            const isData = data.subarray(at, end).some((byte) => byte !== 0);
            const last = model[model.length - 1];
            if (last !== undefined && last[2] === isData) last[1] = end;
            else model.push([at, end, isData]);
            at = end;
          }
          expect(got).toEqual(model);
        },
      ),
      { numRuns: 200 },
    );
  });
});

describe('runCopy', () => {
  test('writes buffers in read order, one at a time, and keeps at most `depth` reads in flight', async () => {
    const device = new MemoryBlockDevice(16 * MiB);
    let inFlight = 0;
    let most = 0;
    const original = device.readInto.bind(device);
    device.readInto = async (buffer, offset) => {
      inFlight++;
      most = Math.max(most, inFlight);
      // Later reads finish first.
      await new Promise((resolve) => setTimeout(resolve, 20 - offset / MiB));
      inFlight--;
      return original(buffer, offset);
    };
    let offset = 0;
    const next = async (): Promise<ReadJob | undefined> => {
      if (offset >= 16 * MiB) return undefined;
      const job = { hostFile: undefined, sourceOffset: offset, length: MiB, pieces: [0, offset, MiB] };
      offset += MiB;
      return job;
    };
    const order: number[] = [];
    let writing = 0;
    await runCopy(device, next, 3, MiB, async (job) => {
      writing++;
      expect(writing).toBe(1);
      await new Promise((resolve) => setTimeout(resolve, 1));
      order.push(job.sourceOffset / MiB);
      writing--;
    });
    expect(order).toEqual(Array.from({ length: 16 }, (_, index) => index));
    expect(most).toBeLessThanOrEqual(3);
    expect(most).toBeGreaterThan(1);
    await device.close();
  });

  test('a failed read stops new reads, waits for those in flight, and rejects with its error', async () => {
    const device = new MemoryBlockDevice(16 * MiB);
    let started = 0;
    let settled = 0;
    device.readInto = async (_buffer, offset) => {
      started++;
      await new Promise((resolve) => setTimeout(resolve, 5));
      settled++;
      if (offset === 2 * MiB) throw new BlockDeviceError('EIO', 'read: injected failure', { offset });
    };
    let offset = 0;
    const next = async () => {
      if (offset >= 16 * MiB) return undefined;
      const job = { hostFile: undefined, sourceOffset: offset, length: MiB, pieces: [0, offset, MiB] };
      offset += MiB;
      return job;
    };
    await expect(runCopy(device, next, 4, MiB, async () => {})).rejects.toThrow(/injected failure/);
    expect(settled).toBe(started);
    expect(started).toBeLessThan(8);
    await device.close();
  });
  test('a buffer being written is never read into; a failed write stops the copy with its error', async () => {
    const device = new MemoryBlockDevice(16 * MiB);
    const writing = new Set<ArrayBufferLike>();
    let started = 0;
    let settled = 0;
    device.readInto = async (buffer) => {
      expect(writing.has(buffer.buffer)).toBe(false);
      started++;
      await new Promise((resolve) => setTimeout(resolve, 1));
      settled++;
    };
    const jobs = () => {
      let offset = 0;
      return async () => {
        if (offset >= 16 * MiB) return undefined;
        const job = { hostFile: undefined, sourceOffset: offset, length: MiB, pieces: [0, offset, MiB] };
        offset += MiB;
        return job;
      };
    };
    const writes: number[] = [];
    const write = (failAt: number) => async (job: ReadJob, slot: { buffer: Buffer }) => {
      writing.add(slot.buffer.buffer);
      await new Promise((resolve) => setTimeout(resolve, 2));
      writing.delete(slot.buffer.buffer);
      writes.push(job.sourceOffset / MiB);
      if (job.sourceOffset === failAt) throw new BlockDeviceError('ENOSPC', 'write: injected failure');
    };
    await runCopy(device, jobs(), 3, MiB, write(-1));
    expect(writes).toHaveLength(16);
    writes.length = 0;
    started = 0;
    settled = 0;
    await expect(runCopy(device, jobs(), 3, MiB, write(5 * MiB))).rejects.toThrow(/injected failure/);
    expect(writes).toEqual([0, 1, 2, 3, 4, 5]);
    expect(settled).toBe(started);
    expect(started).toBeLessThanOrEqual(6 + 3);
    await device.close();
  });
});

describe('convertToRaw from host offsets', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qcow2-cli-pipeline-raw-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test('data read from the host file at scattered offsets lands at its guest offsets', async () => {
    const hostBytes = pattern(12 * MiB, 5);
    writeFileSync(join(dir, 'host.raw'), hostBytes);
    const host = await FileBlockDevice.open(join(dir, 'host.raw'), { readOnly: true });
    const layout = [
      { guest: 0, length: MiB + 512, host: 2 * MiB + 512 },
      { guest: 3 * MiB, length: 2 * MiB, host: 3 * MiB + 512 + 4 * KiB },
      { guest: 6 * MiB, length: 3 * MiB, host: 64 * KiB },
      { guest: 10 * MiB, length: 700, host: 11 * MiB },
    ];
    const device = new MappedDevice(10 * MiB + 700, layout);
    const expected = Buffer.alloc(device.size);
    for (const run of layout) hostBytes.copy(expected, run.guest, run.host, run.host + run.length);
    // The device itself reads wrongly: every byte must come from the host file.
    const target = join(dir, 'out.raw');
    const progress: number[] = [];
    await convertToRaw(device, target, 'out.raw', {
      chunkSize: 2 * MiB,
      parallel: 3,
      hostFile: () => host,
      onProgress: (done) => progress.push(done),
    });
    expect(readFileSync(target).equals(expected)).toBe(true);
    expect(progress[progress.length - 1]).toBe(device.size);
    expect(progress).toEqual([...progress].sort((a, b) => a - b));
    // About 6 MiB of data: the unmapped guest ranges stay holes.
    expect(statSync(target).blocks * 512).toBeLessThan(7 * MiB);
    await host.close();
    await device.close();
  });
});
