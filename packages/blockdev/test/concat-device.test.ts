import {
  type BlockDevice,
  blockStatusAll,
  ConcatBlockDevice,
  type Extent,
  FaultInjectingBlockDevice,
  ForwardingBlockDevice,
  MemoryBlockDevice,
} from '@qcowkit/blockdev';
import { describeReadOnlyBlockDeviceConformance, patternBytes } from '@qcowkit/blockdev/testing';
import { describe, expect, it } from 'vitest';

/** Cuts `content` at `cuts` (fractions of its length) into memory parts. */
async function partsOf(content: Uint8Array, cuts: readonly number[]): Promise<MemoryBlockDevice[]> {
  const points = [0, ...cuts.map((cut) => Math.floor(cut * content.length)), content.length];
  const parts: MemoryBlockDevice[] = [];
  for (let index = 1; index < points.length; index++) {
    const slice = content.subarray(points[index - 1]!, points[index]!);
    // Small chunks, so block status inside a part has holes and data to report.
    const part = new MemoryBlockDevice(slice.length, { chunkSize: 512 });
    await part.write(0, slice);
    parts.push(part);
  }
  return parts;
}

/** `device` claiming other alignments (the concatenation only reads them). */
function aligned(device: BlockDevice, minimumAlignment: number, preferredAlignment: number): BlockDevice {
  const capabilities = { ...device.capabilities, minimumAlignment, preferredAlignment };
  return new (class extends ForwardingBlockDevice {
    override get capabilities() {
      return capabilities;
    }
  })(device);
}

/** `device` whose block status says its data lies at `host` + offset, `depth` layers down. */
function withHost(device: BlockDevice, host: number): BlockDevice {
  return new (class extends ForwardingBlockDevice {
    override async blockStatus(offset: number, length: number): Promise<Extent[]> {
      return [
        { offset, length, zero: false, data: true, present: true, depth: 1, hostOffset: host + offset },
      ];
    }
  })(device);
}

describeReadOnlyBlockDeviceConformance({
  name: 'ConcatBlockDevice of three parts (one empty, odd sizes)',
  createReadOnly: async (content) => new ConcatBlockDevice(await partsOf(content, [0.3, 0.3, 0.71])),
});

describeReadOnlyBlockDeviceConformance({
  name: 'ConcatBlockDevice of one part',
  createReadOnly: async (content) =>
    new ConcatBlockDevice([MemoryBlockDevice.from(content, { readOnly: true })]),
  sizes: [4097],
  numRuns: 20,
});

describe('ConcatBlockDevice', () => {
  const K = 1024;

  it('reads across part boundaries and keeps each part to its own size', async () => {
    const a = MemoryBlockDevice.from(patternBytes(1, 1000));
    const b = MemoryBlockDevice.from(patternBytes(2, 3000));
    const concat = new ConcatBlockDevice([a, new MemoryBlockDevice(0), b]);
    expect(concat.size).toBe(4000);
    const expected = new Uint8Array(4000);
    expected.set(patternBytes(1, 1000), 0);
    expect(expected.subarray(0, 1000)).toEqual(patternBytes(1, 1000));
    expected.set(patternBytes(2, 3000), 1000);
    expect(await concat.read(0, 4000)).toEqual(expected);
    expect(await concat.read(990, 20)).toEqual(expected.subarray(990, 1010));
    expect(concat.partAt(999)).toMatchObject({ index: 0, start: 0, size: 1000 });
    expect(concat.partAt(1000)).toMatchObject({ index: 2, start: 1000, size: 3000 });
    await expect(concat.read(3999, 2)).rejects.toMatchObject({ code: 'EINVAL' });
    await concat.close();
  });

  it('passes block status through, shifted, one part per answer', async () => {
    const a = new MemoryBlockDevice(8 * K, { chunkSize: 4 * K });
    await a.write(4 * K, new Uint8Array(4 * K).fill(1));
    const b = new MemoryBlockDevice(8 * K, { chunkSize: 4 * K });
    await b.write(0, new Uint8Array(4 * K).fill(2));
    const concat = new ConcatBlockDevice([a, b]);
    expect(await concat.blockStatus(0, 16 * K)).toEqual([
      { offset: 0, length: 4 * K, zero: true, data: false, present: false, depth: 0 },
      { offset: 4 * K, length: 4 * K, zero: false, data: true, present: true, depth: 0 },
    ]);
    expect(await concat.blockStatus(6 * K, 4 * K)).toEqual([
      { offset: 6 * K, length: 2 * K, zero: false, data: true, present: true, depth: 0 },
    ]);
    expect(await blockStatusAll(concat, 0, 16 * K)).toEqual([
      { offset: 0, length: 4 * K, zero: true, data: false, present: false, depth: 0 },
      { offset: 4 * K, length: 8 * K, zero: false, data: true, present: true, depth: 0 },
      { offset: 12 * K, length: 4 * K, zero: true, data: false, present: false, depth: 0 },
    ]);
    await concat.close();
  });

  it('keeps host offsets and depths of the part that answers', async () => {
    const concat = new ConcatBlockDevice(
      [withHost(new MemoryBlockDevice(4 * K), 1 << 20), withHost(new MemoryBlockDevice(4 * K), 2 << 20)],
      { closeParts: false },
    );
    expect(await concat.blockStatus(5 * K, K)).toEqual([
      {
        offset: 5 * K,
        length: K,
        zero: false,
        data: true,
        present: true,
        depth: 1,
        hostOffset: (2 << 20) + K,
      },
    ]);
    expect(concat.partAt(5 * K).index).toBe(1);
    await concat.close();
  });

  it('covers offsets above 4 GiB', async () => {
    const big = new MemoryBlockDevice(2 ** 32 + 512);
    await big.write(2 ** 32, new Uint8Array([7, 8, 9]));
    const tail = MemoryBlockDevice.from(new Uint8Array([1, 2, 3]));
    const concat = new ConcatBlockDevice([big, tail]);
    expect(concat.size).toBe(2 ** 32 + 515);
    expect(await concat.read(2 ** 32, 3)).toEqual(new Uint8Array([7, 8, 9]));
    expect(await concat.read(2 ** 32 + 511, 4)).toEqual(new Uint8Array([0, 1, 2, 3]));
    const [first] = await concat.blockStatus(2 ** 32 + 512, 3);
    expect(first).toMatchObject({ offset: 2 ** 32 + 512, length: 3 });
    await concat.close();
  });

  it('is read-only whatever its parts are, and an empty list is an empty device', async () => {
    const part = new MemoryBlockDevice(4 * K);
    const concat = new ConcatBlockDevice([part], { closeParts: false });
    expect(concat.readOnly).toBe(true);
    await expect(concat.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: 'EROFS' });
    await expect(concat.writeZeroes(0, 1)).rejects.toMatchObject({ code: 'EROFS' });
    await expect(concat.discard(0, 1)).rejects.toMatchObject({ code: 'EROFS' });
    await expect(concat.resize(8 * K)).rejects.toMatchObject({ code: 'EROFS' });
    await concat.close();
    // closeParts: false leaves the part open.
    expect((await part.read(0, 1)).length).toBe(1);
    const empty = new ConcatBlockDevice([]);
    expect(empty.size).toBe(0);
    expect(await empty.read(0, 0)).toEqual(new Uint8Array(0));
    await empty.close();
  });

  it("reports a part's failure and waits for the other part's read before rejecting", async () => {
    const failing = new FaultInjectingBlockDevice(new MemoryBlockDevice(4 * K), {
      failWhen: (request) => request.kind === 'read',
    });
    const slow = new MemoryBlockDevice(4 * K);
    const concat = new ConcatBlockDevice([slow, failing]);
    await expect(concat.read(2 * K, 4 * K)).rejects.toMatchObject({ code: 'EIO' });
    expect((await concat.read(0, K)).length).toBe(K);
    await concat.close();
    await expect(slow.read(0, 1)).rejects.toMatchObject({ code: 'ECLOSED' });
  });

  it('claims only alignments that hold in every part (where each part starts)', () => {
    const even = new ConcatBlockDevice(
      [
        aligned(new MemoryBlockDevice(64 * K), 512, 4 * K),
        aligned(new MemoryBlockDevice(64 * K), 4 * K, 64 * K),
      ],
      { closeParts: false },
    );
    expect(even.capabilities).toMatchObject({ minimumAlignment: 4 * K, preferredAlignment: 64 * K });
    // The second part starts at 1000 = 8 x 125: an aligned request there is only 8-aligned in it.
    const odd = new ConcatBlockDevice(
      [aligned(new MemoryBlockDevice(1000), 512, 4 * K), aligned(new MemoryBlockDevice(64 * K), 512, 4 * K)],
      { closeParts: false },
    );
    expect(odd.capabilities).toMatchObject({ minimumAlignment: 8, preferredAlignment: 8 });
  });
});
