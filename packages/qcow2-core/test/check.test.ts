/**
 * checkQcow2Image against qemu-img check: images made by qemu-img/qemu-io, some damaged by
 * patching bytes; for every one our JSON fields, our finding lines and our human summary must
 * equal qemu-img check's.
 */

import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { BlockDeviceError, MemoryBlockDevice } from '@qcowkit/blockdev';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { requireTools, run, runStatus, tempDir } from '../../../tests-e2e/src/tools.js';
import { MAX_CHECK_MESSAGES } from '../src/check/check-log.js';
import {
  checkQcow2Image,
  checkResultToQemuJson,
  checkVerdictExitCode,
  formatCheckResultHuman,
} from '../src/check/index.js';
import { formatPercent } from '../src/check/report.js';
import { suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');

/** Guest writes every image gets: data, compressed data, zeroes, a discard, unaligned bits. */
const COMPRESSED_AT = 6 << 20;
const writesFor = (clusterSize: string) => [
  'write -P 1 0 100k',
  `write -c ${COMPRESSED_AT} ${clusterSize}`,
  'write -z 2M 128k',
  'write -P 2 3M 64k',
  'discard 3M 64k',
  'write -P 3 4M 300k',
  'write 6000001 1000',
];

/** A qcow2 image on disk, patched through a Buffer. */
class Patch {
  bytes: Buffer;
  constructor(private readonly path: string) {
    this.bytes = readFileSync(path);
  }
  get clusterBits(): number {
    return this.bytes.readUInt32BE(20);
  }
  get extendedL2(): boolean {
    return this.bytes.readUInt32BE(4) === 3 && (this.bytes.readUInt32BE(76) & 0x10) !== 0;
  }
  u64(offset: number): bigint {
    return this.bytes.readBigUInt64BE(offset);
  }
  setU64(offset: number, value: bigint): void {
    this.bytes.writeBigUInt64BE(value, offset);
  }
  get l1Offset(): number {
    return Number(this.u64(40));
  }
  get reftableOffset(): number {
    return Number(this.u64(48));
  }
  /** Host offset of L2 entry `index` of the first L2 table. */
  l2Entry(index: number): number {
    const l2 = Number(this.u64(this.l1Offset) & 0x00fffffffffffe00n);
    return l2 + index * (this.extendedL2 ? 16 : 8);
  }
  /** Guest offset to the index of its entry in the first L2 table. */
  l2Index(guestOffset: number): number {
    return Math.floor(guestOffset / 2 ** this.clusterBits);
  }
  /** Sets the 16-bit refcount of host cluster `clusterIndex` (first refcount block). */
  setRefcount16(clusterIndex: number, value: number): void {
    const block = Number(this.u64(this.reftableOffset) & ~0x1ffn);
    this.bytes.writeUInt16BE(value, block + clusterIndex * 2);
  }
  dataCluster(index: number): number {
    return Number((this.u64(this.l2Entry(index)) & 0x00fffffffffffe00n) >> BigInt(this.clusterBits));
  }
  save(): void {
    writeFileSync(this.path, this.bytes);
  }
}

interface Case {
  name: string;
  create?: string[];
  clusterSize?: string;
  writes?: string[];
  after?: (path: string) => void;
  patch?: (image: Patch) => void;
}

const cases: Case[] = [
  { name: 'clean' },
  { name: 'empty', writes: [] },
  ...[1, 2, 4, 8, 32, 64].map((bits) => ({
    name: `refcount-bits-${bits}`,
    create: ['-o', `refcount_bits=${bits}`],
  })),
  { name: 'clusters-512', create: ['-o', 'cluster_size=512'], clusterSize: '512' },
  { name: 'clusters-2m', create: ['-o', 'cluster_size=2M'], clusterSize: '2M' },
  { name: 'extended-l2', create: ['-o', 'extended_l2=on'] },
  { name: 'extended-l2-128k', create: ['-o', 'extended_l2=on,cluster_size=128k'], clusterSize: '128k' },
  { name: 'zstd', create: ['-o', 'compression_type=zstd'] },
  { name: 'compat-0.10', create: ['-o', 'compat=0.10'] },
  {
    name: 'prealloc-metadata',
    create: ['-o', 'preallocation=metadata'],
    writes: writesFor('64k').filter((w) => !w.startsWith('write -c')),
  },
  {
    name: 'snapshots',
    after: (path) => {
      run('qemu-img', ['snapshot', '-c', 's1', path]);
      run('qemu-io', ['-c', 'write -P 5 0 200k', '-c', 'write -c 7M 64k', path]);
      run('qemu-img', ['snapshot', '-c', 's2', path]);
      run('qemu-io', ['-c', 'write -P 6 64k 64k', path]);
    },
  },
  {
    name: 'bitmap',
    writes: [],
    after: (path) => {
      run('qemu-img', ['bitmap', '--add', path, 'b0']);
      run('qemu-io', ['-c', 'write 0 1M', path]);
    },
  },
  {
    // Zero writes allocate L2 tables only, so they lie next to each other (read together).
    name: 'adjacent-l2-tables',
    create: ['-o', 'cluster_size=512'],
    writes: ['write -z 0 2M', 'write -P 1 3M 64k', 'write -z 5M 1M'],
  },
  {
    name: 'adjacent-l2-tables-damaged',
    create: ['-o', 'cluster_size=512'],
    writes: ['write -z 0 2M', 'write -P 1 3M 64k'],
    patch: (p) => {
      const third = Number(p.u64(p.l1Offset + 16) & 0x00fffffffffffe00n);
      p.setU64(third + 8, (1n << 63n) | (1n << 40n) | 1n);
      p.setU64(Number(p.u64(p.l1Offset + 24) & 0x00fffffffffffe00n), 1n << 62n);
    },
  },
  {
    name: 'bitmap-data-cluster-past-eof',
    writes: [],
    after: (path) => {
      run('qemu-img', ['bitmap', '--add', path, 'b0']);
      run('qemu-io', ['-c', 'write 0 1M', path]);
    },
    patch: (p) => {
      // Header extensions from header_length: the bitmaps one names the directory, whose first
      // entry names the bitmap table; point its first entry past the end of the file.
      let at = p.bytes.readUInt32BE(100);
      while (p.bytes.readUInt32BE(at) !== 0x23852875)
        at += 8 + Math.ceil(p.bytes.readUInt32BE(at + 4) / 8) * 8;
      const directory = Number(p.u64(at + 8 + 16));
      p.setU64(Number(p.u64(directory)), 1n << 36n);
    },
  },
  {
    // A crash with lazy refcounts: refcounts not yet written (corruptions until repaired).
    name: 'lazy-refcounts-crash',
    create: ['-o', 'lazy_refcounts=on'],
    writes: [],
    after: (path) => {
      runStatus('qemu-io', ['-c', 'write 0 300k', '-c', 'write -P 7 3M 64k', '-c', 'abort', path]);
    },
  },
  // Damage made by patching bytes.
  { name: 'refcount-decreased', patch: (p) => p.setRefcount16(p.dataCluster(0), 0) },
  { name: 'refcount-increased', patch: (p) => p.setRefcount16(p.dataCluster(0), 2) },
  { name: 'leak', patch: (p) => p.setU64(p.l2Entry(1), 0n) },
  {
    name: 'refcount-block-not-covering-itself',
    patch: (p) => p.setRefcount16(Number(p.u64(p.reftableOffset) & ~0x1ffn) / 65536, 0),
  },
  { name: 'header-refcount-zero', patch: (p) => p.setRefcount16(0, 0) },
  { name: 'copied-cleared', patch: (p) => p.setU64(p.l2Entry(1), p.u64(p.l2Entry(1)) & ~(1n << 63n)) },
  {
    // COPIED checked in the counting pass, refcounts of other widths than 16 bits.
    name: 'copied-cleared-8-bit',
    create: ['-o', 'refcount_bits=8'],
    patch: (p) => p.setU64(p.l2Entry(1), p.u64(p.l2Entry(1)) & ~(1n << 63n)),
  },
  {
    name: 'copied-cleared-extended-l2',
    create: ['-o', 'extended_l2=on'],
    patch: (p) => p.setU64(p.l2Entry(1), p.u64(p.l2Entry(1)) & ~(1n << 63n)),
  },
  {
    // A misaligned data cluster's COPIED flag too (the general path of the counting pass).
    name: 'copied-cleared-misaligned',
    patch: (p) => p.setU64(p.l2Entry(0), (p.u64(p.l2Entry(0)) + 0x200n) & ~(1n << 63n)),
  },
  { name: 'l1-copied-cleared', patch: (p) => p.setU64(p.l1Offset, p.u64(p.l1Offset) & ~(1n << 63n)) },
  { name: 'l2-entry-past-eof', patch: (p) => p.setU64(p.l2Entry(2), (1n << 63n) | (1n << 40n)) },
  { name: 'l2-entry-at-l1-table', patch: (p) => p.setU64(p.l2Entry(2), (1n << 63n) | BigInt(p.l1Offset)) },
  { name: 'l2-entry-misaligned', patch: (p) => p.setU64(p.l2Entry(0), p.u64(p.l2Entry(0)) + 0x200n) },
  { name: 'l2-reserved-bits', patch: (p) => p.setU64(p.l2Entry(0), p.u64(p.l2Entry(0)) | (1n << 60n) | 2n) },
  { name: 'l1-reserved-bits', patch: (p) => p.setU64(p.l1Offset, p.u64(p.l1Offset) | (1n << 60n)) },
  { name: 'l1-entry-past-eof', patch: (p) => p.setU64(p.l1Offset, (1n << 63n) | (1n << 36n)) },
  { name: 'l1-entry-misaligned', patch: (p) => p.setU64(p.l1Offset, p.u64(p.l1Offset) + 0x200n) },
  { name: 'l1-entry-at-header', patch: (p) => p.setU64(p.l1Offset, 1n << 63n) },
  {
    // Findings of several L1 entries and their L2 tables, in qemu-img's order.
    name: 'several-tables-damaged',
    create: ['-o', 'cluster_size=512'],
    clusterSize: '512',
    patch: (p) => {
      p.setU64(p.l2Entry(0), p.u64(p.l2Entry(0)) | (1n << 60n));
      p.setU64(p.l1Offset + 8, p.u64(p.l1Offset + 8) | (1n << 60n));
      p.setU64(p.l1Offset + 16, (1n << 63n) | (1n << 40n));
      p.setU64(p.l1Offset + 24, p.u64(p.l1Offset + 24) & ~(1n << 63n));
    },
  },
  { name: 'shared-data-cluster', patch: (p) => p.setU64(p.l2Entry(3), p.u64(p.l2Entry(0))) },
  {
    name: 'refcount-overflow-1-bit',
    create: ['-o', 'refcount_bits=1'],
    patch: (p) => p.setU64(p.l2Entry(3), p.u64(p.l2Entry(0))),
  },
  {
    name: 'compressed-copied',
    patch: (p) => {
      const at = p.l2Entry(p.l2Index(COMPRESSED_AT));
      p.setU64(at, p.u64(at) | (1n << 63n));
    },
  },
  {
    name: 'compressed-garbage-size',
    patch: (p) => {
      const at = p.l2Entry(p.l2Index(COMPRESSED_AT));
      p.setU64(at, p.u64(at) | (0xffn << 54n));
    },
  },
  {
    name: 'compressed-offset-huge',
    patch: (p) => {
      const at = p.l2Entry(p.l2Index(COMPRESSED_AT));
      p.setU64(at, (1n << 62n) | 0x33696f6e207479n);
    },
  },
  { name: 'reftable-reserved-bits', patch: (p) => p.setU64(p.reftableOffset, p.u64(p.reftableOffset) | 8n) },
  { name: 'reftable-misaligned', patch: (p) => p.setU64(p.reftableOffset, p.u64(p.reftableOffset) + 0x200n) },
  { name: 'reftable-outside', patch: (p) => p.setU64(p.reftableOffset + 8, 1n << 30n) },
  {
    name: 'reftable-points-at-l2',
    patch: (p) => p.setU64(p.reftableOffset + 8, p.u64(p.l1Offset) & ~(1n << 63n)),
  },
  {
    name: 'extended-l2-alloc-and-zero',
    create: ['-o', 'extended_l2=on'],
    patch: (p) => p.setU64(p.l2Entry(0) + 8, 0x0000_0001_0000_0001n),
  },
  {
    name: 'extended-l2-unallocated-with-bits',
    create: ['-o', 'extended_l2=on'],
    patch: (p) => p.setU64(p.l2Entry(200) + 8, 1n),
  },
  {
    name: 'extended-l2-compressed-with-bits',
    create: ['-o', 'extended_l2=on'],
    patch: (p) => p.setU64(p.l2Entry(p.l2Index(COMPRESSED_AT)) + 8, 1n),
  },
  ...[25, 50, 75, 85].map((percent) => ({
    name: `truncated-${percent}`,
    patch: (p: Patch) => {
      const length = Math.floor((p.bytes.length * percent) / 100 / 512) * 512;
      p.bytes = p.bytes.subarray(0, length);
    },
  })),
  {
    name: 'snapshot-l1-misaligned',
    after: (path) => run('qemu-img', ['snapshot', '-c', 's1', path]),
    patch: (p) => {
      const snapshots = Number(p.u64(64));
      p.setU64(snapshots, p.u64(snapshots) + 0x200n);
    },
  },
  {
    name: 'snapshot-l1-past-eof',
    after: (path) => run('qemu-img', ['snapshot', '-c', 's1', path]),
    patch: (p) => p.setU64(Number(p.u64(64)), 1n << 34n),
  },
  {
    name: 'snapshot-count-one-too-many',
    after: (path) => run('qemu-img', ['snapshot', '-c', 's1', path]),
    patch: (p) => p.bytes.writeUInt32BE(2, 60),
  },
  {
    name: 'snapshot-table-offset-past-eof',
    after: (path) => run('qemu-img', ['snapshot', '-c', 's1', path]),
    patch: (p) => p.setU64(64, 1n << 32n),
  },
  {
    name: 'snapshot-l1-size-too-large',
    after: (path) => run('qemu-img', ['snapshot', '-c', 's1', path]),
    patch: (p) => p.bytes.writeUInt32BE(0x100_0000, Number(p.u64(64)) + 8),
  },
  {
    name: 'snapshot-id-length-garbage',
    after: (path) => {
      run('qemu-img', ['snapshot', '-c', 's1', path]);
      run('qemu-img', ['snapshot', '-c', 's2', path]);
    },
    patch: (p) => p.bytes.writeUInt16BE(60000, Number(p.u64(64)) + 12),
  },
  {
    name: 'snapshot-l2-refcount-decreased',
    after: (path) => run('qemu-img', ['snapshot', '-c', 's1', path]),
    patch: (p) => p.setRefcount16(p.dataCluster(0), 1),
  },
];

describe.skipIf(!haveQemu)('checkQcow2Image agrees with qemu-img check', () => {
  const dir = suiteTempDir('qcowkit-check-');

  function makeImage(testCase: Case): string {
    const path = join(dir.path, `${testCase.name}.qcow2`);
    run('qemu-img', ['create', '-f', 'qcow2', ...(testCase.create ?? []), path, '8M']);
    const writes = testCase.writes ?? writesFor(testCase.clusterSize ?? '64k');
    if (writes.length > 0) run('qemu-io', [...writes.flatMap((w) => ['-c', w]), path]);
    testCase.after?.(path);
    if (testCase.patch !== undefined) {
      const patch = new Patch(path);
      testCase.patch(patch);
      patch.save();
    }
    return path;
  }

  it.each(cases)('$name', async (testCase) => {
    const path = makeImage(testCase);
    const json = runStatus('qemu-img', ['check', '--output=json', path]);
    const human = runStatus('qemu-img', ['check', path]);
    const result = await checkQcow2Image({ file: MemoryBlockDevice.from(readFileSync(path)) });

    const expected = JSON.parse(json.stdout) as Record<string, unknown>;
    const ours = checkResultToQemuJson(result, { filename: path });
    expect(ours).toEqual(expected);
    expect(Object.keys(ours)).toEqual(Object.keys(expected));
    const qemuLines = json.stderr.split('\n').filter((line) => line !== '' && !line.startsWith('qemu-img:'));
    expect(result.messages).toEqual(qemuLines);
    expect(formatCheckResultHuman(result)).toBe(human.stdout);
    expect(checkVerdictExitCode(result)).toBe(human.status);
    // Every patch must damage something qemu-img sees (else the case tests nothing).
    if (testCase.patch !== undefined) expect(human.status).not.toBe(0);
  });
});

describe.skipIf(!haveQemu)('differential fuzzing against qemu-img check', () => {
  it.each([
    ['64k', [], false],
    ['extended-l2', ['-o', 'extended_l2=on'], false],
    ['refcount-bits-2', ['-o', 'refcount_bits=2'], false],
    ['with a snapshot', [], true],
    ['64-bit refcounts with a snapshot', ['-o', 'refcount_bits=64'], true],
    ['512-byte clusters', ['-o', 'cluster_size=512'], false],
  ] as [string, string[], boolean][])(
    'random damage to tables, refcounts and snapshots (%s)',
    async (_name, createOptions, withSnapshot) => {
      const dir = tempDir('qcowkit-check-fuzz-');
      try {
        const basePath = join(dir.path, 'base.qcow2');
        run('qemu-img', ['create', '-q', '-f', 'qcow2', ...createOptions, basePath, '8M']);
        run('qemu-io', [
          ...[
            'write -P 1 0 200k',
            `write -c ${COMPRESSED_AT} 64k`,
            'write -z 2M 64k',
            'write 4M 64k',
          ].flatMap((command) => ['-c', command]),
          basePath,
        ]);
        if (withSnapshot) {
          run('qemu-img', ['snapshot', '-c', 's1', basePath]);
          run('qemu-io', ['-c', 'write -P 3 0 64k', basePath]);
        }
        const base = readFileSync(basePath);
        const l1 = Number(base.readBigUInt64BE(40));
        const reftable = Number(base.readBigUInt64BE(48));
        const l2 = Number(base.readBigUInt64BE(l1) & 0xfffffffffe00n);
        const refblock = Number(base.readBigUInt64BE(reftable) & ~0x1ffn);
        // [start, length] of the bytes worth damaging: L1 entry, L2 entries in use, reftable, refcounts.
        const regions: [number, number][] = [
          [l1, 8],
          [l2, 8 * 120],
          [reftable, 16],
          [refblock, 64],
        ];
        if (withSnapshot) {
          const snapshots = Number(base.readBigUInt64BE(64));
          regions.push([snapshots, 64], [Number(base.readBigUInt64BE(snapshots)), 8]);
        }
        const path = join(dir.path, 'fuzz.qcow2');
        let compared = 0;
        await fc.assert(
          fc.asyncProperty(
            fc.array(
              fc.record({
                region: fc.integer({ min: 0, max: regions.length - 1 }),
                at: fc.nat(),
                value: fc.integer({ min: 0, max: 255 }),
                flip: fc.boolean(),
              }),
              { minLength: 1, maxLength: 3 },
            ),
            async (damages) => {
              const bytes = Buffer.from(base);
              for (const { region, at, value, flip } of damages) {
                const [start, length] = regions[region]!;
                const offset = start + (at % length);
                bytes[offset] = flip ? bytes[offset]! ^ (1 << (value & 7)) : value;
              }
              writeFileSync(path, bytes);
              const qemu = spawnSync('qemu-img', ['check', '--output=json', path], {
                encoding: 'utf8',
                maxBuffer: 64 * 1024 * 1024,
              });
              const ours = await checkQcow2Image({ file: MemoryBlockDevice.from(bytes) }).catch(
                (e: unknown) => e,
              );
              if (!qemu.stdout.startsWith('{')) {
                // qemu-img could not open it: we must end in a typed error or a verdict.
                if (!(ours instanceof BlockDeviceError)) expect(ours).toHaveProperty('corruptions');
                return;
              }
              compared++;
              expect(ours).not.toBeInstanceOf(Error);
              const result = ours as Awaited<ReturnType<typeof checkQcow2Image>>;
              expect(checkResultToQemuJson(result, { filename: path })).toEqual(JSON.parse(qemu.stdout));
              const qemuLines = qemu.stderr
                .split('\n')
                .filter((line) => line !== '' && !line.startsWith('qemu-img:'));
              expect(result.messages.slice(0, MAX_CHECK_MESSAGES)).toEqual(
                qemuLines.slice(0, MAX_CHECK_MESSAGES),
              );
            },
          ),
          { numRuns: 60 },
        );
        expect(compared).toBeGreaterThan(30);
      } finally {
        dir.remove();
      }
    },
  );
});

describe.skipIf(!haveQemu)('images qemu-img cannot check make our check fail with a typed error', () => {
  it.each([
    [
      'too much snapshot extra data',
      (bytes: Buffer) => bytes.writeUInt32BE(2000, Number(bytes.readBigUInt64BE(64)) + 36),
    ],
    ['70000 snapshots', (bytes: Buffer) => bytes.writeUInt32BE(70000, 60)],
  ])('%s', async (_name, damage) => {
    const dir = tempDir('qcowkit-check-');
    try {
      const path = join(dir.path, 'bad.qcow2');
      run('qemu-img', ['create', '-f', 'qcow2', path, '8M']);
      run('qemu-img', ['snapshot', '-c', 's1', path]);
      const bytes = readFileSync(path);
      damage(bytes);
      writeFileSync(path, bytes);
      expect(runStatus('qemu-img', ['check', path]).status).toBe(1);
      const error = await checkQcow2Image({ file: MemoryBlockDevice.from(bytes) }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(BlockDeviceError);
      expect((error as BlockDeviceError).code).toBe('ECORRUPT');
    } finally {
      dir.remove();
    }
  });
});

describe('checkQcow2Image options', () => {
  async function smallImage(): Promise<MemoryBlockDevice> {
    const dir = tempDir('qcowkit-check-');
    try {
      const path = join(dir.path, 'small.qcow2');
      run('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=512', path, '64M']);
      run('qemu-io', ['-c', 'write -P 9 0 16M', path]);
      return MemoryBlockDevice.from(readFileSync(path));
    } finally {
      dir.remove();
    }
  }

  it.skipIf(!haveQemu)('reports progress, yields to the event loop, and honours abort', async () => {
    const file = await smallImage();
    const progress: [number, number][] = [];
    let timerRan = false;
    setTimeout(() => {
      timerRan = true;
    }, 0);
    const result = await checkQcow2Image(
      { file },
      { onProgress: (done, total) => progress.push([done, total]) },
    );
    expect(timerRan).toBe(true);
    expect(result.allocatedClusters).toBe(32768);
    expect(progress.length).toBeGreaterThan(1);
    for (let i = 1; i < progress.length; i++)
      expect(progress[i]![0]).toBeGreaterThanOrEqual(progress[i - 1]![0]);
    const [lastDone, lastTotal] = progress.at(-1)!;
    expect(lastDone).toBe(lastTotal);

    const controller = new AbortController();
    const aborted = checkQcow2Image({ file }, { signal: controller.signal });
    controller.abort(new Error('stop'));
    await expect(aborted).rejects.toThrow('stop');
  });

  it.skipIf(!haveQemu)(
    'refuses, without allocating, a file that would need over 1 GiB of counters',
    async () => {
      const dir = tempDir('qcowkit-check-');
      try {
        const path = join(dir.path, 'small.qcow2');
        run('qemu-img', ['create', '-f', 'qcow2', path, '1M']);
        const bytes = readFileSync(path);
        // 64 TiB of file at 64 KiB clusters: 2^30 clusters of 16-bit counters.
        const file = new MemoryBlockDevice(2 ** 46);
        await file.write(0, bytes);
        await expect(checkQcow2Image({ file })).rejects.toMatchObject({ code: 'EUNSUPPORTED' });
      } finally {
        dir.remove();
      }
    },
  );

  it('rejects a file that is not qcow2 with a typed error, also when asked to repair', async () => {
    const notQcow2 = MemoryBlockDevice.from(new Uint8Array(65536).fill(7));
    await expect(checkQcow2Image({ file: notQcow2 }, { repair: 'leaks' })).rejects.toMatchObject({
      code: 'ECORRUPT',
    });
    const error = await checkQcow2Image({ file: notQcow2 }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(BlockDeviceError);
    expect((error as BlockDeviceError).code).toBe('ECORRUPT');
  });

  it("formats percentages like C's %0.2f (ties to even)", () => {
    expect(formatPercent(10.625)).toBe('10.62');
    expect(formatPercent(10.675)).toBe((10.675).toFixed(2));
    expect(formatPercent(0.125)).toBe('0.12');
    expect(formatPercent(0.375)).toBe('0.38');
    expect(formatPercent(100)).toBe('100.00');
    expect(formatPercent(33.333333)).toBe('33.33');
  });
});
