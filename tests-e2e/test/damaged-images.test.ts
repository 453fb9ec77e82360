/**
 * Damaged images end in a typed BlockDeviceError or a check verdict: quickly (the test timeout is
 * the bound), in bounded memory, never a hang or an untyped exception. Library level through
 * `openImage`, then the `qcow2` CLI on a few of them. Images are made by qemu-img at test time and
 * damaged by patching bytes.
 */
import { readFileSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { Qcow2Image } from '@qcowkit/qcow2-core';
import { openImage } from '@qcowkit/qcow2-core/node';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

/** Bytes read from a device per request, and at most per image (huge virtual sizes are sampled). */
const READ_CHUNK = 1 << 20;
const READ_LIMIT = 32 << 20;
/** RSS growth allowed around one open + read + check. */
const RSS_LIMIT = 300 * 1024 * 1024;

type Outcome =
  | { kind: 'error'; code: string; message: string }
  | { kind: 'opened'; format: string; checkCorruptions?: number; checkLeaks?: number; readError?: string };

/** Reads `device` in chunks: all of it up to READ_LIMIT, else the start and the end. */
async function readSome(device: BlockDevice): Promise<void> {
  const ranges: [number, number][] =
    device.size <= READ_LIMIT
      ? [[0, device.size]]
      : [
          [0, READ_LIMIT / 2],
          [device.size - READ_LIMIT / 2, device.size],
        ];
  for (const [start, end] of ranges) {
    for (let offset = start; offset < end; offset += READ_CHUNK) {
      await device.read(offset, Math.min(READ_CHUNK, end - offset));
    }
  }
}

/**
 * Opens, reads and checks an image. Any error must be a BlockDeviceError: it is returned as the
 * outcome; anything else is rethrown (and fails the test).
 */
async function attempt(path: string, options: { format?: 'qcow2' } = {}): Promise<Outcome> {
  const rssBefore = process.memoryUsage().rss;
  let outcome: Outcome;
  try {
    const opened = await openImage(path, { ...options, forceShare: true });
    try {
      outcome = { kind: 'opened', format: opened.format };
      try {
        await readSome(opened.device);
      } catch (error) {
        if (!(error instanceof BlockDeviceError)) throw error;
        outcome.readError = error.code;
      }
      if (opened.image instanceof Qcow2Image) {
        const result = await opened.image.check();
        outcome.checkCorruptions = result.corruptions;
        outcome.checkLeaks = result.leaks;
      }
    } finally {
      await opened.close();
    }
  } catch (error) {
    if (!(error instanceof BlockDeviceError)) throw error;
    outcome = { kind: 'error', code: error.code, message: error.message };
  }
  expect(process.memoryUsage().rss - rssBefore).toBeLessThan(RSS_LIMIT);
  return outcome;
}

/** Header field patches: [name, offset, bytes to write]. */
function u32(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value >>> 0);
  return b;
}
function u64(value: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(value);
  return b;
}

describe.skipIf(!haveTools)('damaged images', () => {
  let dir: { path: string; remove: () => void };
  let base: Buffer;
  let basePath: string;
  let l1Offset: number;
  let l2Offset: number;
  let reftableOffset: number;

  beforeAll(() => {
    dir = tempDir('qcowkit-damaged-');
    basePath = join(dir.path, 'base.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', basePath, '4M']);
    run('qemu-io', ['-c', 'write -P 1 0 200k', '-c', 'write -c 1M 64k', '-c', 'write -z 2M 64k', basePath]);
    base = readFileSync(basePath);
    l1Offset = Number(base.readBigUInt64BE(40));
    l2Offset = Number(base.readBigUInt64BE(l1Offset) & 0x00fffffffffffe00n);
    reftableOffset = Number(base.readBigUInt64BE(48));
  });
  afterAll(() => dir?.remove());

  /** Writes a copy of the base image with `patches` applied and returns its path. */
  function damaged(name: string, patches: [number, Buffer][], length?: number): string {
    const bytes = Buffer.from(base);
    for (const [offset, data] of patches) data.copy(bytes, offset);
    const path = join(dir.path, `${name}.qcow2`);
    writeFileSync(path, length === undefined ? bytes : bytes.subarray(0, length));
    return path;
  }

  test('the undamaged base image opens, reads and checks clean', async () => {
    expect(await attempt(basePath)).toEqual({
      kind: 'opened',
      format: 'qcow2',
      checkCorruptions: 0,
      checkLeaks: 0,
    });
  });

  // Header fields. The expected code is what a mutated field must give.
  const headerCases: [string, () => [number, Buffer][], string][] = [
    ['version 4', () => [[4, u32(4)]], 'EUNSUPPORTED'],
    ['version 0', () => [[4, u32(0)]], 'EUNSUPPORTED'],
    ['cluster_bits 8', () => [[20, u32(8)]], 'ECORRUPT'],
    ['cluster_bits 22', () => [[20, u32(22)]], 'ECORRUPT'],
    ['size 2^60', () => [[24, u64(1n << 60n)]], 'ECORRUPT'],
    ['l1_size huge', () => [[36, u32(0xffff_ffff)]], 'ECORRUPT'],
    ['l1_size too small', () => [[36, u32(0)]], 'ECORRUPT'],
    ['l1_table_offset misaligned', () => [[40, u64(BigInt(l1Offset + 512))]], 'ECORRUPT'],
    ['l1_table_offset past EOF', () => [[40, u64(1n << 40n)]], 'ECORRUPT'],
    ['refcount_table_offset past EOF', () => [[48, u64(1n << 40n)]], 'ECORRUPT'],
    ['refcount_table_offset 0', () => [[48, u64(0n)]], 'ECORRUPT'],
    ['refcount_table_clusters huge', () => [[56, u32(0xffff_ffff)]], 'ECORRUPT'],
    ['refcount_order 7', () => [[96, u32(7)]], 'ECORRUPT'],
    ['header_length odd', () => [[100, u32(105)]], 'ECORRUPT'],
    ['header_length too big', () => [[100, u32(0x20000)]], 'ECORRUPT'],
    ['header_length too small', () => [[100, u32(64)]], 'ECORRUPT'],
    ['extension length past the cluster', () => [[116, u32(0x10000)]], 'ECORRUPT'],
    ['nb_snapshots 70000', () => [[60, u32(70000)]], 'ECORRUPT'],
    [
      'snapshot table past EOF',
      () => [
        [60, u32(1)],
        [64, u64(1n << 40n)],
      ],
      'ECORRUPT',
    ],
    ['unknown incompatible bit 5', () => [[79, Buffer.from([0x20])]], 'EUNSUPPORTED'],
    ['crypt_method 1 (AES)', () => [[32, u32(1)]], 'EUNSUPPORTED'],
    ['crypt_method 2 (LUKS)', () => [[32, u32(2)]], 'EUNSUPPORTED'],
    ['crypt_method 3', () => [[32, u32(3)]], 'ECORRUPT'],
    [
      'backing file name past the cluster',
      () => [
        [8, u64(0xfff0n)],
        [16, u32(100)],
      ],
      'ECORRUPT',
    ],
  ];

  test.each(headerCases)('header: %s -> %s', async (name, patches, code) => {
    const outcome = await attempt(damaged(name.replace(/\W+/g, '-'), patches()), { format: 'qcow2' });
    expect(outcome).toMatchObject({ kind: 'error', code });
  });

  test('bad magic: probed as raw (as qemu-img does), refused as qcow2', async () => {
    const path = damaged('magic', [[0, u32(0x12345678)]]);
    expect(await attempt(path)).toMatchObject({ kind: 'opened', format: 'raw' });
    expect(await attempt(path, { format: 'qcow2' })).toMatchObject({ kind: 'error', code: 'ECORRUPT' });
  });

  test('unknown incompatible bit 5 named by the feature name table', async () => {
    // qemu-img writes a feature name table at 112: entries of 48 bytes from 120 (type, bit, name).
    const bytes = Buffer.from(base);
    expect(bytes.readUInt32BE(112)).toBe(0x6803f857);
    const entry = 120 + 4 * 48; // the "extended l2" entry (incompatible bit 4) becomes bit 5
    expect(bytes[entry]).toBe(0);
    bytes[entry + 1] = 5;
    bytes.fill(0, entry + 2, entry + 48);
    bytes.write('time travel', entry + 2, 'latin1');
    bytes[79] = bytes[79]! | 0x20;
    const path = join(dir.path, 'named-bit.qcow2');
    writeFileSync(path, bytes);
    const outcome = await attempt(path);
    expect(outcome).toMatchObject({ kind: 'error', code: 'EUNSUPPORTED' });
    expect((outcome as { message: string }).message).toContain('time travel');
  });

  // Table entries: the open succeeds; reads fail with a typed error or the check says what is wrong.
  const entryCases: [string, () => [number, Buffer][]][] = [
    ['l1_table_offset 0 (the L1 table is the header)', () => [[40, u64(0n)]]],
    ['L1 entry past EOF', () => [[l1Offset, u64((1n << 63n) | (1n << 40n))]]],
    ['L1 entry at the header', () => [[l1Offset, u64(1n << 63n)]]],
    ['L1 entry misaligned', () => [[l1Offset, u64(BigInt(l2Offset + 512) | (1n << 63n))]]],
    ['L1 entry reserved bits', () => [[l1Offset, u64(BigInt(l2Offset) | (1n << 63n) | (1n << 60n))]]],
    ['L2 entry past EOF', () => [[l2Offset, u64((1n << 63n) | (1n << 40n))]]],
    ['L2 entry at the L1 table', () => [[l2Offset, u64((1n << 63n) | BigInt(l1Offset))]]],
    ['L2 entry misaligned', () => [[l2Offset, u64(base.readBigUInt64BE(l2Offset) + 0x200n)]]],
    ['L2 entry reserved bits', () => [[l2Offset, u64(base.readBigUInt64BE(l2Offset) | (1n << 60n))]]],
    ['refcount table entry past EOF', () => [[reftableOffset, u64(1n << 40n)]]],
    [
      'refcount table entry misaligned',
      () => [[reftableOffset, u64(base.readBigUInt64BE(reftableOffset) + 512n)]],
    ],
    [
      'compressed descriptor: huge sector count',
      () => [[l2Offset + 16 * 8, u64(base.readBigUInt64BE(l2Offset + 16 * 8) | (0xffn << 54n))]],
    ],
    ['compressed descriptor: offset past EOF', () => [[l2Offset + 16 * 8, u64((1n << 62n) | (1n << 40n))]]],
  ];

  test.each(entryCases)(
    'table entries: %s -> a typed read error or a check verdict',
    async (name, patches) => {
      const outcome = await attempt(damaged(name.replace(/\W+/g, '-'), patches()));
      if (outcome.kind === 'opened') {
        expect(outcome.format).toBe('qcow2');
        expect(outcome.readError !== undefined || (outcome.checkCorruptions ?? 0) > 0).toBe(true);
      } else {
        expect(['ECORRUPT', 'EIO']).toContain(outcome.code);
      }
    },
  );

  test('garbage compressed data: reading that cluster fails with a typed error', async () => {
    // Find the compressed cluster's bytes and overwrite them.
    const entry = base.readBigUInt64BE(l2Offset + 16 * 8);
    expect(entry >> 62n).toBe(1n);
    const hostOffset = Number(entry & ((1n << 54n) - 1n));
    const path = damaged('garbage-compressed', [[hostOffset, Buffer.alloc(256, 0xa5)]]);
    const opened = await openImage(path);
    try {
      const error = await opened.device.read(1 << 20, 65536).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(BlockDeviceError);
      expect(['ECORRUPT', 'EIO']).toContain((error as BlockDeviceError).code);
    } finally {
      await opened.close();
    }
  });

  test.each([64, 512, 4096, 65536 + 100, 0.5, 0.75, 0.95])(
    'truncated at %s: a typed error or a verdict',
    async (at) => {
      const length = at < 1 ? Math.floor(base.length * at) : at;
      const path = damaged(`truncated-${at}`, [], length);
      const outcome = await attempt(path, { format: 'qcow2' });
      if (outcome.kind === 'error') expect(['ECORRUPT', 'EIO', 'EUNSUPPORTED']).toContain(outcome.code);
      else expect(outcome.readError !== undefined || (outcome.checkCorruptions ?? 0) > 0).toBe(true);
    },
  );

  test('backing loops: a -> a and a -> b -> a', async () => {
    const a = join(dir.path, 'loop-a.qcow2');
    const b = join(dir.path, 'loop-b.qcow2');
    const self = join(dir.path, 'loop-self.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', b, '1M']);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'loop-b.qcow2', '-F', 'qcow2', a, '1M']);
    run('qemu-img', ['rebase', '-q', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', b]);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', self, '1M']);
    run('qemu-img', ['rebase', '-q', '-u', '-b', 'loop-self.qcow2', '-F', 'qcow2', self]);
    for (const path of [a, self]) {
      const outcome = await attempt(path);
      expect(outcome).toMatchObject({ kind: 'error' });
      expect(['ECORRUPT', 'EUNSUPPORTED', 'EINVAL']).toContain((outcome as { code: string }).code);
      expect((outcome as { message: string }).message).toMatch(/loop|chain/i);
    }
  });

  test('a backing chain 70 layers deep is refused', async () => {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir.path, 'chain-00.qcow2'), '1M']);
    // Every layer has the same content but names the layer below it: copy and patch the name.
    run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-b',
      'chain-00.qcow2',
      '-F',
      'qcow2',
      join(dir.path, 'tpl.qcow2'),
      '1M',
    ]);
    const template = readFileSync(join(dir.path, 'tpl.qcow2'));
    const nameOffset = Number(template.readBigUInt64BE(8));
    for (let layer = 1; layer <= 70; layer++) {
      const bytes = Buffer.from(template);
      bytes.write(`chain-${String(layer - 1).padStart(2, '0')}.qcow2`, nameOffset, 'latin1');
      writeFileSync(join(dir.path, `chain-${String(layer).padStart(2, '0')}.qcow2`), bytes);
    }
    const outcome = await attempt(join(dir.path, 'chain-70.qcow2'));
    expect(outcome).toMatchObject({ kind: 'error' });
    expect((outcome as { message: string }).message).toMatch(/deep|depth|chain/i);
  });

  test('a backing file that is a symlink to the overlay itself is a loop too', async () => {
    const top = join(dir.path, 'sym-top.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', top, '1M']);
    symlinkSync(top, join(dir.path, 'sym-link.qcow2'));
    run('qemu-img', ['rebase', '-q', '-u', '-b', 'sym-link.qcow2', '-F', 'qcow2', top]);
    expect(await attempt(top)).toMatchObject({ kind: 'error' });
  });

  test('4M L1 entries pointing past the end: a verdict in bounded memory (qemu-img takes minutes)', async () => {
    // A 1 TiB guest whose 32 MiB L1 table (inside the file) names 4M distinct L2 tables past EOF.
    const path = join(dir.path, 'huge-l1.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', path, '1T']);
    const header = readFileSync(path);
    const entries = 4 * 1024 * 1024;
    const l1 = Buffer.alloc(entries * 8);
    for (let i = 0; i < entries; i++)
      l1.writeBigUInt64BE((1n << 63n) | ((1n << 40n) + BigInt(i) * 65536n), i * 8);
    const head = Buffer.alloc(1 << 20);
    header.copy(head);
    const bytes = Buffer.concat([head, l1]);
    bytes.writeUInt32BE(entries, 36);
    bytes.writeBigUInt64BE(1n << 20n, 40);
    writeFileSync(path, bytes);
    const outcome = await attempt(path);
    expect(outcome).toMatchObject({ kind: 'opened', format: 'qcow2' });
    expect((outcome as { checkCorruptions: number }).checkCorruptions).toBeGreaterThanOrEqual(entries);
  });

  test('fuzzed header bytes never give an untyped exception or a hang', async () => {
    let opened = 0;
    let failed = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.integer({ min: 0, max: 511 }), fc.integer({ min: 0, max: 255 })), {
          minLength: 1,
          maxLength: 6,
        }),
        async (mutations) => {
          const bytes = Buffer.from(base);
          for (const [offset, value] of mutations) bytes[offset] = value;
          const path = join(dir.path, 'fuzz.qcow2');
          writeFileSync(path, bytes);
          const outcome = await attempt(path, { format: 'qcow2' });
          if (outcome.kind === 'error') failed++;
          else opened++;
        },
      ),
      { numRuns: 300 },
    );
    expect(opened + failed).toBe(300);
  });

  test('the qcow2 CLI: one line on stderr and exit 1 for images it cannot open', () => {
    const cases = [
      damaged('cli-version', [[4, u32(9)]]),
      damaged('cli-l1', [[36, u32(0xffff_ffff)]]),
      damaged('cli-bit5', [[79, Buffer.from([0x20])]]),
    ];
    for (const path of cases) {
      for (const command of [['info'], ['check'], ['convert', '-O', 'raw']]) {
        const args = command[0] === 'convert' ? [...command, path, `${path}.raw`] : [...command, path];
        const result = qcow2(args, { cwd: dir.path });
        expect(result.status).toBe(1);
        expect(result.stderr.trim().split('\n')).toHaveLength(1);
        expect(result.stderr).not.toMatch(/\n\s+at /);
      }
    }
    // A damaged but openable image: check gives qemu-img's verdict (2: corruptions).
    const corrupt = damaged('cli-check', [[l2Offset + 8, u64((1n << 63n) | (1n << 40n))]]);
    expect(qcow2(['check', corrupt], { cwd: dir.path }).status).toBe(2);
    truncateSync(corrupt, 0);
  });
});
