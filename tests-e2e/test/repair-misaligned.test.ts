/**
 * `qcow2 check` and `check -r leaks|all` against qemu-img on images whose L1/L2 entries name
 * misaligned host offsets (tests-e2e/src/damaged-l2.ts makes them): the same verdict on the
 * damaged image; after each tool's own repair the same qemu-img check verdict and the same lines;
 * after `-r all` the same guest data wherever QEMU can read its repaired image.
 */
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { DAMAGED_L2_CASES } from '../src/damaged-l2.js';
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

/** stderr lines of a check, without the tool's own error line. */
const findings = (stderr: string): string[] =>
  stderr.split('\n').filter((line) => line !== '' && !/^(qemu-img|qcow2): /.test(line));

describe.skipIf(!haveTools)('check and repair of misaligned L1/L2 entries, as qemu-img', () => {
  let dir: { path: string; remove: () => void };
  const at = (name: string) => join(dir.path, name);
  beforeAll(() => {
    dir = tempDir('qcowkit-misaligned-');
  });
  afterAll(() => dir?.remove());

  const verdict = (file: string): QemuCheckVerdict => qemuCheckVerdict(file, { cwd: dir.path });

  /** The guest bytes of `[offset, offset + length)` as qemu-img reads them (raw window). */
  const guestBytes = (file: string, offset: number, length: number, out: string): Buffer => {
    const options = `driver=raw,offset=${offset},size=${length},file.driver=qcow2,file.file.filename=${at(file)}`;
    run('qemu-img', ['convert', '-O', 'raw', '--image-opts', options, at(out)]);
    return readFileSync(at(out));
  };

  /** The complement of `ranges` within `[0, size)`. */
  const definedRanges = (size: number, ranges: readonly (readonly [number, number])[]) => {
    const out: [number, number][] = [];
    let from = 0;
    for (const [offset, length] of [...ranges].sort((a, b) => a[0] - b[0])) {
      if (offset > from) out.push([from, offset - from]);
      from = Math.max(from, offset + length);
    }
    if (from < size) out.push([from, size - from]);
    return out;
  };

  test.each(DAMAGED_L2_CASES.map((c, index) => ({ ...c, index })))('$name', ({ build, size, index }) => {
    const damaged = `case-${index}.qcow2`;
    const image = build(dir.path, damaged);

    // The check: qemu-img's verdict, lines and summary.
    const theirCheck = runStatus('qemu-img', ['check', damaged], { cwd: dir.path });
    const ourCheck = qcow2(['check', damaged], { cwd: dir.path });
    expect(theirCheck.status, image.about).toBe(2);
    expect(ourCheck.status).toBe(theirCheck.status);
    expect(ourCheck.stdout).toBe(theirCheck.stdout);
    expect(findings(ourCheck.stderr)).toEqual(findings(theirCheck.stderr));

    for (const mode of ['leaks', 'all'] as const) {
      const theirs = `case-${index}.${mode}.qemu.qcow2`;
      const ours = `case-${index}.${mode}.ours.qcow2`;
      copyFileSync(at(damaged), at(theirs));
      copyFileSync(at(damaged), at(ours));
      const theirRepair = runStatus('qemu-img', ['check', '-r', mode, theirs], { cwd: dir.path });
      const ourRepair = qcow2(['check', '-r', mode, ours], { cwd: dir.path });
      expect(ourRepair.status, `-r ${mode}`).toBe(theirRepair.status);
      expect(ourRepair.stdout, `-r ${mode}`).toBe(theirRepair.stdout);
      expect(findings(ourRepair.stderr), `-r ${mode}`).toEqual(findings(theirRepair.stderr));

      // After the repairs: qemu-img finds the same in both, and never more than before.
      const after = verdict(ours);
      expect(after, `-r ${mode}`).toEqual(verdict(theirs));
      expect(after.corruptions).toBeLessThanOrEqual(verdict(damaged).corruptions);
      // Our own check agrees with qemu-img's on our repaired image.
      const ourAfter = qcow2(['check', '--output=json', ours], { cwd: dir.path });
      const theirAfter = runStatus('qemu-img', ['check', '--output=json', ours], { cwd: dir.path });
      expect(ourAfter.status).toBe(after.status);
      expect(JSON.parse(ourAfter.stdout)).toEqual(JSON.parse(theirAfter.stdout));
      if (mode !== 'all') continue;

      // The guest data: the same wherever QEMU can read its own repaired image.
      if (image.undefinedRanges.length === 0) {
        expect(runStatus('qemu-img', ['compare', '-q', ours, theirs], { cwd: dir.path }).status).toBe(0);
      } else {
        // Where QEMU cannot (the reason the range is left out), it fails to read.
        expect(
          runStatus('qemu-img', ['convert', '-O', 'raw', theirs, 'x.raw'], { cwd: dir.path }).status,
        ).toBe(1);
        for (const [offset, length] of definedRanges(size, image.undefinedRanges)) {
          expect(
            guestBytes(ours, offset, length, 'ours.raw').equals(
              guestBytes(theirs, offset, length, 'theirs.raw'),
            ),
            `guest bytes at ${offset}`,
          ).toBe(true);
        }
      }
    }
  });

  test('a v2 image repaired by us reads as zeros where QEMU left a zero flag it cannot read', () => {
    const v2 = DAMAGED_L2_CASES.find((c) => c.name.includes('compat=0.10'))!;
    const file = 'v2-zeros.qcow2';
    const image = v2.build(dir.path, file);
    expect(qcow2(['check', '-r', 'all', file], { cwd: dir.path }).status).toBe(0);
    const [[offset, length]] = image.undefinedRanges as [[number, number]];
    expect(guestBytes(file, offset, length, 'v2.raw').equals(Buffer.alloc(length))).toBe(true);
    expect(
      runStatus('qemu-img', ['convert', '-O', 'raw', file, 'v2-all.raw'], { cwd: dir.path }).status,
    ).toBe(0);
  });
});
