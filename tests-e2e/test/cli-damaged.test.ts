/**
 * Damaged images through the `qcow2` bin: each command ends quickly in one clear line and exit 1,
 * or in a verdict (check's 2/3), never a hang, a crash or a stack trace.
 */
import { openSync, readFileSync, truncateSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { QCOW2_BIN } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

/** Overwrites bytes of `file` at `offset`. */
function patch(file: string, offset: number, bytes: readonly number[]): void {
  const fd = openSync(file, 'r+');
  writeSync(fd, Buffer.from(bytes), 0, bytes.length, offset);
}

function u32(value: number): number[] {
  return [(value >>> 24) & 0xff, (value >>> 16) & 0xff, (value >>> 8) & 0xff, value & 0xff];
}

describe.skipIf(!haveTools)('qcow2 CLI on damaged images', () => {
  let dir: { path: string; remove: () => void };
  const at = (name: string) => join(dir.path, name);

  /** A 4 MiB qcow2 image (64 KiB clusters) with data in its first MiB. */
  function fresh(name: string, extra: readonly string[] = []): string {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ...extra, name, '4M'], { cwd: dir.path });
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', name], { cwd: dir.path });
    return name;
  }

  beforeAll(() => {
    dir = tempDir('qcowkit-damaged-');
    // cluster_bits (header offset 20) far out of range.
    patch(at(fresh('cluster-bits.qcow2')), 20, u32(40));
    // L1 table offset (40, 8 bytes) far past the end of the file.
    patch(at(fresh('l1-past-eof.qcow2')), 40, [0, 0, 0, 0x10, 0, 0, 0, 0]);
    // An unknown incompatible feature bit (bit 20 of the word at 72).
    patch(at(fresh('unknown-feature.qcow2')), 72, [0, 0, 0, 0, 0, 0x10, 0, 0]);
    // The file cut off in the middle of the guest data.
    truncateSync(at(fresh('truncated.qcow2')), 400_000);
    // The first L2 entry pointing into the header cluster.
    const l2 = fresh('l2-at-header.qcow2');
    const l1Offset = readFileSync(at(l2)).readUInt32BE(44);
    const l2Offset = readFileSync(at(l2)).readUInt32BE(l1Offset + 4);
    patch(at(l2), l2Offset, [0x80, 0, 0, 0, 0, 0, 0, 0]);
    // Garbage in a compressed cluster.
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'plain.qcow2', '4M'], { cwd: dir.path });
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -c -P 0x61 0 64k', 'plain.qcow2'], { cwd: dir.path });
    const map = JSON.parse(run('qemu-img', ['map', '--output=json', 'plain.qcow2'], { cwd: dir.path }));
    expect(map[0]).toMatchObject({ start: 0, data: true });
    // The compressed bytes follow the metadata: scribble over the last cluster of the file.
    const size = readFileSync(at('plain.qcow2')).length;
    patch(at('plain.qcow2'), size - 65536, new Array(65536).fill(0xee));
    // A backing-file loop: a -> b -> a.
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'loop-a.qcow2', '1M'], { cwd: dir.path });
    run(
      'qemu-img',
      ['create', '-q', '-f', 'qcow2', '-u', '-b', 'loop-a.qcow2', '-F', 'qcow2', 'loop-b.qcow2', '1M'],
      {
        cwd: dir.path,
      },
    );
    run(
      'qemu-img',
      ['rebase', '-q', '-u', '-f', 'qcow2', '-b', 'loop-b.qcow2', '-F', 'qcow2', 'loop-a.qcow2'],
      {
        cwd: dir.path,
      },
    );
  });
  afterAll(() => dir?.remove());

  const ours = (args: readonly string[]) => {
    const result = runStatus(process.execPath, [QCOW2_BIN, ...args], { cwd: dir.path });
    return result;
  };

  const expectOneLineFailure = (result: { status: number; stderr: string }, pattern?: RegExp) => {
    expect(result.status).toBe(1);
    expect(result.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(result.stderr).toMatch(/^qcow2: /);
    expect(result.stderr).not.toMatch(/\n\s+at /);
    if (pattern) expect(result.stderr).toMatch(pattern);
  };

  test.each([
    ['cluster-bits.qcow2', /cluster/i],
    ['l1-past-eof.qcow2', /L1/],
    ['unknown-feature.qcow2', /feature/i],
  ])('%s cannot be opened: info, map, convert and check say why in one line', (file, why) => {
    for (const args of [
      ['info', file],
      ['map', '--output=json', file],
      ['convert', '-O', 'raw', file, 'out.raw'],
      ['check', file],
    ]) {
      expectOneLineFailure(ours(args), why);
    }
  });

  test('a backing-file loop is caught (qemu-img would hang)', () => {
    expectOneLineFailure(ours(['convert', '-O', 'raw', 'loop-a.qcow2', 'out.raw']), /loop|chain/i);
    expectOneLineFailure(ours(['info', '--backing-chain', 'loop-a.qcow2']), /loop|chain/i);
  });

  test.each(['truncated.qcow2', 'l2-at-header.qcow2', 'plain.qcow2'])(
    '%s: reading fails in one line or succeeds; check gives a verdict like qemu-img',
    (file) => {
      const converted = ours(['convert', '-O', 'raw', file, 'out.raw']);
      if (converted.status !== 0) expectOneLineFailure(converted);
      const mine = ours(['check', '--output=json', file]);
      const theirs = runStatus('qemu-img', ['check', '--output=json', file], { cwd: dir.path });
      expect(mine.status).toBe(theirs.status);
      expect(mine.stderr).not.toMatch(/\n\s+at /);
    },
  );

  test('garbage in a compressed cluster is an error, not garbage data', () => {
    const theirs = runStatus('qemu-img', ['convert', '-O', 'raw', 'plain.qcow2', 'qemu.raw'], {
      cwd: dir.path,
    });
    expect(theirs.status).toBe(1);
    expectOneLineFailure(ours(['convert', '-O', 'raw', 'plain.qcow2', 'out.raw']));
  });
});
