/**
 * `qcow2 convert --salvage` on damaged qcow2 images against qemu-img 7.2's: the same output bytes
 * (qemu-img compare), the same exit status, and qemu-img's warning lines on stderr (silenced by
 * `-q`). Each tool runs in its own copy of the folder holding the damaged images.
 */
import { cpSync, openSync, readFileSync, truncateSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

/** Overwrites bytes of `file` at `offset`. */
function patch(file: string, offset: number, bytes: Uint8Array): void {
  const fd = openSync(file, 'r+');
  writeSync(fd, bytes, 0, bytes.length, offset);
}

/** The 8-byte big-endian entry at `offset` of `bytes`, as a number (offsets fit in 2^53). */
function entry(bytes: Buffer, offset: number): number {
  return Number(bytes.readBigUInt64BE(offset) & 0x00ffffffffffffffn);
}

function u64(value: bigint): Uint8Array {
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64BE(value);
  return bytes;
}

describe.skipIf(!haveTools)('qcow2 convert --salvage on damaged images', () => {
  let dir: { path: string; remove: () => void };
  let round = 0;
  const seed = () => join(dir.path, 'seed');

  /** A 4 MiB image (64 KiB clusters): data in its first MiB and at 2 MiB, `extra` qemu-io writes. */
  const fresh = (name: string, ...extra: string[]) => {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', name, '4M'], { cwd: seed() });
    const writes = ['write -P 0x5a 0 1M', 'write -P 0x6b 2M 256k', ...extra];
    run('qemu-io', ['-f', 'qcow2', ...writes.flatMap((c) => ['-c', c]), name], { cwd: seed() });
    return join(seed(), name);
  };

  /** Where the L2 table of the first 512 MiB of `file` lies. */
  const firstL2 = (file: string) => {
    const bytes = readFileSync(file);
    return entry(bytes, entry(bytes, 40)) & ~0x1ff;
  };

  beforeAll(() => {
    dir = tempDir('qcowkit-salvage-');
    run('mkdir', ['-p', seed()]);
    // Garbage in a compressed cluster (at 1 MiB): its reads fail, its block status does not.
    const compressed = fresh('compressed.qcow2', 'write -c -P 0x61 1M 64k');
    const descriptor = readFileSync(compressed).readBigUInt64BE(firstL2(compressed) + 16 * 8);
    const hostOffset = Number(descriptor & ((1n << 54n) - 1n));
    patch(compressed, hostOffset, new Uint8Array(512 - (hostOffset % 512)).fill(0xee));
    // The L2 entry of cluster 3 pointing at a host offset that is not cluster-aligned: its block
    // status and its reads fail (qemu-img also prints a corruption line).
    const misaligned = fresh('misaligned.qcow2');
    patch(misaligned, firstL2(misaligned) + 3 * 8, u64((1n << 63n) | 0x50200n));
    // The L2 entry of cluster 3 pointing past the end of the file: reads as zeros (no error).
    const pastEnd = fresh('past-eof.qcow2');
    patch(pastEnd, firstL2(pastEnd) + 3 * 8, u64((1n << 63n) | (1n << 40n)));
    // The file cut off inside the guest data: the missing part reads as zeros (no error).
    truncateSync(fresh('truncated.qcow2'), 400_000);
    // A healthy image, to concatenate with a damaged one.
    fresh('healthy.qcow2');
    // 12 MiB of compressed clusters with every other 4 KiB of the file after the metadata (header,
    // refcount table and block, L1, L2: the first 320 KiB) garbled: failures in many reads.
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'spread.qcow2', '16M'], { cwd: seed() });
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -c -P 0x61 0 12M', 'spread.qcow2'], { cwd: seed() });
    const spread = join(seed(), 'spread.qcow2');
    const spreadSize = readFileSync(spread).length;
    for (let offset = 0x50000; offset < spreadSize; offset += 8192)
      patch(spread, offset, new Uint8Array(4096).fill(0xee));
  });
  afterAll(() => dir?.remove());

  const both = (args: readonly string[]) => {
    round++;
    const q = join(dir.path, `q${round}`);
    const o = join(dir.path, `o${round}`);
    cpSync(seed(), q, { recursive: true });
    cpSync(seed(), o, { recursive: true });
    return { theirs: runStatus('qemu-img', args, { cwd: q }), ours: qcow2(args, { cwd: o }), q, o };
  };

  /** The two tools' outputs hold the same guest (qemu-img compare). */
  const expectSameOutputs = (format: string, theirs: string, ours: string) => {
    const compare = runStatus('qemu-img', ['compare', '-f', format, '-F', format, theirs, ours]);
    expect(compare.status, compare.stdout).toBe(0);
  };

  /** qemu-img's stderr lines without its program name, and without the qcow2 driver's corruption
   * line (ours says nothing of the kind), next to ours without our program name. */
  const lines = (theirs: string, ours: string) => ({
    theirs: theirs
      .split('\n')
      .filter((line) => line !== '' && !line.startsWith('qcow2: Image is corrupt'))
      .map((line) => line.replace(/^qemu-img: /, '')),
    ours: ours
      .split('\n')
      .filter((line) => line !== '')
      .map((line) => line.replace(/^qcow2: /, '')),
  });

  test.each([
    ['compressed.qcow2', 'raw'],
    ['compressed.qcow2', 'qcow2'],
    ['misaligned.qcow2', 'raw'],
    ['misaligned.qcow2', 'qcow2'],
    ['past-eof.qcow2', 'raw'],
    ['truncated.qcow2', 'qcow2'],
  ])('%s -O %s: the same bytes, exit status and warnings as qemu-img', (file, format) => {
    const out = `out.${format}`;
    const { theirs, ours, q, o } = both(['convert', '--salvage', '-O', format, file, out]);
    expect(ours.status, ours.stderr).toBe(theirs.status);
    expect(ours.status).toBe(0);
    expect(ours.stdout).toBe('');
    expectSameOutputs(format, join(q, out), join(o, out));
    const seen = lines(theirs.stderr, ours.stderr);
    if (file === 'misaligned.qcow2') {
      // qemu-img reports a sector whose block status fails twice (once while counting the work,
      // once while copying) and orders the lines otherwise: the same lines, each once here.
      expect(ours.stderr).toMatch(
        /^qcow2: warning: error while reading block status at offset 196608: Input\/output error\n/,
      );
      expect([...new Set(seen.ours)].sort()).toEqual([...new Set(seen.theirs)].sort());
      expect(seen.ours).toHaveLength(new Set(seen.ours).size);
      expect(seen.ours).toHaveLength(256);
    } else {
      expect(seen.ours).toEqual(seen.theirs);
    }
    if (file === 'compressed.qcow2') {
      // One line per 512-byte sector of the 64 KiB cluster, at the guest offsets qemu-img names.
      expect(seen.ours).toHaveLength(128);
      expect(seen.ours[0]).toBe('warning: error while reading offset 1048576: Input/output error');
    }
    if (format === 'qcow2') run('qemu-img', ['check', '-q', join(o, out)]);
  });

  test.each([['raw'], ['qcow2']])(
    'failures in many reads -O %s: the same lines, ours in offset order',
    (format) => {
      const out = `out.${format}`;
      const { theirs, ours, q, o } = both(['convert', '--salvage', '-O', format, 'spread.qcow2', out]);
      expect(ours.status).toBe(theirs.status);
      expect(ours.status).toBe(0);
      const seen = lines(theirs.stderr, ours.stderr);
      expect(seen.ours.length).toBeGreaterThan(1000);
      // qemu-img's parallel requests interleave their lines; ours come in offset order.
      expect([...seen.ours].sort()).toEqual([...seen.theirs].sort());
      const offsets = seen.ours.map((line) => Number(/offset (\d+):/.exec(line)![1]));
      expect(offsets).toEqual([...offsets].sort((a, b) => a - b));
      expectSameOutputs(format, join(q, out), join(o, out));
    },
  );

  test.each([
    ['compressed.qcow2', 'raw'],
    ['misaligned.qcow2', 'qcow2'],
  ])('%s -O %s -q: nothing on stderr but what qemu-img prints with -q', (file, format) => {
    const out = `out.${format}`;
    const { theirs, ours, q, o } = both(['convert', '--salvage', '-q', '-O', format, file, out]);
    expect(ours.status).toBe(theirs.status);
    expect(ours.status).toBe(0);
    expect(ours.stderr).toBe('');
    expect(lines(theirs.stderr, '').theirs).toEqual([]);
    expectSameOutputs(format, join(q, out), join(o, out));
  });

  test('without --salvage both tools fail on the damaged cluster', () => {
    const { theirs, ours } = both(['convert', '-O', 'raw', 'compressed.qcow2', 'out.raw']);
    expect(theirs.status).toBe(1);
    expect(ours.status).toBe(1);
    expect(ours.stderr.trimEnd().split('\n')).toHaveLength(1);
  });

  test('several sources: each warning names the offset in its own source, as qemu-img', () => {
    const args = ['convert', '--salvage', '-O', 'raw', 'healthy.qcow2', 'compressed.qcow2', 'out.raw'];
    const { theirs, ours, q, o } = both(args);
    expect(ours.status).toBe(theirs.status);
    expect(lines(theirs.stderr, ours.stderr).ours).toEqual(lines(theirs.stderr, ours.stderr).theirs);
    expect(ours.stderr).toContain('error while reading offset 1048576:');
    run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', join(q, 'out.raw'), join(o, 'out.raw')]);
  });

  test('-n into an existing qcow2 image, and -c: the same bytes as qemu-img', () => {
    for (const flags of [['-n'], ['-c']]) {
      round++;
      const q = join(dir.path, `q${round}`);
      const o = join(dir.path, `o${round}`);
      for (const folder of [q, o]) {
        cpSync(seed(), folder, { recursive: true });
        run('qemu-img', ['create', '-q', '-f', 'qcow2', 'out.qcow2', '4M'], { cwd: folder });
        run('qemu-io', ['-c', 'write -P 0x77 0 4M', 'out.qcow2'], { cwd: folder });
      }
      const args = ['convert', '--salvage', ...flags, '-O', 'qcow2', 'misaligned.qcow2', 'out.qcow2'];
      expect(runStatus('qemu-img', args, { cwd: q }).status).toBe(0);
      const ours = qcow2(args, { cwd: o });
      expect(ours.status, ours.stderr).toBe(0);
      run('qemu-img', ['compare', '-q', join(q, 'out.qcow2'), join(o, 'out.qcow2')]);
      run('qemu-img', ['check', '-q', join(o, 'out.qcow2')]);
    }
  });
});
