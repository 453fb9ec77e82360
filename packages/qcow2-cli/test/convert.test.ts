import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BlockDeviceError, MemoryBlockDevice } from '@qcowkit/blockdev';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { convertToRaw } from '../src/commands/convert.js';

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
});
