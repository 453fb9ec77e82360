/**
 * Unit tests of the pure format codecs: round trips where an encoder exists, and a typed error for
 * every malformed field.
 */

import { deflateRawSync } from 'node:zlib';
import { isBlockDeviceError } from '@qcowkit/blockdev';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  classifyL2Entry,
  classifySubcluster,
  decodeCompressedDescriptor,
  decodeHeader,
  decodeL1Entry,
  decodeL2Entry,
  decodeQcowV1Header,
  decodeQcowV1L2Entry,
  decodeRefcount,
  decodeRefcountTable,
  decodeSnapshotTable,
  detectFormat,
  encodeCompressedDescriptor,
  encodeHeader,
  encodeL1Entry,
  encodeL2Entry,
  encodeRefcount,
  featureName,
  headerFlags,
  maxRefcount,
  pureCodecs,
  QCOW2_EXT_MAGIC_BACKING_FORMAT,
  QCOW2_EXT_MAGIC_DATA_FILE,
  QCOW2_EXT_MAGIC_FEATURE_TABLE,
  type Qcow2HeaderFields,
  refcountsPerBlock,
  sizeToL1,
  TableCache,
  writeU64,
  zstdFrameLength,
} from '../src/index.js';
import { nodeCodecs } from '../src/node/index.js';

const text = (value: string): Uint8Array => new TextEncoder().encode(value);

function featureTable(entries: { kind: number; bit: number; name: string }[]): Uint8Array {
  const out = new Uint8Array(entries.length * 48);
  entries.forEach((entry, index) => {
    out[index * 48] = entry.kind;
    out[index * 48 + 1] = entry.bit;
    out.set(text(entry.name), index * 48 + 2);
  });
  return out;
}

function baseFields(overrides: Partial<Qcow2HeaderFields> = {}): Qcow2HeaderFields {
  return {
    version: 3,
    clusterBits: 16,
    size: 1 << 30,
    cryptMethod: 0,
    l1Size: 2,
    l1TableOffset: 0x30000,
    refcountTableOffset: 0x10000,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: { high: 0, low: 0 },
    compatibleFeatures: { high: 0, low: 1 },
    autoclearFeatures: { high: 0, low: 0 },
    refcountOrder: 4,
    headerLength: 112,
    compressionType: 0,
    backingFileName: 'base.qcow2',
    extensions: [
      { type: QCOW2_EXT_MAGIC_BACKING_FORMAT, data: text('qcow2') },
      { type: QCOW2_EXT_MAGIC_FEATURE_TABLE, data: featureTable([{ kind: 0, bit: 0, name: 'dirty bit' }]) },
      { type: 0x12345678, data: new Uint8Array([1, 2, 3]) },
    ],
    ...overrides,
  };
}

/** Encodes the base header, lets `mutate` poke at the bytes, decodes. */
function decodeMutated(mutate: (view: DataView, bytes: Uint8Array) => void, fields = baseFields()) {
  const bytes = encodeHeader(fields);
  mutate(new DataView(bytes.buffer), bytes);
  return decodeHeader(bytes);
}

function expectCode(action: () => unknown, code: string, message?: RegExp): void {
  try {
    action();
  } catch (error) {
    expect(isBlockDeviceError(error), String(error)).toBe(true);
    expect((error as { code: string }).code).toBe(code);
    if (message) expect((error as Error).message).toMatch(message);
    return;
  }
  throw new Error('expected an error');
}

describe('qcow2 header', () => {
  it('round-trips v3 with extensions, unknown ones kept, and the backing file name', () => {
    const header = decodeHeader(encodeHeader(baseFields()));
    expect(header.version).toBe(3);
    expect(header.clusterSize).toBe(65536);
    expect(header.size).toBe(1 << 30);
    expect(header.backingFileName).toBe('base.qcow2');
    expect(header.extensions.backingFormat).toBe('qcow2');
    expect(header.extensions.featureNames).toEqual([{ kind: 'incompatible', bit: 0, name: 'dirty bit' }]);
    expect(header.extensions.unknown).toEqual([{ type: 0x12345678, data: new Uint8Array([1, 2, 3]) }]);
    expect(header.extensions.list.map((e) => e.type)).toEqual([
      QCOW2_EXT_MAGIC_BACKING_FORMAT,
      QCOW2_EXT_MAGIC_FEATURE_TABLE,
      0x12345678,
    ]);
    expect(headerFlags(header).lazyRefcounts).toBe(true);
    // Re-encoding what was decoded gives the same bytes.
    const again = encodeHeader({ ...header, extensions: header.extensions.list });
    expect(again).toEqual(encodeHeader(baseFields()));
  });

  it('reads stored names as C strings, as QEMU: a NUL ends the backing file, its format and the data file name', () => {
    const header = decodeHeader(
      encodeHeader(
        baseFields({
          backingFileName: 'base.qcow2\u0000junk',
          incompatibleFeatures: { high: 0, low: 0b100 },
          extensions: [
            { type: QCOW2_EXT_MAGIC_BACKING_FORMAT, data: text('qcow2\u0000') },
            { type: QCOW2_EXT_MAGIC_DATA_FILE, data: text('disk.data\u0000\u0000') },
          ],
        }),
      ),
    );
    expect(header.backingFileName).toBe('base.qcow2');
    expect(header.extensions.backingFormat).toBe('qcow2');
    expect(header.extensions.dataFileName).toBe('disk.data');
  });

  it('round-trips v2 (refcount order 4, header length 72, no feature words)', () => {
    const header = decodeHeader(encodeHeader(baseFields({ version: 2, extensions: [] })));
    expect(header.version).toBe(2);
    expect(header.headerLength).toBe(72);
    expect(header.refcountOrder).toBe(4);
    expect(header.compatibleFeatures).toEqual({ high: 0, low: 0 });
  });

  it('decodes the data file name, zstd and extended L2 flags', () => {
    const header = decodeHeader(
      encodeHeader(
        baseFields({
          incompatibleFeatures: { high: 0, low: 0b11100 },
          l1Size: 4,
          autoclearFeatures: { high: 0, low: 2 },
          compressionType: 1,
          extensions: [{ type: QCOW2_EXT_MAGIC_DATA_FILE, data: text('disk.data') }],
        }),
      ),
    );
    expect(header.extensions.dataFileName).toBe('disk.data');
    expect(headerFlags(header)).toMatchObject({
      dataFile: true,
      dataFileRaw: true,
      extendedL2: true,
      compressionType: 'zstd',
    });
  });

  const bad: [string, (view: DataView, bytes: Uint8Array) => void, string, RegExp][] = [
    ['magic', (v) => v.setUint32(0, 0x12345678), 'ECORRUPT', /bad magic/],
    ['version 4', (v) => v.setUint32(4, 4), 'EUNSUPPORTED', /version 4/],
    ['cluster_bits 8', (v) => v.setUint32(20, 8), 'ECORRUPT', /cluster_bits/],
    ['cluster_bits 22', (v) => v.setUint32(20, 22), 'ECORRUPT', /cluster_bits/],
    ['header_length 96', (v) => v.setUint32(100, 96), 'ECORRUPT', /header_length/],
    ['header_length 108', (v) => v.setUint32(100, 108), 'ECORRUPT', /multiple of 8/],
    ['header_length past the cluster', (v) => v.setUint32(100, 70000), 'ECORRUPT', /exceeds the cluster/],
    ['refcount_order 7', (v) => v.setUint32(96, 7), 'ECORRUPT', /refcount_order/],
    ['crypt_method 3', (v) => v.setUint32(32, 3), 'ECORRUPT', /crypt_method/],
    ['backing name too long', (v) => v.setUint32(16, 1024), 'ECORRUPT', /too long/],
    ['backing name past the cluster', (v) => writeU64(v, 8, 65530), 'ECORRUPT', /first cluster/],
    ['backing name over the header', (v) => writeU64(v, 8, 8), 'ECORRUPT', /overlaps/],
    ['L1 too large', (v) => v.setUint32(36, 4 * 1024 * 1024 + 1), 'ECORRUPT', /L1 table/],
    ['L1 unaligned', (v) => writeU64(v, 40, 0x30200), 'ECORRUPT', /l1_table_offset/],
    ['L1 too small', (v) => v.setUint32(36, 1), 'ECORRUPT', /L1 table is too small/],
    ['size beyond 2^53', (v) => v.setUint32(24, 0xffffffff), 'ECORRUPT', /too large/],
    ['refcount table too large', (v) => v.setUint32(56, 129), 'ECORRUPT', /refcount table/],
    ['refcount table unaligned', (v) => writeU64(v, 48, 0x10008), 'ECORRUPT', /refcount_table_offset/],
    ['no refcount table', (v) => v.setUint32(56, 0), 'ECORRUPT', /no refcount table/],
    ['too many snapshots', (v) => v.setUint32(60, 65537), 'ECORRUPT', /snapshots/],
    [
      'snapshot table unaligned',
      (v) => {
        v.setUint32(60, 1);
        writeU64(v, 64, 0x1234);
      },
      'ECORRUPT',
      /snapshots_offset/,
    ],
    ['compression type 2', (_v, b) => (b[104] = 2), 'EUNSUPPORTED', /compression type 2/],
    ['zstd without the feature bit', (_v, b) => (b[104] = 1), 'ECORRUPT', /feature bit/],
    ['extension past the cluster', (v) => v.setUint32(116, 70000), 'ECORRUPT', /header extension/],
    [
      // QEMU checks every record's length before its type: the end marker's too.
      'end marker whose length runs past the cluster',
      (v) => {
        let at = 112;
        while (v.getUint32(at) !== 0) at += 8 + Math.ceil(v.getUint32(at + 4) / 8) * 8;
        v.setUint32(at + 4, 905969677);
      },
      'ECORRUPT',
      /header extension 0x0/,
    ],
    [
      'snapshot table unaligned with no snapshot (as QEMU)',
      (v) => writeU64(v, 64, 2),
      'ECORRUPT',
      /snapshots_offset/,
    ],
    [
      'unknown incompatible bit 9',
      (v) => v.setUint32(76, 1 << 9),
      'EUNSUPPORTED',
      /incompatible feature bit 9/,
    ],
    ['unknown incompatible bit 40', (v) => v.setUint32(72, 1 << 8), 'EUNSUPPORTED', /bit 40/],
  ];
  for (const [what, mutate, code, message] of bad) {
    it(`rejects ${what}`, () => expectCode(() => decodeMutated(mutate), code, message));
  }

  it('rejects extended L2 with clusters under 16 KiB', () => {
    const fields = baseFields({ clusterBits: 13, incompatibleFeatures: { high: 0, low: 16 }, l1Size: 100 });
    expectCode(() => decodeHeader(encodeHeader(fields)), 'ECORRUPT', /extended L2/);
  });

  it('names an unknown incompatible feature from the feature name table', () => {
    const fields = baseFields({
      incompatibleFeatures: { high: 0, low: 1 << 7 },
      extensions: [
        { type: QCOW2_EXT_MAGIC_FEATURE_TABLE, data: featureTable([{ kind: 0, bit: 7, name: 'teleport' }]) },
      ],
    });
    expectCode(() => decodeHeader(encodeHeader(fields)), 'EUNSUPPORTED', /'teleport'/);
  });

  it('names known features', () => {
    const header = decodeHeader(encodeHeader(baseFields()));
    expect(featureName(header, 'incompatible', 0)).toBe('dirty bit');
    expect(featureName(header, 'compatible', 0)).toBe('lazy refcounts');
    expect(featureName(header, 'autoclear', 5)).toBe('autoclear bit 5');
  });

  it('rejects a file shorter than a header', () => {
    expectCode(() => decodeHeader(encodeHeader(baseFields()).subarray(0, 50)), 'ECORRUPT', /too short/);
  });

  it('l1 size needed for a size', () => {
    expect(sizeToL1(1 << 30, 65536, false)).toBe(2);
    expect(sizeToL1(1 << 30, 65536, true)).toBe(4);
    expect(sizeToL1(0, 512, false)).toBe(0);
  });
});

describe('L1 and L2 entries', () => {
  it('round-trips L1 entries', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 2 ** 47 - 1 }), fc.boolean(), (cluster, copied) => {
        const l2Offset = cluster * 512;
        const { high, low } = encodeL1Entry({ l2Offset, copied });
        expect(decodeL1Entry(high, low)).toEqual({ l2Offset, copied, reservedBitsSet: false });
      }),
    );
    expect(decodeL1Entry(0x01000000, 0).reservedBitsSet).toBe(true);
    expect(decodeL1Entry(0, 1).reservedBitsSet).toBe(true);
  });

  it('classifies standard entries', () => {
    const normal = encodeL2Entry({ type: 'normal', hostOffset: 0x50000, copied: true });
    expect(classifyL2Entry(normal.high, normal.low, false, false)).toBe('normal');
    const zeroPlain = encodeL2Entry({ type: 'zero-plain' });
    expect(classifyL2Entry(zeroPlain.high, zeroPlain.low, false, false)).toBe('zero-plain');
    const zeroAlloc = encodeL2Entry({ type: 'zero-alloc', hostOffset: 0x60000 });
    expect(classifyL2Entry(zeroAlloc.high, zeroAlloc.low, false, false)).toBe('zero-alloc');
    expect(classifyL2Entry(0, 0, false, false)).toBe('unallocated');
    // With a data file, host offset 0 with COPIED is a normal cluster.
    expect(classifyL2Entry(0x80000000, 0, true, false)).toBe('normal');
    expect(classifyL2Entry(0x80000000, 0, false, false)).toBe('unallocated');
    expect(classifyL2Entry(0x40000000, 0x1234, false, false)).toBe('compressed');
  });

  it('decodes an L2 table entry with its fields', () => {
    const table = new Uint8Array(32);
    const view = new DataView(table.buffer);
    const entry = encodeL2Entry({ type: 'normal', hostOffset: 2 ** 40, copied: true });
    view.setUint32(16, entry.high);
    view.setUint32(20, entry.low);
    view.setUint32(24, 0x0000000f); // zero bits of subclusters 0..3
    view.setUint32(28, 0x000000f0); // allocated bits of subclusters 4..7
    const decoded = decodeL2Entry(table, 1, { extendedL2: true, hasDataFile: false });
    expect(decoded).toMatchObject({
      type: 'normal',
      hostOffset: 2 ** 40,
      copied: true,
      zeroBits: 15,
      allocBits: 0xf0,
    });
    expect(decodeL2Entry(table, 2, { extendedL2: false, hasDataFile: false }).reservedBitsSet).toBe(false);
  });

  it('classifies subclusters', () => {
    expect(classifySubcluster('normal', 0, 1, 0)).toBe('normal');
    expect(classifySubcluster('normal', 1, 0, 0)).toBe('zero-alloc');
    expect(classifySubcluster('normal', 0, 0, 0)).toBe('unallocated-alloc');
    expect(classifySubcluster('normal', 1, 1, 0)).toBe('invalid');
    expect(classifySubcluster('unallocated', 0, 0, 5)).toBe('unallocated');
    expect(classifySubcluster('unallocated', 1 << 5, 0, 5)).toBe('zero-plain');
    expect(classifySubcluster('unallocated', 0, 1 << 5, 5)).toBe('invalid');
    expect(classifySubcluster('unallocated', 0, 0x80000000, 31)).toBe('invalid');
    expect(classifySubcluster('compressed', 0, 0, 3)).toBe('compressed');
  });

  it('round-trips compressed descriptors for every cluster size', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 9, max: 21 }),
        fc.integer({ min: 0, max: 2 ** 40 }),
        fc.integer({ min: 1, max: 2 ** 21 }),
        (clusterBits, hostOffset, rawLength) => {
          const length = Math.min(rawLength, 2 ** clusterBits - 512 + 1);
          const { high, low } = encodeCompressedDescriptor(hostOffset, length, clusterBits);
          expect(classifyL2Entry(high, low, false, false)).toBe('compressed');
          const decoded = decodeCompressedDescriptor(high, low, clusterBits);
          expect(decoded.hostOffset).toBe(hostOffset);
          expect(decoded.compressedLength).toBeGreaterThanOrEqual(length);
          expect(decoded.compressedLength - length).toBeLessThan(512);
        },
      ),
    );
  });
});

describe('refcounts', () => {
  it('round-trip at every width', () => {
    for (let order = 0; order <= 6; order++) {
      const block = new Uint8Array(512);
      const count = refcountsPerBlock(512, order);
      const values = Array.from(
        { length: count },
        (_, index) => (index * 2654435761) % (maxRefcount(order) + 1),
      );
      for (const [index, value] of values.entries()) encodeRefcount(block, index, order, value);
      expect(values.map((_, index) => decodeRefcount(block, index, order))).toEqual(values);
    }
  });

  it('packs sub-byte widths least significant bits first', () => {
    const block = new Uint8Array(1);
    encodeRefcount(block, 1, 0, 1);
    expect(block[0]).toBe(0b10);
    encodeRefcount(block, 1, 1, 3);
    expect(block[0]).toBe(0b1110);
    expect(() => encodeRefcount(block, 0, 1, 4)).toThrow(/does not fit/);
  });

  it('decodes refcount tables and reports reserved bits', () => {
    const bytes = new Uint8Array(24);
    const view = new DataView(bytes.buffer);
    writeU64(view, 0, 0x10000);
    writeU64(view, 16, 0x20001);
    expect(decodeRefcountTable(bytes)).toEqual({ offsets: [0x10000, 0, 0x20000], reservedBitsSet: [2] });
  });
});

function snapshotEntry(options: {
  id: string;
  name: string;
  extra: Uint8Array;
  l1Offset?: number;
}): Uint8Array {
  const id = text(options.id);
  const name = text(options.name);
  const length = Math.ceil((40 + options.extra.length + id.length + name.length) / 8) * 8;
  const out = new Uint8Array(length);
  const view = new DataView(out.buffer);
  writeU64(view, 0, options.l1Offset ?? 0x40000);
  view.setUint32(8, 2);
  view.setUint16(12, id.length);
  view.setUint16(14, name.length);
  view.setUint32(16, 1700000000);
  view.setUint32(20, 5);
  writeU64(view, 24, 123456789);
  view.setUint32(32, 77);
  view.setUint32(36, options.extra.length);
  out.set(options.extra, 40);
  out.set(id, 40 + options.extra.length);
  out.set(name, 40 + options.extra.length + id.length);
  return out;
}

describe('snapshot table', () => {
  const extra = new Uint8Array(24);
  const extraView = new DataView(extra.buffer);
  writeU64(extraView, 0, 4096);
  writeU64(extraView, 8, 1 << 30);
  extraView.setUint32(16, 0xffffffff);
  extraView.setUint32(20, 0xffffffff);
  const table = new Uint8Array([
    ...snapshotEntry({ id: '1', name: 'first', extra }),
    ...snapshotEntry({ id: '2', name: 'second snapshot', extra: new Uint8Array(0) }),
  ]);

  it('decodes entries with and without extra data', () => {
    const result = decodeSnapshotTable(table, 2, 65536);
    if (result.kind !== 'done') throw new Error('expected done');
    expect(result.tableSize).toBe(table.length);
    expect(result.entries[0]).toMatchObject({
      id: '1',
      name: 'first',
      l1TableOffset: 0x40000,
      l1Size: 2,
      dateSec: 1700000000,
      dateNsec: 5,
      vmClockNsec: 123456789,
      vmStateSize: 4096,
      diskSize: 1 << 30,
      icount: undefined,
    });
    expect(result.entries[1]).toMatchObject({
      id: '2',
      name: 'second snapshot',
      vmStateSize: 77,
      diskSize: undefined,
    });
  });

  it('asks for more bytes instead of failing on a short buffer', () => {
    expect(decodeSnapshotTable(table.subarray(0, 50), 2, 65536)).toEqual({
      kind: 'need-more',
      needBytes: 40 + 24 + 6,
    });
  });

  it('rejects too much extra data and an unaligned L1 table', () => {
    const big = snapshotEntry({ id: '1', name: 'x', extra: new Uint8Array(1032) });
    expectCode(() => decodeSnapshotTable(big, 1, 65536), 'ECORRUPT', /extra data/);
    const unaligned = snapshotEntry({ id: '1', name: 'x', extra, l1Offset: 0x40200 });
    expectCode(() => decodeSnapshotTable(unaligned, 1, 65536), 'ECORRUPT', /not cluster-aligned/);
  });
});

describe('qcow v1', () => {
  function v1Header(mutate?: (view: DataView, bytes: Uint8Array) => void): Uint8Array {
    const bytes = new Uint8Array(64);
    const view = new DataView(bytes.buffer);
    view.setUint32(0, 0x514649fb);
    view.setUint32(4, 1);
    writeU64(view, 8, 48);
    view.setUint32(16, 8);
    writeU64(view, 24, 1 << 20);
    bytes[32] = 12;
    bytes[33] = 9;
    writeU64(view, 40, 56);
    bytes.set(text('base.img'), 48);
    mutate?.(view, bytes);
    return bytes;
  }

  it('decodes the header and the backing name', () => {
    expect(decodeQcowV1Header(v1Header())).toMatchObject({
      size: 1 << 20,
      clusterBits: 12,
      l2Bits: 9,
      l1Size: 1,
      l1TableOffset: 56,
      backingFileName: 'base.img',
    });
  });

  it('rejects bad fields', () => {
    expectCode(() => decodeQcowV1Header(v1Header((_v, b) => (b[32] = 17))), 'ECORRUPT', /cluster_bits/);
    expectCode(() => decodeQcowV1Header(v1Header((_v, b) => (b[33] = 14))), 'ECORRUPT', /l2_bits/);
    expectCode(() => decodeQcowV1Header(v1Header((v) => v.setUint32(36, 2))), 'ECORRUPT', /crypt_method/);
    expectCode(() => decodeQcowV1Header(v1Header((v) => v.setUint32(16, 2000))), 'ECORRUPT', /too long/);
    expectCode(() => decodeQcowV1Header(v1Header((v) => v.setUint32(4, 2))), 'EUNSUPPORTED', /version/);
  });

  it('decodes L2 entries', () => {
    expect(decodeQcowV1L2Entry(0, 0, 12)).toEqual({ type: 'unallocated' });
    expect(decodeQcowV1L2Entry(0, 0x3000, 12)).toEqual({ type: 'normal', hostOffset: 0x3000 });
    // Compressed: offset in the low 51 bits, size in the next 12.
    const size = 1000;
    const high = (0x80000000 | (size << (51 - 32)) | 1) >>> 0;
    expect(decodeQcowV1L2Entry(high, 0x200, 12)).toEqual({
      type: 'compressed',
      hostOffset: 2 ** 32 + 0x200,
      compressedLength: size,
    });
  });
});

describe('detectFormat', () => {
  it('probes like qemu-img for the three formats', () => {
    const head = new Uint8Array(8);
    const view = new DataView(head.buffer);
    view.setUint32(0, 0x514649fb);
    view.setUint32(4, 3);
    expect(detectFormat(head)).toBe('qcow2');
    view.setUint32(4, 2);
    expect(detectFormat(head)).toBe('qcow2');
    view.setUint32(4, 1);
    expect(detectFormat(head)).toBe('qcow');
    view.setUint32(0, 0);
    expect(detectFormat(head)).toBe('raw');
    expect(detectFormat(new Uint8Array(3))).toBe('raw');
  });
});

describe('codecs', () => {
  it('pure deflate decompresses a raw deflate stream followed by padding', async () => {
    const data = new Uint8Array(65536).map((_, index) => (index * 7) % 251);
    const compressed = deflateRawSync(data);
    const padded = new Uint8Array(compressed.length + 300);
    padded.set(compressed);
    padded.fill(0xaa, compressed.length);
    const output = new Uint8Array(65536);
    expect(await pureCodecs.decompress('deflate', padded, output)).toBe(65536);
    expect(output).toEqual(data);
  });

  it('rejects garbage; a deflate stream longer than the cluster fills it (as QEMU accepts)', async () => {
    await expect(
      pureCodecs.decompress('deflate', new Uint8Array([0xff, 0xff, 0xff]), new Uint8Array(512)),
    ).rejects.toMatchObject({
      code: 'ECORRUPT',
    });
    const compressed = deflateRawSync(new Uint8Array(4096).fill(3));
    const output = new Uint8Array(512);
    expect(await pureCodecs.decompress('deflate', compressed, output)).toBe(512);
    expect(output).toEqual(new Uint8Array(512).fill(3));
    expect(await nodeCodecs.decompress('deflate', compressed, output.fill(0))).toBe(512);
    expect(output).toEqual(new Uint8Array(512).fill(3));
    await expect(
      pureCodecs.decompress('zstd', new Uint8Array(16), new Uint8Array(512)),
    ).rejects.toMatchObject({
      code: 'ECORRUPT',
    });
  });

  it('measures a zstd frame (raw and RLE blocks, checksum)', () => {
    // Magic, descriptor (single segment, checksum, 1-byte content size), content size 5,
    // a last raw block of 5 bytes, a 4-byte checksum, then padding.
    const frame = [0x28, 0xb5, 0x2f, 0xfd, 0x24, 5, (5 << 3) | 1, 0, 0, 1, 2, 3, 4, 5, 9, 9, 9, 9];
    expect(zstdFrameLength(new Uint8Array([...frame, 0, 0, 0]))).toBe(frame.length);
    expect(() => zstdFrameLength(new Uint8Array(frame.slice(0, 10)))).toThrow(/truncated/);
  });
});

describe('TableCache', () => {
  const table = (size: number) => new Uint8Array(size);

  it('shares one load between concurrent misses and evicts least recently used first', async () => {
    const cache = new TableCache<Uint8Array>(3000);
    let loads = 0;
    const load = async (key: number) => {
      loads++;
      await new Promise((resolve) => setTimeout(resolve, 1));
      return table(1000 + key);
    };
    const [a, b] = await Promise.all([cache.get(0, load), cache.get(0, load)]);
    expect(a).toBe(b);
    expect(loads).toBe(1);
    await cache.get(1, load);
    await cache.get(0, load); // 0 becomes most recently used
    await cache.get(2, load); // over budget: evicts 1
    expect(cache.peek(1)).toBeUndefined();
    expect(cache.peek(0)).toBeDefined();
    expect(cache.stats.bytes).toBeLessThanOrEqual(3000);
  });

  it('does not cache a failed load', async () => {
    const cache = new TableCache<Uint8Array>(10_000);
    await expect(cache.get(5, () => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    expect(await cache.get(5, async () => table(10))).toHaveLength(10);
  });
});
