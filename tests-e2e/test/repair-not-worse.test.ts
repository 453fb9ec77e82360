/**
 * Commands that write, run on damaged images: each either refuses and leaves the file as it was,
 * or leaves an image `qemu-img check` finds no worse than before (fewer or as many corruptions,
 * still checkable). Each image is made by qemu-img and damaged by hand, as an audit's fuzzer found
 * them: a misaligned L1 entry over leaked clusters, a truncated file whose refcount block and L2
 * table lie past its end, a refcount block that is the refcount table.
 */
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import {
  type QemuCheckVerdict,
  qemuCheckVerdict,
  requireTools,
  run,
  runStatus,
  tempDir,
} from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

describe.skipIf(!haveTools)('writes on damaged images never make them worse', () => {
  let dir: { path: string; remove: () => void };
  const at = (name: string) => join(dir.path, name);
  beforeAll(() => {
    dir = tempDir('qcowkit-damaged-write-');
  });
  afterAll(() => dir?.remove());

  /** qemu-img check's verdict on `file` (exit status, corruptions and check errors). */
  const qemuVerdict = (file: string): QemuCheckVerdict => qemuCheckVerdict(file, { cwd: dir.path });
  const hash = (file: string) =>
    createHash('sha256')
      .update(readFileSync(at(file)))
      .digest('hex');
  /** Patches the big-endian 64-bit word at `offset` of `file`. */
  const patchU64 = (file: string, offset: number, value: bigint) => {
    const bytes = readFileSync(at(file));
    bytes.writeBigUInt64BE(value, offset);
    writeFileSync(at(file), bytes);
  };
  const readU64 = (file: string, offset: number) => readFileSync(at(file)).readBigUInt64BE(offset);

  /** `check -r all` on `file`: the image after it is no worse by qemu-img check, and checkable. */
  const expectRepairNoWorse = (file: string) => {
    const before = qemuVerdict(file);
    expect(before.status, 'the damage is there').toBe(2);
    const repair = qcow2(['check', '-r', 'all', file], { cwd: dir.path });
    expect([0, 1, 2, 3]).toContain(repair.status);
    expect(repair.stderr).not.toMatch(/\bat .*\.js/);
    // A repair that cannot go on says why in one line (qemu-img check -r all fails there too).
    if (repair.status === 1) expect(repair.stderr).toMatch(/^qcow2: Check failed: [^\n]+\n$/);
    const after = qemuVerdict(file);
    expect(after.status, 'still checkable').not.toBe(1);
    expect(after.checkErrors).toBe(0);
    expect(after.corruptions).toBeLessThanOrEqual(before.corruptions);
  };

  test('check -r all: an L1 entry naming a misaligned L2 table in a leaked cluster (its COPIED flag follows the repair)', () => {
    const file = 'misaligned-l1.qcow2';
    run('qemu-img', ['create', '-q', '-f', 'qcow2', file, '16M'], { cwd: dir.path });
    run('qemu-io', ['-c', 'write -P 0 0 128k', file], { cwd: dir.path });
    // L1[0] keeps COPIED but now names the middle of its first data cluster: the L2 table and the
    // data leak, and the repair frees the cluster the entry names (refcount 0): QEMU clears the
    // flag then, and so must we, or the repair adds an OFLAG_COPIED corruption.
    const l1 = Number(readU64(file, 40));
    const l2 = Number(readU64(file, l1) & 0x00ff_ffff_ffff_fe00n);
    const data = Number(readU64(file, l2) & 0x00ff_ffff_ffff_fe00n);
    patchU64(file, l1, (1n << 63n) | BigInt(data + 0x800));
    expectRepairNoWorse(file);
    const after = runStatus('qemu-img', ['check', file], { cwd: dir.path });
    expect(after.stdout + after.stderr).not.toMatch(/OFLAG_COPIED/);
  });

  test('check -r all: a truncated file whose L2 table and refcount block lie past its end (nothing placed over them)', () => {
    const file = 'truncated.qcow2';
    run('qemu-img', ['create', '-q', '-f', 'qcow2', file, '16M'], { cwd: dir.path });
    run('qemu-io', ['-c', 'write -c -P 2 0 64k', file], { cwd: dir.path });
    const bytes = readFileSync(at(file));
    // Cut at the L2 table (0x40000); the refcount table's first entry names a block past the end.
    const cut = Buffer.from(bytes.subarray(0, 0x40000));
    cut.writeBigUInt64BE(0x50000n, Number(cut.readBigUInt64BE(48)));
    writeFileSync(at(file), cut);
    const before = readFileSync(at(file));
    expectRepairNoWorse(file);
    // The rebuild would have covered the L2 table the L1 table still names past the end: it is
    // refused before anything is written (QEMU's overlap check stops its own there too).
    expect(readFileSync(at(file)).equals(before)).toBe(true);
  });

  test.each([
    ['persistent bitmaps', ['bitmap', '--add', 'FILE', 'b0'], 'resize'],
    ['an external data file', [], 'resize'],
  ])(
    'resize refuses an image with %s whose refcount block is its refcount table; the files stay as they were',
    (what, extra) => {
      const file = `refblock-${what.replace(/\W+/g, '-')}.qcow2`;
      const create = ['create', '-q', '-f', 'qcow2'];
      if (what.includes('data file')) create.push('-o', `data_file=${file}.data`);
      run('qemu-img', [...create, file, '4M'], { cwd: dir.path });
      run('qemu-io', ['-c', 'write -P 3 0 64k', file], { cwd: dir.path });
      if (extra.length > 0)
        run(
          'qemu-img',
          extra.map((arg) => arg.replace('FILE', file)),
          { cwd: dir.path },
        );
      const table = Number(readU64(file, 48));
      patchU64(file, table, BigInt(table));
      const before = hash(file);
      const result = qcow2(['resize', file, '+1M'], { cwd: dir.path });
      expect(result.status).toBe(1);
      expect(result.stderr).toMatch(/^qcow2: Error resizing image: .*repair the image first/);
      expect(result.stderr.trimEnd().split('\n')).toHaveLength(1);
      expect(hash(file)).toBe(before);
    },
  );
});
