/**
 * The read fast path of Qcow2Image (a small read inside one plain data cluster whose L2 slice is
 * cached goes to the file in one read): it is taken, it reads what the general path reads, it
 * falls back where the general path has work to do, and close still waits for its reads.
 */
import { type BlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { patternBytes } from '@qcowkit/blockdev/testing';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Qcow2Image } from '../src/index.js';

const CLUSTER = 4096;
const SIZE = 64 * CLUSTER;

/** A device seen through a proxy: `close` only flushes (the image is reopened), reads are logged,
 * and a read may be held until `release` is called. */
function observed(device: BlockDevice) {
  const reads: { offset: number; length: number }[] = [];
  let gate: Promise<void> | undefined;
  let release = (): void => {};
  const proxy = new Proxy(device, {
    get(target, property) {
      if (property === 'close') return () => target.flush();
      if (property === 'readInto') {
        return async (buffer: Uint8Array, offset: number, options?: unknown) => {
          reads.push({ offset, length: buffer.length });
          if (gate !== undefined) await gate;
          return target.readInto(buffer, offset, options as never);
        };
      }
      const value = Reflect.get(target, property, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  return {
    device: proxy,
    reads,
    hold(): void {
      gate = new Promise((resolve) => {
        release = () => {
          gate = undefined;
          resolve();
        };
      });
    },
    release: () => release(),
  };
}

/** An image whose even clusters hold data, odd ones zeros (written) or nothing; plus the model. */
async function makeImage(): Promise<{ file: MemoryBlockDevice; model: Uint8Array }> {
  const file = new MemoryBlockDevice(0);
  const model = new Uint8Array(SIZE);
  const image = await Qcow2Image.create(observed(file).device, { size: SIZE, clusterSize: CLUSTER });
  for (let cluster = 0; cluster < SIZE / CLUSTER; cluster++) {
    if (cluster % 2 === 0) {
      const data = patternBytes(cluster, CLUSTER);
      await image.write(cluster * CLUSTER, data);
      model.set(data, cluster * CLUSTER);
    } else if (cluster % 3 === 0) {
      await image.writeZeroes(cluster * CLUSTER, CLUSTER);
    }
  }
  await image.close();
  return { file, model };
}

describe('Qcow2Image read fast path', () => {
  it('reads a small range of a cached data cluster with one read of the file', async () => {
    const { file, model } = await makeImage();
    const seen = observed(file);
    const image = await Qcow2Image.open(seen.device);
    const guestOffset = 10 * CLUSTER + 100;
    // The first read loads the L2 slice (general path); the next ones read the data only.
    expect(await image.read(guestOffset, 512)).toEqual(model.subarray(guestOffset, guestOffset + 512));
    seen.reads.length = 0;
    const buffer = new Uint8Array(1000);
    const reading = image.readInto(buffer, guestOffset + 7);
    // Started before readInto returned: nothing awaited on the way (the general path awaits the
    // mapping first).
    expect(seen.reads).toEqual([{ offset: expect.any(Number), length: 1000 }]);
    await reading;
    expect(buffer).toEqual(model.subarray(guestOffset + 7, guestOffset + 1007));
    expect(seen.reads).toHaveLength(1);
    // A read crossing into the next cluster takes the general path.
    seen.reads.length = 0;
    const crossing = image.read(guestOffset + CLUSTER - 200, 400);
    expect(seen.reads).toEqual([]);
    expect(await crossing).toEqual(model.subarray(guestOffset + CLUSTER - 200, guestOffset + CLUSTER + 200));
    await image.close();
  });

  it('reads what the general path reads, cold and warm, at any offset and length', async () => {
    const { file, model } = await makeImage();
    const image = await Qcow2Image.open(observed(file).device);
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 0, max: SIZE - 1 }),
        fc.integer({ min: 0, max: 3 * CLUSTER }),
        async (offset, wanted) => {
          const length = Math.min(wanted, SIZE - offset);
          const expected = Buffer.from(model.subarray(offset, offset + length));
          // Buffer.equals: a byte-wise toEqual of kilobytes is slow.
          expect(expected.equals(await image.read(offset, length))).toBe(true);
          const buffer = new Uint8Array(length).fill(0xee);
          await image.readInto(buffer, offset);
          expect(expected.equals(buffer)).toBe(true);
        },
      ),
      { numRuns: 300 },
    );
    await image.close();
  });

  it('reads zeros where a data cluster lies past the end of a truncated file, as the general path does', async () => {
    const { file, model } = await makeImage();
    const lastData = SIZE - 2 * CLUSTER;
    const image = await Qcow2Image.open(observed(file).device);
    const hostOffset = (await image.blockStatus(lastData, CLUSTER))[0]!.hostOffset!;
    await image.close();
    expect(hostOffset + CLUSTER).toBe(file.size);
    expect(model.subarray(lastData, lastData + 16)).not.toEqual(new Uint8Array(16));
    await file.resize(hostOffset + 1024);
    const truncated = await Qcow2Image.open(observed(file).device);
    for (let round = 0; round < 2; round++) {
      const bytes = await truncated.read(lastData + 512, 2048);
      expect(bytes.subarray(0, 512)).toEqual(model.subarray(lastData + 512, lastData + 1024));
      expect(bytes.subarray(512)).toEqual(new Uint8Array(1536));
    }
    await truncated.close();
  });

  it('rejects with an aborted signal and on a closed image', async () => {
    const { file } = await makeImage();
    const image = await Qcow2Image.open(observed(file).device);
    await image.read(0, 512);
    const controller = new AbortController();
    controller.abort(new Error('stop'));
    await expect(image.read(0, 512, { signal: controller.signal })).rejects.toThrow('stop');
    await image.close();
    await expect(image.read(0, 512)).rejects.toMatchObject({ code: 'ECLOSED' });
  });

  it('close waits for the fast reads in flight', async () => {
    const { file, model } = await makeImage();
    const seen = observed(file);
    const image = await Qcow2Image.open(seen.device);
    await image.read(2 * CLUSTER, 512);
    seen.hold();
    const events: string[] = [];
    const reading = image.read(2 * CLUSTER + 512, 512).then((bytes) => {
      events.push('read');
      return bytes;
    });
    const closing = image.close().then(() => events.push('closed'));
    await new Promise((resolve) => setTimeout(resolve, 5));
    expect(events).toEqual([]);
    seen.release();
    await closing;
    expect(events).toEqual(['read', 'closed']);
    expect(await reading).toEqual(model.subarray(2 * CLUSTER + 512, 2 * CLUSTER + 1024));
  });

  it('reads zero clusters as zeros and unallocated ones from the backing file (zeros past its end)', async () => {
    // The backing file ends 1000 bytes into cluster 41 (unallocated in the image): reads there
    // clip to zeros.
    const backingSize = 41 * CLUSTER + 1000;
    const backingBytes = patternBytes(99, backingSize);
    const backing = observed(MemoryBlockDevice.from(backingBytes));
    const resolveBacking = async () => backing.device;
    const file = new MemoryBlockDevice(0);
    const model = new Uint8Array(SIZE);
    model.set(backingBytes);
    const writer = await Qcow2Image.create(observed(file).device, {
      size: SIZE,
      clusterSize: CLUSTER,
      backingFile: 'base.raw',
      backingFormat: 'raw',
      resolveBacking,
    });
    for (let cluster = 0; cluster < SIZE / CLUSTER; cluster += 5) {
      const data = patternBytes(cluster, CLUSTER);
      await writer.write(cluster * CLUSTER, data);
      model.set(data, cluster * CLUSTER);
    }
    for (let cluster = 3; cluster < SIZE / CLUSTER; cluster += 7) {
      await writer.writeZeroes(cluster * CLUSTER, CLUSTER);
      model.fill(0, cluster * CLUSTER, (cluster + 1) * CLUSTER);
    }
    await writer.close();
    const image = await Qcow2Image.open(observed(file).device, { resolveBacking });
    const reads: [number, number][] = [
      [41 * CLUSTER + 500, 1000],
      [41 * CLUSTER + 1000, 2000],
      [41 * CLUSTER + 2000, 100],
    ];
    for (let offset = 0; offset < SIZE; offset += 1536) reads.push([offset, Math.min(1024, SIZE - offset)]);
    for (let round = 0; round < 2; round++) {
      for (const [offset, length] of reads) {
        const bytes = await image.read(offset, length);
        expect(Buffer.from(model.subarray(offset, offset + length)).equals(bytes)).toBe(true);
      }
    }
    // Cluster 1 is unallocated and inside the backing file: one read of it, started at once.
    backing.reads.length = 0;
    const reading = image.read(CLUSTER + 10, 100);
    expect(backing.reads).toEqual([{ offset: CLUSTER + 10, length: 100 }]);
    expect(Buffer.from(model.subarray(CLUSTER + 10, CLUSTER + 110)).equals(await reading)).toBe(true);
    await image.close();
  });
});
