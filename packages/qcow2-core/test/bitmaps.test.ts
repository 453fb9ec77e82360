/**
 * Persistent dirty bitmaps on images we write: the sparse bitmap and table codecs, then images
 * with bitmaps made by qemu-img, written by us and by qemu-io with the same requests: the stored
 * bits equal QEMU's, flags are as QEMU leaves them, qemu-img check is clean, only touched parts of a
 * huge bitmap are held, and crashes at any request leave a clean-or-leaking image whose bitmap is
 * either the complete one or marked in use.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type BlockDevice, FaultInjectingBlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { describeBlockDeviceConformance } from '@qcowkit/blockdev/testing';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  BITMAP_TABLE_ONES,
  BITMAP_TABLE_ZEROS,
  DirtyBitmap,
  decodeBitmapTable,
  dirtyRanges,
  encodeBitmapTable,
  type PersistentBitmaps,
  Qcow2Image,
  readStoredBitmap,
} from '../src/index.js';
import { keepOpen } from './keep-open.js';
import { qemuImg, qemuIo, qemuIoUnchecked, requireTools, suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');

function bitsOf(bitmap: DirtyBitmap, stored?: Uint8Array | 'ones'): number[] {
  const set: number[] = [];
  for (let chunk = 0; chunk < bitmap.tableSize; chunk++) {
    const bytes = bitmap.compose(chunk, stored);
    if (bytes === undefined) continue;
    for (let bit = 0; bit < bitmap.chunkBits; bit++) {
      if ((bytes[bit >> 3]! & (1 << (bit & 7))) !== 0) set.push(chunk * bitmap.chunkBits + bit);
    }
  }
  return set;
}

// The BlockDevice contract holds with bitmaps kept (marked on every change, stored at each reopen).
const conformanceStorages = new WeakMap<BlockDevice, BlockDevice>();
describeBlockDeviceConformance({
  name: 'qcow2 with persistent bitmaps',
  sizes: [4097, 197_635, 2 ** 32 + 1536],
  numRuns: 6,
  maxOperations: 20,
  supportsResize: true,
  // An image holding persistent bitmaps cannot be empty (see PersistentBitmaps.checkResize).
  minResizeSize: 1,
  timeout: 60_000,
  async create(size) {
    const storage = keepOpen(new MemoryBlockDevice(0));
    const image = await Qcow2Image.create(storage, { size, clusterSize: 4096 });
    const bitmaps = await image.persistentBitmaps();
    bitmaps.add('fine', { granularity: 512 });
    bitmaps.add('off', { disabled: true });
    conformanceStorages.set(image, storage);
    return image;
  },
  async reopen(device) {
    const storage = conformanceStorages.get(device)!;
    await device.close();
    const image = await Qcow2Image.open(storage, { readOnly: false });
    expect(image.bitmaps.map((bitmap) => bitmap.flags)).toEqual([['in-use', 'auto'], ['in-use']]);
    conformanceStorages.set(image, storage);
    return image;
  },
});

describe('DirtyBitmap (sparse, in memory)', () => {
  it('sets the bits a byte range covers, least significant bit first', () => {
    const bitmap = new DirtyBitmap({
      name: 'b',
      granularityBits: 16,
      enabled: true,
      clusterSize: 512,
      guestSize: 1 << 30,
    });
    bitmap.mark(65536, 1);
    bitmap.mark(200000, 70000);
    bitmap.mark(1 << 20, 65536);
    expect(bitsOf(bitmap)).toEqual([1, 3, 4, 16]);
    expect(bitmap.compose(0, undefined)![0]).toBe(0x1a);
    expect(bitmap.touchedChunks).toBe(1);
  });

  it('holds only the chunks written to', () => {
    // 16 TiB at 512 B granularity with 512 B clusters: 2^35 bits, 2^23 chunks.
    const bitmap = new DirtyBitmap({
      name: 'b',
      granularityBits: 9,
      enabled: true,
      clusterSize: 512,
      guestSize: 2 ** 44,
    });
    bitmap.mark(0, 1);
    bitmap.mark(2 ** 44 - 1, 1);
    bitmap.mark(2 ** 40, 4096 * 1024);
    expect(bitmap.tableSize).toBe(2 ** 23);
    expect(bitmap.touchedChunks).toBe(4);
  });

  it('a disabled bitmap keeps its bits', () => {
    const bitmap = new DirtyBitmap({
      name: 'b',
      granularityBits: 16,
      enabled: false,
      clusterSize: 512,
      guestSize: 1 << 30,
    });
    bitmap.mark(0, 1 << 20);
    expect(bitsOf(bitmap)).toEqual([]);
  });

  it('a shrink drops the bits past the end, also stored ones, and a grow adds clear bits', () => {
    const bitmap = new DirtyBitmap({
      name: 'b',
      granularityBits: 9,
      enabled: true,
      clusterSize: 512,
      guestSize: 512 * 8192,
    });
    bitmap.mark(512 * 4000, 512 * 200);
    bitmap.resize(512 * 4100);
    bitmap.resize(512 * 8192);
    expect(bitmap.chunkChanged(1, BITMAP_TABLE_ONES)).toBe(true);
    const set = bitsOf(bitmap, 'ones');
    expect(set.length).toBe(4100);
    expect(set[set.length - 1]).toBe(4099);
  });

  it('merges stored bits with new ones (property)', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 64, maxLength: 64 }),
        fc.array(fc.tuple(fc.nat(511), fc.integer({ min: 1, max: 64 }))),
        (stored, marks) => {
          const bitmap = new DirtyBitmap({
            name: 'b',
            granularityBits: 9,
            enabled: true,
            clusterSize: 64,
            guestSize: 512 * 512,
          });
          const expected = new Set<number>();
          for (let bit = 0; bit < 512; bit++)
            if ((stored[bit >> 3]! & (1 << (bit & 7))) !== 0) expected.add(bit);
          for (const [bit, count] of marks) {
            bitmap.mark(bit * 512, count * 512);
            for (let b = bit; b < Math.min(512, bit + count); b++) expected.add(b);
          }
          expect(bitsOf(bitmap, stored)).toEqual([...expected].sort((a, b) => a - b));
        },
      ),
    );
  });
});

describe('dirtyRanges', () => {
  it('merges set bits into guest ranges, the last one cut at the guest end (property)', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 1, maxLength: 40 }),
        fc.integer({ min: 0, max: 7 }),
        (bits, cut) => {
          const bitCount = bits.length * 8 - cut;
          const guestSize = bitCount * 512 - 100;
          const expected: { offset: number; length: number }[] = [];
          for (let bit = 0; bit < bitCount; bit++) {
            if ((bits[Math.floor(bit / 8)]! & (1 << (bit % 8))) === 0) continue;
            const last = expected[expected.length - 1];
            if (last !== undefined && last.offset + last.length === bit * 512) last.length += 512;
            else expected.push({ offset: bit * 512, length: 512 });
          }
          const tail = expected[expected.length - 1];
          if (tail !== undefined && tail.offset + tail.length > guestSize)
            tail.length = guestSize - tail.offset;
          expect(dirtyRanges({ bits, bitCount, granularity: 512 }, guestSize)).toEqual(expected);
        },
      ),
    );
  });
});

describe('bitmap table codec', () => {
  it('round-trips zeros, ones and data offsets', () => {
    const entries = [BITMAP_TABLE_ZEROS, BITMAP_TABLE_ONES, 0x10000, 2 ** 40];
    const bytes = new Uint8Array(32);
    encodeBitmapTable(entries, bytes);
    expect([...decodeBitmapTable(bytes, 4, 65536, 2 ** 41, 0)]).toEqual(entries);
  });

  it('rejects reserved bits, unaligned offsets, the all-ones flag with an offset, offsets past the file', () => {
    const entry = (high: number, low: number): Uint8Array => {
      const bytes = new Uint8Array(8);
      new DataView(bytes.buffer).setUint32(0, high);
      new DataView(bytes.buffer).setUint32(4, low);
      return bytes;
    };
    expect(() => decodeBitmapTable(entry(0x0100_0000, 0), 1, 65536, 2 ** 40, 0)).toThrow(/reserved/);
    expect(() => decodeBitmapTable(entry(0, 0x2), 1, 65536, 2 ** 40, 0)).toThrow(/reserved/);
    expect(() => decodeBitmapTable(entry(0, 0x1_0200), 1, 65536, 2 ** 40, 0)).toThrow(/cluster-aligned/);
    expect(() => decodeBitmapTable(entry(0, 0x1_0001), 1, 65536, 2 ** 40, 0)).toThrow(/all-ones/);
    expect(() => decodeBitmapTable(entry(1, 0), 1, 65536, 2 ** 20, 0)).toThrow(/past the end/);
  });
});

describe('persistent bitmaps and close', () => {
  it('a write in flight when close begins is in the stored bitmap; one issued after is refused', async () => {
    const storage = keepOpen(new MemoryBlockDevice(0));
    const image = await Qcow2Image.create(storage, { size: 1 << 24, clusterSize: 4096 });
    (await image.persistentBitmaps()).add('b', { granularity: 65536 });
    const inFlight = image.write(3 << 16, new Uint8Array(512).fill(1));
    const closing = image.close();
    const late = image.write(9 << 16, new Uint8Array(512).fill(2));
    await expect(late).rejects.toMatchObject({ code: 'ECLOSED' });
    await expect(image.persistentBitmaps()).rejects.toMatchObject({ code: 'ECLOSED' });
    await inFlight;
    await closing;
    const reopened = await Qcow2Image.open(storage);
    expect(dirtyRanges(await readStoredBitmap(reopened, 'b'), reopened.size)).toEqual([
      { offset: 3 << 16, length: 65536 },
    ]);
    expect([...(await reopened.read(9 << 16, 512))].every((byte) => byte === 0)).toBe(true);
  });
});

describe('persistent bitmaps and an empty disk', () => {
  it('a bitmap cannot be added at size 0, nor an image holding one resized to 0 (it could not be stored)', async () => {
    const storage = keepOpen(new MemoryBlockDevice(0));
    const empty = await Qcow2Image.create(storage, { size: 0, clusterSize: 4096 });
    const bitmaps = await empty.persistentBitmaps();
    expect(() => bitmaps.add('b')).toThrow(/image of 0 bytes/);
    await empty.resize(65536);
    (await empty.persistentBitmaps()).add('b');
    await expect(empty.resize(0)).rejects.toMatchObject({
      code: 'EINVAL',
      message: /cannot be kept at size 0/,
    });
    expect(empty.size).toBe(65536);
    await empty.close();
    const reopened = await Qcow2Image.open(storage, { readOnly: false });
    expect(reopened.bitmapDirectory.map((entry) => entry.name)).toEqual(['b']);
    await reopened.close();
  });
});

describe('readStoredBitmap on a directory entry as read from the file', () => {
  const entry = {
    name: 'b',
    tableOffset: 65536,
    tableSize: 1,
    flags: 0,
    type: 1,
    granularityBits: 16,
    granularity: 65536,
    inUse: false,
    auto: false,
    extraDataSize: 0,
  };
  const image = (overrides: Partial<typeof entry>) => ({
    file: new MemoryBlockDevice(131072),
    size: 2 ** 40,
    clusterSize: 65536,
    bitmapDirectory: [{ ...entry, ...overrides }],
  });

  it("refuses fields past QEMU's caps with ECORRUPT before reading or allocating by them", async () => {
    const cases: [Partial<typeof entry>, RegExp][] = [
      [{ tableSize: 0xffff_ffff }, /table of 4294967295 entries is too large/],
      [{ granularityBits: 0, granularity: 1 }, /granularity bits 0/],
      [{ tableOffset: 65537 }, /not cluster-aligned/],
      [{ type: 2 }, /not a dirty tracking bitmap/],
      [{ tableSize: 1, granularityBits: 9, granularity: 512 }, /too small for the image/],
    ];
    for (const [overrides, why] of cases) {
      const error = await readStoredBitmap(image(overrides), 'b').catch((caught: unknown) => caught);
      expect(error).toMatchObject({ code: 'ECORRUPT', message: expect.stringMatching(why) });
    }
  });

  it('reads a valid entry (an all-zeros table: no bit set)', async () => {
    const stored = await readStoredBitmap(image({ tableSize: 32 }), 'b');
    expect(stored.bitCount).toBe(2 ** 24);
    expect(stored.bits.every((byte) => byte === 0)).toBe(true);
  });
});

type Op = { kind: 'write' | 'zero' | 'discard'; offset: number; length: number };

async function apply(image: Qcow2Image, ops: readonly Op[]): Promise<void> {
  for (const op of ops) {
    if (op.kind === 'write') await image.write(op.offset, new Uint8Array(op.length).fill(0x5a));
    else if (op.kind === 'zero') await image.writeZeroes(op.offset, op.length);
    else await image.discard(op.offset, op.length);
  }
}

function qemuCommands(ops: readonly Op[]): string[] {
  return ops.map((op) =>
    op.kind === 'write'
      ? `write -P 0x5a ${op.offset} ${op.length}`
      : op.kind === 'zero'
        ? `write -z ${op.offset} ${op.length}`
        : `discard ${op.offset} ${op.length}`,
  );
}

function qemuInfoBitmaps(dir: string, name: string): unknown {
  const info = JSON.parse(qemuImg(dir, 'info', '--output=json', name)) as {
    'format-specific': { data: { bitmaps?: unknown } };
  };
  return info['format-specific'].data.bitmaps;
}

function qemuCheck(dir: string, name: string): number {
  return spawnSync('qemu-img', ['check', name], { cwd: dir, stdio: 'ignore' }).status ?? -1;
}

describe.skipIf(!haveQemu)('images with persistent bitmaps, written beside QEMU', () => {
  const dir = suiteTempDir('qcowkit-bitmaps-');
  const size = 64 * 1024 * 1024;

  function makeBase(name: string, imageSize = size, clusterSize = 65536): void {
    qemuImg(dir.path, 'create', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, name, String(imageSize));
    qemuImg(dir.path, 'bitmap', '--add', '-g', '65536', name, 'b0');
    qemuImg(dir.path, 'bitmap', '--add', '--disable', name, 'b1');
    qemuImg(dir.path, 'bitmap', '--add', '-g', '512', name, 'fine');
    qemuIo(dir.path, name, ['write -P 1 0 1M']);
  }

  async function writeOurs(name: string, ops: readonly Op[]): Promise<void> {
    const storage = MemoryBlockDevice.from(readFileSync(join(dir.path, name)));
    const image = await Qcow2Image.open(keepOpen(storage), { readOnly: false });
    await apply(image, ops);
    await image.close();
    writeFileSync(join(dir.path, name), await storage.read(0, storage.size));
  }

  async function bitmapsOf(name: string): Promise<Record<string, string>> {
    const storage = MemoryBlockDevice.from(readFileSync(join(dir.path, name)));
    const image = await Qcow2Image.open(storage);
    const result: Record<string, string> = {};
    for (const entry of image.bitmapDirectory) {
      result[entry.name] = Buffer.from((await readStoredBitmap(image, entry.name)).bits).toString('hex');
    }
    await image.close();
    return result;
  }

  const workloads: Record<string, Op[]> = {
    'writes, zeroes and discards': [
      { kind: 'write', offset: 65536, length: 1 },
      { kind: 'zero', offset: 1 << 20, length: 65536 },
      { kind: 'discard', offset: 4 << 20, length: 131072 },
      { kind: 'write', offset: 200000, length: 70000 },
      { kind: 'write', offset: size - 513, length: 513 },
    ],
    'one byte': [{ kind: 'write', offset: (5 << 20) + 12345, length: 1 }],
    'nothing written': [],
  };

  for (const [label, ops] of Object.entries(workloads)) {
    it(`${label}: the same bits, flags and a clean check as qemu-io`, async () => {
      makeBase('ours.qcow2');
      makeBase('qemu.qcow2');
      await writeOurs('ours.qcow2', ops);
      if (ops.length > 0) qemuIo(dir.path, 'qemu.qcow2', qemuCommands(ops));
      else qemuIo(dir.path, 'qemu.qcow2', ['read 0 512']);
      expect(qemuCheck(dir.path, 'ours.qcow2')).toBe(0);
      expect(qemuInfoBitmaps(dir.path, 'ours.qcow2')).toEqual(qemuInfoBitmaps(dir.path, 'qemu.qcow2'));
      const ours = await bitmapsOf('ours.qcow2');
      expect(ours).toEqual(await bitmapsOf('qemu.qcow2'));
      // The base image's write set the first 16 bits; these requests set more.
      expect(ours.b0 !== `ffff${'0'.repeat(ours.b0!.length - 4)}`).toBe(ops.length > 0);
      qemuImg(dir.path, 'compare', '-f', 'qcow2', '-F', 'qcow2', 'ours.qcow2', 'qemu.qcow2');
    });
  }

  it('a second session adds to the stored bits, and QEMU reads ours back', async () => {
    makeBase('ours.qcow2');
    makeBase('qemu.qcow2');
    const first: Op[] = [{ kind: 'write', offset: 3 << 20, length: 4096 }];
    const second: Op[] = [{ kind: 'write', offset: 7 << 20, length: 4096 }];
    await writeOurs('ours.qcow2', first);
    qemuIo(dir.path, 'ours.qcow2', qemuCommands(second));
    qemuIo(dir.path, 'qemu.qcow2', qemuCommands(first));
    await writeOurs('qemu.qcow2', second);
    expect(qemuCheck(dir.path, 'ours.qcow2')).toBe(0);
    expect(qemuCheck(dir.path, 'qemu.qcow2')).toBe(0);
    expect(await bitmapsOf('ours.qcow2')).toEqual(await bitmapsOf('qemu.qcow2'));
  });

  it('the in-use flag is on disk while the image is open, and off after close', async () => {
    makeBase('open.qcow2');
    const storage = MemoryBlockDevice.from(readFileSync(join(dir.path, 'open.qcow2')));
    const image = await Qcow2Image.open(keepOpen(storage), { readOnly: false });
    await image.write(0, new Uint8Array(512));
    await image.flush();
    const during = await Qcow2Image.open(keepOpen(storage));
    expect(during.bitmaps.map((bitmap) => bitmap.flags)).toEqual([
      ['in-use', 'auto'],
      ['in-use'],
      ['in-use', 'auto'],
    ]);
    expect(image.bitmaps.map((bitmap) => bitmap.flags)).toEqual([
      ['in-use', 'auto'],
      ['in-use'],
      ['in-use', 'auto'],
    ]);
    await image.close();
    const after = await Qcow2Image.open(storage);
    expect(after.bitmaps.map((bitmap) => bitmap.flags)).toEqual([['auto'], [], ['auto']]);
    await after.close();
  });

  it('a bitmap in use at open is kept, never used; resize is refused as QEMU refuses it', async () => {
    makeBase('stale.qcow2');
    qemuIoUnchecked(dir.path, 'stale.qcow2', ['write 0 4k', 'abort']);
    const storage = MemoryBlockDevice.from(readFileSync(join(dir.path, 'stale.qcow2')));
    const image = await Qcow2Image.open(keepOpen(storage), { readOnly: false });
    await image.write(8 << 20, new Uint8Array(4096).fill(7));
    await expect(image.resize(size * 2)).rejects.toThrow(/inconsistent/);
    await image.close();
    writeFileSync(join(dir.path, 'stale.qcow2'), await storage.read(0, storage.size));
    expect(qemuCheck(dir.path, 'stale.qcow2')).toBe(0);
    const flags = (qemuInfoBitmaps(dir.path, 'stale.qcow2') as { flags: string[] }[]).map(
      (bitmap) => bitmap.flags,
    );
    expect(flags).toEqual([['in-use', 'auto'], ['in-use'], ['in-use', 'auto']]);
    const resized = spawnSync('qemu-img', ['resize', 'stale.qcow2', String(size * 2)], { cwd: dir.path });
    expect(resized.status).toBe(1);
  });

  it('resize keeps the bitmaps as QEMU does (grow, then shrink)', async () => {
    makeBase('ours.qcow2');
    makeBase('qemu.qcow2');
    const storage = MemoryBlockDevice.from(readFileSync(join(dir.path, 'ours.qcow2')));
    const image = await Qcow2Image.open(keepOpen(storage), { readOnly: false });
    await image.write(size - 65536, new Uint8Array(65536).fill(3));
    await image.resize(size * 2);
    await image.write(size + 65536, new Uint8Array(512).fill(3));
    await image.close();
    writeFileSync(join(dir.path, 'ours.qcow2'), await storage.read(0, storage.size));
    qemuIo(dir.path, 'qemu.qcow2', [`write -P 3 ${size - 65536} 65536`]);
    qemuImg(dir.path, 'resize', 'qemu.qcow2', String(size * 2));
    qemuIo(dir.path, 'qemu.qcow2', [`write -P 3 ${size + 65536} 512`]);
    expect(qemuCheck(dir.path, 'ours.qcow2')).toBe(0);
    expect(await bitmapsOf('ours.qcow2')).toEqual(await bitmapsOf('qemu.qcow2'));
    qemuImg(dir.path, 'resize', '--shrink', 'qemu.qcow2', String(size / 2));
    const again = MemoryBlockDevice.from(readFileSync(join(dir.path, 'ours.qcow2')));
    const shrunk = await Qcow2Image.open(keepOpen(again), { readOnly: false });
    await shrunk.resize(size / 2);
    await shrunk.close();
    writeFileSync(join(dir.path, 'ours.qcow2'), await again.read(0, again.size));
    expect(qemuCheck(dir.path, 'ours.qcow2')).toBe(0);
    expect(await bitmapsOf('ours.qcow2')).toEqual(await bitmapsOf('qemu.qcow2'));
  });

  it('a huge guest: only the touched bitmap clusters are held and stored', async () => {
    // 16 TiB at 64 KiB granularity: 2^28 bits, 512 bitmap clusters of 64 KiB. (A 2 PiB guest at
    // 1 MiB granularity behaves the same; its 32 MiB L1 table only makes the test slow.)
    qemuImg(dir.path, 'create', '-f', 'qcow2', 'huge.qcow2', '16T');
    qemuImg(dir.path, 'bitmap', '--add', '-g', '64k', 'huge.qcow2', 'b0');
    const storage = MemoryBlockDevice.from(readFileSync(join(dir.path, 'huge.qcow2')));
    const image = await Qcow2Image.open(keepOpen(storage), { readOnly: false });
    await image.write(2 ** 44 - 4096, new Uint8Array(4096).fill(1));
    await image.write(2 ** 43, new Uint8Array(4096).fill(1));
    const bitmap = (await image.persistentBitmaps()).bitmap('b0')!;
    expect([bitmap.touchedChunks, bitmap.tableSize]).toEqual([2, 512]);
    await image.close();
    const reopened = await Qcow2Image.open(storage);
    const entry = reopened.bitmapDirectory[0]!;
    const table = decodeBitmapTable(
      await storage.read(entry.tableOffset, entry.tableSize * 8),
      entry.tableSize,
      65536,
      storage.size,
      entry.tableOffset,
    );
    expect([...table].filter((value) => value !== 0).length).toBe(2);
    expect(dirtyRanges(await readStoredBitmap(reopened, 'b0'), reopened.size)).toEqual([
      { offset: 2 ** 43, length: 65536 },
      { offset: 2 ** 44 - 65536, length: 65536 },
    ]);
    writeFileSync(join(dir.path, 'huge.qcow2'), await storage.read(0, storage.size));
    expect(qemuCheck(dir.path, 'huge.qcow2')).toBe(0);
  });

  async function edit(name: string, change: (image: Qcow2Image) => Promise<void>): Promise<void> {
    const storage = MemoryBlockDevice.from(readFileSync(join(dir.path, name)));
    const image = await Qcow2Image.open(keepOpen(storage), { readOnly: false });
    await change(image);
    await image.close();
    writeFileSync(join(dir.path, name), await storage.read(0, storage.size));
  }

  it('add, clear, enable, disable, merge and remove as qemu-img bitmap does', async () => {
    for (const name of ['ours.qcow2', 'qemu.qcow2']) {
      qemuImg(dir.path, 'create', '-f', 'qcow2', '-o', 'cluster_size=4096', name, String(size));
      qemuIo(dir.path, name, ['write -P 1 0 1M']);
    }
    // An image without bitmaps gets the extension; the default granularity follows the cluster size.
    await edit('ours.qcow2', async (image) => {
      const bitmaps = await image.persistentBitmaps();
      bitmaps.add('b0', { granularity: 65536 });
      bitmaps.add('d', { disabled: true });
      bitmaps.add('e');
      await image.write(3 << 20, new Uint8Array(5000).fill(2));
    });
    qemuImg(dir.path, 'bitmap', '--add', '-g', '65536', 'qemu.qcow2', 'b0');
    qemuImg(dir.path, 'bitmap', '--add', '--disable', 'qemu.qcow2', 'd');
    qemuImg(dir.path, 'bitmap', '--add', 'qemu.qcow2', 'e');
    qemuIo(dir.path, 'qemu.qcow2', [`write -P 2 ${3 << 20} 5000`]);
    expect(qemuCheck(dir.path, 'ours.qcow2')).toBe(0);
    expect(qemuInfoBitmaps(dir.path, 'ours.qcow2')).toEqual(qemuInfoBitmaps(dir.path, 'qemu.qcow2'));
    expect(await bitmapsOf('ours.qcow2')).toEqual(await bitmapsOf('qemu.qcow2'));
    // Changes in one session.
    await edit('ours.qcow2', async (image) => {
      const bitmaps = await image.persistentBitmaps();
      bitmaps.setEnabled('d', true);
      bitmaps.merge('d', await bitmaps.currentBits('b0'), image.size);
      bitmaps.setEnabled('e', false);
      bitmaps.clear('b0');
      expect(() => bitmaps.add('d')).toThrow('Bitmap already exists: d');
      expect(() => bitmaps.clear('nope')).toThrow("Dirty bitmap 'nope' not found");
      for (const granularity of [1000, 256, 3 * 2 ** 32, Number.NaN]) {
        expect(() => bitmaps.add('x', { granularity })).toThrow(
          'Granularity must be power of 2 and at least 512',
        );
      }
      expect(() => bitmaps.add('x', { granularity: 2 ** 32 })).toThrow(
        'Granularity exceeds maximum (2147483648 bytes)',
      );
      await image.write(9 << 20, new Uint8Array(512).fill(2));
    });
    qemuImg(dir.path, 'bitmap', '--enable', '--merge', 'b0', 'qemu.qcow2', 'd');
    qemuImg(dir.path, 'bitmap', '--disable', 'qemu.qcow2', 'e');
    qemuImg(dir.path, 'bitmap', '--clear', 'qemu.qcow2', 'b0');
    qemuIo(dir.path, 'qemu.qcow2', [`write -P 2 ${9 << 20} 512`]);
    expect(qemuCheck(dir.path, 'ours.qcow2')).toBe(0);
    expect(qemuInfoBitmaps(dir.path, 'ours.qcow2')).toEqual(qemuInfoBitmaps(dir.path, 'qemu.qcow2'));
    expect(await bitmapsOf('ours.qcow2')).toEqual(await bitmapsOf('qemu.qcow2'));
    // Removing one, then all: the extension and the autoclear bit go, and nothing leaks.
    await edit('ours.qcow2', async (image) => (await image.persistentBitmaps()).remove('d'));
    qemuImg(dir.path, 'bitmap', '--remove', 'qemu.qcow2', 'd');
    expect(qemuCheck(dir.path, 'ours.qcow2')).toBe(0);
    expect(await bitmapsOf('ours.qcow2')).toEqual(await bitmapsOf('qemu.qcow2'));
    await edit('ours.qcow2', async (image) => {
      const bitmaps = await image.persistentBitmaps();
      bitmaps.remove('b0');
      bitmaps.remove('e');
    });
    expect(qemuCheck(dir.path, 'ours.qcow2')).toBe(0);
    expect(qemuInfoBitmaps(dir.path, 'ours.qcow2')).toBeUndefined();
    const header = readFileSync(join(dir.path, 'ours.qcow2')).subarray(88, 96);
    expect([...header]).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    qemuImg(dir.path, 'compare', '-f', 'qcow2', '-F', 'qcow2', 'ours.qcow2', 'qemu.qcow2');
  });

  it('an inconsistent bitmap can only be removed', async () => {
    makeBase('stale.qcow2');
    qemuIoUnchecked(dir.path, 'stale.qcow2', ['write 0 4k', 'abort']);
    await edit('stale.qcow2', async (image) => {
      const bitmaps = await image.persistentBitmaps();
      expect(bitmaps.inconsistent).toEqual(['b0', 'b1', 'fine']);
      expect(() => bitmaps.clear('b0')).toThrow("Bitmap 'b0' is inconsistent and cannot be used");
      bitmaps.remove('b0');
    });
    expect(qemuCheck(dir.path, 'stale.qcow2')).toBe(0);
    expect((qemuInfoBitmaps(dir.path, 'stale.qcow2') as { name: string }[]).map((b) => b.name)).toEqual([
      'b1',
      'fine',
    ]);
  });

  it('crashes while a bitmap is added or removed: the old list or the new one, clean or leaking', async () => {
    qemuImg(dir.path, 'create', '-f', 'qcow2', '-o', 'cluster_size=4096', 'plain.qcow2', String(4 << 20));
    qemuIo(dir.path, 'plain.qcow2', ['write -P 1 0 64k']);
    const plain = readFileSync(join(dir.path, 'plain.qcow2'));
    makeBase('three.qcow2', 4 << 20, 4096);
    const three = readFileSync(join(dir.path, 'three.qcow2'));
    let run = 0;
    const outcomes = new Set<string>();
    for (const [pristine, change, before, after] of [
      [plain, (b: PersistentBitmaps) => b.add('n', { granularity: 65536 }), [], ['n']],
      [three, (b: PersistentBitmaps) => b.remove('b1'), ['b0', 'b1', 'fine'], ['b0', 'fine']],
      [
        three,
        (b: PersistentBitmaps) => {
          for (const name of ['b0', 'b1', 'fine']) b.remove(name);
        },
        ['b0', 'b1', 'fine'],
        [],
      ],
    ] as const) {
      for (let crashAfter = 1; crashAfter < 60; crashAfter += 2) {
        const inner = MemoryBlockDevice.from(pristine);
        const fault = new FaultInjectingBlockDevice(keepOpen(inner), { crashAfter });
        try {
          const image = await Qcow2Image.open(fault, { readOnly: false });
          change(await image.persistentBitmaps());
          await image.write(1 << 20, new Uint8Array(4096).fill(9));
          await image.close();
        } catch (error) {
          if (!fault.crashed) throw error;
        }
        const name = `list-${run++ % 4}.qcow2`;
        writeFileSync(join(dir.path, name), await inner.read(0, inner.size));
        expect([0, 3]).toContain(qemuCheck(dir.path, name));
        const image = await Qcow2Image.open(inner);
        const names = image.bitmaps.map((bitmap) => bitmap.name);
        expect([before.join(), after.join()]).toContain(names.join());
        if (!fault.crashed) expect(names).toEqual(after);
        outcomes.add(names.join());
        for (const bitmap of image.bitmaps) {
          if (bitmap.flags.includes('in-use')) continue;
          // Consistent: the stored bits read back (QEMU's own check of the table passed above).
          await readStoredBitmap(image, bitmap.name);
        }
        await image.close();
      }
    }
    // Both sides of each switch were reached.
    expect(outcomes.size).toBeGreaterThanOrEqual(4);
  });

  it('crashes at any request leave a clean-or-leaking image, the bitmap complete or in use', async () => {
    makeBase('crash.qcow2', 4 * 1024 * 1024, 4096);
    const pristine = readFileSync(join(dir.path, 'crash.qcow2'));
    const pristineImage = await Qcow2Image.open(MemoryBlockDevice.from(pristine));
    const pristineBits = (await readStoredBitmap(pristineImage, 'b0')).bits;
    await pristineImage.close();
    const hex = (bytes: Uint8Array): string => Buffer.from(bytes).toString('hex');
    const opArbitrary = fc.record({
      kind: fc.constantFrom('write' as const, 'zero' as const, 'discard' as const),
      offset: fc.integer({ min: 0, max: 4 * 1024 * 1024 - 1 }),
      length: fc.integer({ min: 1, max: 300_000 }),
    });
    let run = 0;
    let completeRuns = 0;
    let inUseRuns = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.array(opArbitrary, { minLength: 1, maxLength: 6 }),
        fc.integer({ min: 1, max: 120 }),
        async (rawOps, crashAfter) => {
          const ops = rawOps.map((op) => ({
            ...op,
            length: Math.min(op.length, 4 * 1024 * 1024 - op.offset),
          }));
          const inner = MemoryBlockDevice.from(pristine);
          const fault = new FaultInjectingBlockDevice(keepOpen(inner), { crashAfter });
          try {
            const image = await Qcow2Image.open(fault, { readOnly: false });
            await apply(image, ops);
            await image.close();
          } catch (error) {
            if (!fault.crashed) throw error;
          }
          const name = `crash-${run++ % 4}.qcow2`;
          writeFileSync(join(dir.path, name), await inner.read(0, inner.size));
          expect([0, 3]).toContain(qemuCheck(dir.path, name));
          const image = await Qcow2Image.open(inner);
          const b0 = image.bitmaps.find((bitmap) => bitmap.name === 'b0')!;
          if (b0.flags.includes('in-use')) {
            inUseRuns++;
          } else {
            completeRuns++;
            // Consistent: the bitmap as it was (no request applied yet) or with every request's bits.
            const model = new DirtyBitmap({
              name: 'b0',
              granularityBits: 16,
              enabled: true,
              clusterSize: 4096,
              guestSize: image.size,
            });
            for (const op of ops) model.mark(op.offset, op.length);
            const full = model.compose(0, pristineBits)!.subarray(0, pristineBits.length);
            const actual = hex((await readStoredBitmap(image, 'b0')).bits);
            expect([hex(pristineBits), hex(full)]).toContain(actual);
            if (!fault.crashed) expect(actual).toBe(hex(full));
          }
          await image.close();
        },
      ),
      { numRuns: 40 },
    );
    expect(completeRuns + inUseRuns).toBe(40);
  });
});
