import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough, Writable } from 'node:stream';
import { BlockDeviceError, MemoryBlockDevice } from '@qcowkit/blockdev';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { convertToRaw, convertToStream } from '../src/commands/convert.js';

const MiB = 2 ** 20;

describe('convertToRaw', () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qcow2-cli-convert-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test('copies every byte; zero ranges and all-zero 4 KiB blocks stay holes', async () => {
    const device = new MemoryBlockDevice(16 * MiB + 1000);
    await device.write(1000, new Uint8Array(70_000).fill(0x11));
    // Written data that reads as zeros: must not be allocated in the output.
    await device.write(4 * MiB, new Uint8Array(MiB));
    await device.write(9 * MiB - 3, new Uint8Array(10).fill(0x22));
    await device.write(16 * MiB + 500, new Uint8Array(500).fill(0x33));
    const target = join(dir, 'out.raw');
    const progress: number[] = [];
    await convertToRaw(device, target, 'out.raw', {
      chunkSize: 256 * 1024,
      parallel: 3,
      onProgress: (done, total) => progress.push(done / total),
    });
    const bytes = readFileSync(target);
    expect(bytes.equals(Buffer.from(await device.read(0, device.size)))).toBe(true);
    // 70 000 bytes at 1000 touch 18 blocks, 10 bytes across a 4 KiB boundary 2, the tail 1.
    expect(statSync(target).blocks * 512).toBeLessThanOrEqual((18 + 2 + 1) * 4096 + 16 * 4096);
    expect(progress[progress.length - 1]).toBe(1);
    expect(progress).toEqual([...progress].sort((a, b) => a - b));
    await device.close();
  });

  test('a read failure rejects with that error once every worker has stopped', async () => {
    let reads = 0;
    class FailingDevice extends MemoryBlockDevice {
      override async readInto(buffer: Uint8Array, offset: number): Promise<void> {
        reads++;
        if (offset >= 3 * MiB) throw new BlockDeviceError('EIO', 'read: injected failure', { offset });
        return super.readInto(buffer, offset);
      }
    }
    const failing = new FailingDevice(8 * MiB);
    await failing.write(0, new Uint8Array(8 * MiB).fill(1));
    await expect(
      convertToRaw(failing, join(dir, 'fail.raw'), 'fail.raw', { chunkSize: MiB, parallel: 4 }),
    ).rejects.toThrow(/injected failure/);
    expect(reads).toBeLessThan(8);
    await failing.close();
  });

  test('noCreate: the guest range of an existing file ends up equal to the guest, the rest is kept', async () => {
    const device = new MemoryBlockDevice(8 * MiB);
    await device.write(MiB - 100, new Uint8Array(5000).fill(0x44));
    await device.write(6 * MiB, new Uint8Array(8192)); // data that reads as zeros
    const target = join(dir, 'existing.raw');
    writeFileSync(target, Buffer.alloc(9 * MiB, 0xee));
    await convertToRaw(device, target, 'existing.raw', { chunkSize: MiB, parallel: 2, noCreate: true });
    const bytes = readFileSync(target);
    expect(bytes.subarray(0, 8 * MiB).equals(Buffer.from(await device.read(0, device.size)))).toBe(true);
    expect(bytes.subarray(8 * MiB).every((byte) => byte === 0xee)).toBe(true);
    // The zeros were punched, not written: about the data and the MiB past the guest remain.
    expect(statSync(target).blocks * 512).toBeLessThanOrEqual(MiB + 64 * 1024);
    await device.close();
  });

  test('noCreate: a file smaller than the guest or a missing one is refused, untouched', async () => {
    const device = new MemoryBlockDevice(2 * MiB);
    const small = join(dir, 'small.raw');
    writeFileSync(small, Buffer.alloc(MiB, 0xee));
    const options = { chunkSize: MiB, parallel: 2, noCreate: true };
    await expect(convertToRaw(device, small, 'small.raw', options)).rejects.toThrow(
      /^output file is smaller than input file$/,
    );
    expect(readFileSync(small).every((byte) => byte === 0xee)).toBe(true);
    await expect(convertToRaw(device, join(dir, 'missing.raw'), 'missing.raw', options)).rejects.toThrow(
      "Could not open 'missing.raw': No such file or directory",
    );
    await device.close();
  });

  test('a new target: block status starts while it is made; if it cannot be made, that is the error, once the lookup is over', async () => {
    const order: string[] = [];
    class SlowStatus extends MemoryBlockDevice {
      override async blockStatus(offset: number, length: number) {
        order.push('lookup');
        await new Promise((resolve) => setTimeout(resolve, 30));
        order.push('lookup done');
        return super.blockStatus(offset, length);
      }
    }
    const device = new SlowStatus(4 * MiB);
    await device.write(MiB, new Uint8Array(MiB).fill(0x55));
    const options = { chunkSize: MiB, parallel: 2 };
    await expect(
      convertToRaw(device, join(dir, 'no-such-folder', 'x.raw'), 'x.raw', options),
    ).rejects.toThrow("Could not create 'x.raw': No such file or directory");
    // The lookup had started before the failure and was waited for: nothing is left running.
    expect(order).toEqual(['lookup', 'lookup done']);
    order.length = 0;
    const target = join(dir, 'early.raw');
    await convertToRaw(device, target, 'early.raw', options);
    expect(readFileSync(target).equals(Buffer.from(await device.read(0, device.size)))).toBe(true);
    expect(order.slice(0, 2)).toEqual(['lookup', 'lookup done']);
    await device.close();
  });

  test('a stream gets every byte in order, zeros included, whatever order the reads finish in', async () => {
    class SlowDevice extends MemoryBlockDevice {
      override async readInto(buffer: Uint8Array, offset: number): Promise<void> {
        // Earlier chunks finish later: the writes must still come out in guest order.
        await new Promise((resolve) => setTimeout(resolve, (3 - ((offset / 65536) % 4)) * 3));
        return super.readInto(buffer, offset);
      }
    }
    const device = new SlowDevice(3 * MiB + 777);
    for (let index = 0; index < 40; index++) {
      await device.write(index * 70_001, new Uint8Array(1000).fill(index + 1));
    }
    const stream = new PassThrough();
    const received: Buffer[] = [];
    stream.on('data', (chunk: Buffer) => received.push(Buffer.from(chunk)));
    const progress: number[] = [];
    await convertToStream(device, stream, {
      chunkSize: 65536,
      parallel: 4,
      onProgress: (done, total) => progress.push(done / total),
    });
    expect(Buffer.concat(received).equals(Buffer.from(await device.read(0, device.size)))).toBe(true);
    expect(progress[progress.length - 1]).toBe(1);
    await device.close();
  });

  test('a stream: a read failure or a stream failure rejects, and nothing waits forever', async () => {
    class FailingDevice extends MemoryBlockDevice {
      override async readInto(buffer: Uint8Array, offset: number): Promise<void> {
        if (offset >= 2 * MiB) throw new BlockDeviceError('EIO', 'read: injected failure', { offset });
        return super.readInto(buffer, offset);
      }
    }
    const failing = new FailingDevice(4 * MiB);
    await failing.write(0, new Uint8Array(4 * MiB).fill(1));
    const sink = new PassThrough();
    sink.resume();
    await expect(convertToStream(failing, sink, { chunkSize: MiB / 4, parallel: 4 })).rejects.toThrow(
      /injected failure/,
    );
    const broken = new Writable({
      write(_chunk, _encoding, callback) {
        callback(Object.assign(new Error('write EPIPE'), { code: 'EPIPE' }));
      },
    });
    broken.on('error', () => undefined);
    const device = new MemoryBlockDevice(MiB);
    await expect(convertToStream(device, broken, { chunkSize: 65536, parallel: 2 })).rejects.toThrow(/EPIPE/);
    await failing.close();
    await device.close();
  });
});
