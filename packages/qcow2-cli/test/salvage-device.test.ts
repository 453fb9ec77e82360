/**
 * `convert --salvage`'s source wrapper: reads and block-status requests that fail are narrowed
 * down to the failing 512-byte sectors, which read as zeros and are reported once each, in qemu-img's
 * words.
 */
import {
  type BlockDevice,
  BlockDeviceError,
  type Extent,
  ForwardingBlockDevice,
  MemoryBlockDevice,
  type RequestOptions,
} from '@qcowkit/blockdev';
import { describe, expect, test } from 'vitest';
import {
  type SalvageReport,
  SalvagingBlockDevice,
  salvageWarning,
  strerrorWords,
} from '../src/salvage-device.js';

const K = 1024;

/** A memory device whose reads touching [badFrom, badTo) fail, and whose block status fails for
 * any range touching [statusFrom, statusTo); counts the requests it gets. */
class Damaged extends ForwardingBlockDevice {
  reads = 0;
  statusCalls: [number, number][] = [];
  constructor(
    inner: BlockDevice,
    private readonly bad: [number, number],
    private readonly badStatus: [number, number] = [0, 0],
    private readonly code: 'ECORRUPT' | 'EIO' | 'EINVAL' = 'ECORRUPT',
  ) {
    super(inner);
  }
  override async readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    this.reads++;
    if (offset < this.bad[1] && offset + buffer.length > this.bad[0]) {
      throw new BlockDeviceError(this.code, 'compressed cluster: cannot decompress', { offset });
    }
    return this.inner.readInto(buffer, offset, options);
  }
  override async blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    this.statusCalls.push([offset, length]);
    if (offset < this.badStatus[1] && offset + length > this.badStatus[0]) {
      throw new BlockDeviceError('ECORRUPT', 'L2 entry: host offset not cluster-aligned');
    }
    return this.inner.blockStatus(offset, length, options);
  }
}

async function filled(size: number): Promise<MemoryBlockDevice> {
  const device = new MemoryBlockDevice(size, { chunkSize: 4 * K });
  await device.write(0, new Uint8Array(size).fill(0x5a));
  return device;
}

describe('SalvagingBlockDevice', () => {
  test('a failing read reads its failing sectors as zeros, each reported once, in order', async () => {
    const damaged = new Damaged(await filled(256 * K), [64 * K + 512, 66 * K]);
    const reports: SalvageReport[] = [];
    const device = new SalvagingBlockDevice(damaged, (report) => reports.push(report));
    const bytes = await device.read(0, 256 * K);
    const expected = new Uint8Array(256 * K).fill(0x5a);
    expected.fill(0, 64 * K + 512, 66 * K);
    expect(Buffer.from(bytes).equals(expected)).toBe(true);
    expect(reports.map((report) => [report.kind, report.offset])).toEqual([
      ['read', 64 * K + 512],
      ['read', 65 * K],
      ['read', 65 * K + 512],
    ]);
    // Halving finds three bad sectors among 512 in far fewer reads than one per sector.
    expect(damaged.reads).toBeLessThan(60);
    // Read again (a second pass): no retry of the known bad sectors, no second report.
    const before = damaged.reads;
    expect(await device.read(64 * K + 512, 1536)).toEqual(new Uint8Array(1536));
    expect(damaged.reads).toBe(before);
    expect(reports).toHaveLength(3);
  });

  test('reads run in parallel report in the order they were started', async () => {
    /** Bad everywhere; reads of the first half take longer than those of the second. */
    class SlowFirstHalf extends Damaged {
      override async readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
        if (offset < 8 * K) await new Promise((resolve) => setTimeout(resolve, 5));
        return super.readInto(buffer, offset, options);
      }
    }
    const reports: number[] = [];
    const device = new SalvagingBlockDevice(new SlowFirstHalf(await filled(16 * K), [0, 16 * K]), (report) =>
      reports.push(report.offset),
    );
    const first = device.read(0, 8 * K);
    const second = device.read(8 * K, 8 * K);
    await second;
    // The second read is done, but its reports wait for the first one's.
    expect(reports).toEqual([]);
    await first;
    expect(reports).toEqual(Array.from({ length: 32 }, (_, index) => index * 512));
  });

  test('reads that do not fail are passed through untouched', async () => {
    const damaged = new Damaged(await filled(64 * K), [0, 0]);
    const device = new SalvagingBlockDevice(damaged, () => {
      throw new Error('nothing to report');
    });
    const into = new Uint8Array(4 * K);
    await device.readInto(into, 8 * K);
    expect(into.every((byte) => byte === 0x5a)).toBe(true);
    expect(damaged.reads).toBe(1);
  });

  test('block status is retried on quarters down to one sector, which is called data', async () => {
    const damaged = new Damaged(await filled(1024 * K), [0, 0], [192 * K, 192 * K + 1024]);
    const reports: SalvageReport[] = [];
    const device = new SalvagingBlockDevice(damaged, (report) => reports.push(report));
    // From 0: the whole range fails, then a quarter (256 KiB) fails, then 64 KiB answers.
    const first = await device.blockStatus(0, 1024 * K);
    expect(first.at(-1)!.offset + first.at(-1)!.length).toBeLessThanOrEqual(192 * K);
    expect(damaged.statusCalls.slice(0, 3)).toEqual([
      [0, 1024 * K],
      [0, 256 * K],
      [0, 64 * K],
    ]);
    expect(reports).toEqual([]);
    // At the bad sector itself: narrowed to 512 bytes, reported, and called data.
    expect(await device.blockStatus(192 * K, 832 * K)).toEqual([
      { offset: 192 * K, length: 512, zero: false, data: true, present: true, depth: 0 },
    ]);
    expect(reports.map((report) => [report.kind, report.offset])).toEqual([['blockStatus', 192 * K]]);
    // Known now: answered without asking again, and not reported twice.
    const calls = damaged.statusCalls.length;
    expect(await device.blockStatus(192 * K, 512)).toHaveLength(1);
    expect(damaged.statusCalls).toHaveLength(calls);
    expect(reports).toHaveLength(1);
    // The next sector is bad too; the one after it is fine.
    expect((await device.blockStatus(192 * K + 512, 4 * K))[0]!.length).toBe(512);
    expect((await device.blockStatus(193 * K, 4 * K))[0]).toMatchObject({ offset: 193 * K, data: true });
    expect(reports).toHaveLength(2);
  });

  test('requests out of range and aborted requests are not salvaged', async () => {
    const device = new SalvagingBlockDevice(new Damaged(await filled(8 * K), [0, 8 * K]), () => {});
    await expect(device.read(8 * K, 1)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(device.blockStatus(0, 9 * K)).rejects.toMatchObject({ code: 'EINVAL' });
    await expect(device.read(0, 512, { signal: AbortSignal.abort() })).rejects.toThrow();
  });

  test("warnings are qemu-img's lines, errors worded as C's strerror", () => {
    expect(
      salvageWarning({ kind: 'read', offset: 1048576, error: new BlockDeviceError('ECORRUPT', 'x') }),
    ).toBe('warning: error while reading offset 1048576: Input/output error');
    expect(
      salvageWarning({ kind: 'blockStatus', offset: 512, error: new BlockDeviceError('EIO', 'x') }),
    ).toBe('warning: error while reading block status at offset 512: Input/output error');
    expect(strerrorWords(new BlockDeviceError('EINVAL', 'x'))).toBe('Invalid argument');
    expect(strerrorWords(Object.assign(new Error('x'), { code: 'EIO' }))).toBe('Input/output error');
  });
});
