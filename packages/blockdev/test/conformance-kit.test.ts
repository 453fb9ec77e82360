/** The kit must catch broken devices, or passing it would mean nothing. */
import {
  type Extent,
  MemoryBlockDevice,
  type RequestOptions,
  validateRange,
  type WriteOptions,
} from '@qcowkit/blockdev';
import {
  type ConformanceOptions,
  checkBounds,
  checkReadOnlyBounds,
  modelProperty,
  overlapProperty,
  patternBytes,
  readOnlyOperationsArbitrary,
  runReadOnlySequence,
} from '@qcowkit/blockdev/testing';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

/** Silently drops writes that start at or past 100 000. */
class DropsFarWrites extends MemoryBlockDevice {
  override async write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    if (offset >= 100_000) return;
    await super.write(offset, data, options);
  }
}

/** Calls everything a hole. */
class LiesAboutHoles extends MemoryBlockDevice {
  override async blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    await super.blockStatus(offset, length, options);
    return [{ offset, length, zero: true, data: false, present: false, depth: 0 }];
  }
}

/** Keeps offsets in 32 bits, as `offset | 0` style code does. */
class Wraps32Bit extends MemoryBlockDevice {
  override async write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    await super.write(
      offset % 2 ** 32,
      data.subarray(0, Math.min(data.length, this.size - (offset % 2 ** 32))),
      options,
    );
  }
}

/** Does not check bounds on reads: returns zeros for any range. */
class ReadsPastEnd extends MemoryBlockDevice {
  override async read(_offset: number, length: number): Promise<Uint8Array> {
    return new Uint8Array(Math.max(0, Math.floor(length) || 0));
  }
}

/** Discard only checks its arguments, as devices without real discard may do. */
class IgnoresDiscard extends MemoryBlockDevice {
  override async discard(offset: number, length: number): Promise<void> {
    validateRange(this.size, offset, length, 'discard');
  }
}

/** Read-modify-write of whole 4 KiB blocks with no lock: overlapping writes lose each other. */
class RacyReadModifyWrite extends MemoryBlockDevice {
  override async write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    validateRange(this.size, offset, data.length, 'write');
    const start = Math.floor(offset / 4096) * 4096;
    const end = Math.min(this.size, Math.ceil((offset + data.length) / 4096) * 4096);
    const block = await super.read(start, end - start);
    await new Promise((resolve) => setImmediate(resolve));
    block.set(data, offset - start);
    await super.write(start, block, options);
  }
}

/** Read-only, but reads one byte late past 1000 (an off-by-one in a part boundary). */
class ShiftedAfter1000 extends MemoryBlockDevice {
  override async readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    if (offset < 1000 || offset + buffer.length >= this.size) return super.readInto(buffer, offset, options);
    return super.readInto(buffer, offset + 1, options);
  }
  override async read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    validateRange(this.size, offset, length, 'read');
    const buffer = new Uint8Array(length);
    await this.readInto(buffer, offset, options);
    return buffer;
  }
}

async function readOnlyFailureOf(
  create: (content: Uint8Array) => Promise<MemoryBlockDevice>,
): Promise<string> {
  const size = 4097;
  try {
    await fc.assert(
      fc.asyncProperty(fc.nat(), readOnlyOperationsArbitrary(size), (seed, operations) =>
        runReadOnlySequence(
          { name: 'read-only', createReadOnly: create },
          patternBytes(seed, size),
          operations,
        ),
      ),
      { numRuns: 300, endOnFailure: true, seed: 42 },
    );
  } catch (error) {
    return `${String(error)}\n${String((error as Error).cause)}`;
  }
  return 'no failure';
}

async function failureOf(options: ConformanceOptions, size: number): Promise<string> {
  try {
    await fc.assert(modelProperty(options, size), { numRuns: 300, endOnFailure: true, seed: 42 });
  } catch (error) {
    // fast-check reports the counterexample; the kit's own message is the cause.
    return `${String(error)}\n${String((error as Error).cause)}`;
  }
  return 'no failure';
}

describe('the conformance kit', () => {
  it('catches a device that drops writes past an offset', async () => {
    const message = await failureOf(
      { name: 'drops', create: async (size) => new DropsFarWrites(size) },
      197_635,
    );
    expect(message).toMatch(/reads \d+, expected \d+/);
  });

  it('catches a device that calls data a hole', async () => {
    const message = await failureOf({ name: 'lies', create: async (size) => new LiesAboutHoles(size) }, 4097);
    expect(message).toMatch(/zero or a hole, but they hold data/);
  });

  it('catches 32-bit offset arithmetic on a device larger than 4 GiB', async () => {
    const message = await failureOf(
      { name: 'wraps', create: async (size) => new Wraps32Bit(size) },
      2 ** 32 + 1536,
    );
    expect(message).toMatch(/reads \d+, expected \d+/);
  });

  it('catches missing bounds checks', async () => {
    await expect(checkBounds(new ReadsPastEnd(4096))).rejects.toThrow(/expected a rejection with EINVAL/);
  });

  it('holds discard to zeros by default, and accepts old data with discardReadsZero: false', async () => {
    const create = async (size: number) => new IgnoresDiscard(size);
    expect(await failureOf({ name: 'no discard', create }, 4097)).toMatch(/reads \d+, expected 0/);
    expect(await failureOf({ name: 'no discard', create, discardReadsZero: false }, 4097)).toBe('no failure');
  });

  it('catches overlapping writes that lose each other', async () => {
    const options = { name: 'racy', create: async (size: number) => new RacyReadModifyWrite(size) };
    let message = 'no failure';
    try {
      await fc.assert(overlapProperty(options, 197_635), { numRuns: 100, endOnFailure: true, seed: 7 });
    } catch (error) {
      message = String((error as Error).cause);
    }
    expect(message).toMatch(/overlapping requests left byte/);
  });

  it('passes a correct device with the same settings', async () => {
    expect(
      await failureOf({ name: 'memory', create: async (size) => new MemoryBlockDevice(size) }, 197_635),
    ).toBe('no failure');
  });

  it('catches a read-only device that reads the wrong bytes, and passes a correct one', async () => {
    const shifted = async (content: Uint8Array) => {
      const device = new ShiftedAfter1000(content.length);
      await device.write(0, content);
      return device;
    };
    expect(await readOnlyFailureOf(shifted)).toMatch(/reads \d+, expected \d+/);
    expect(
      await readOnlyFailureOf(async (content) => MemoryBlockDevice.from(content, { readOnly: true })),
    ).toBe('no failure');
  });

  it('catches a read-only device without bounds checks', async () => {
    await expect(checkReadOnlyBounds(new ReadsPastEnd(4096))).rejects.toThrow(
      /expected a rejection with EINVAL/,
    );
  });
});
