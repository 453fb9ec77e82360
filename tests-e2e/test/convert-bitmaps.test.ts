/**
 * `qcow2 convert --bitmaps` beside `qemu-img convert --bitmaps` on a source made by qemu-img bitmap
 * and qemu-io writes (enabled and disabled bitmaps, granularities 512 B, 64 KiB and 1 MiB, one
 * empty): qemu-img info lists the same bitmaps with the same flags, qemu-nbd exports the same dirty
 * bits (nbdinfo --map=qemu:dirty-bitmap:NAME), qemu-img check is clean and compare finds the data
 * identical, with -c, another cluster size, -B, -l and -n. The refusals (an inconsistent bitmap, a
 * raw source or target, a v2 target, a name the target has already) give qemu-img's words and
 * exit codes.
 */
import { copyFileSync, existsSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qemuBitmapsInfo, qemuDirtyMap } from '../src/bitmaps.js';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo');
const BITMAPS = ['coarse', 'off', 'fine', 'empty', 'huge'];

describe.skipIf(!haveTools)('qcow2 convert --bitmaps, beside qemu-img convert --bitmaps', () => {
  let dir: { path: string; remove: () => void };
  const qemuImg = (args: readonly string[]) => runStatus('qemu-img', args, { cwd: dir.path });
  const cli = (args: readonly string[]) => qcow2(args, { cwd: dir.path });
  const setup = (args: string[]) => run(args[0]!, args.slice(1), { cwd: dir.path });
  const bitmapsInfo = (file: string) => qemuBitmapsInfo(file, dir.path);
  const dirtyMap = (file: string, name: string) => qemuDirtyMap(file, name, dir.path);
  /** Both tools' stderr without their names; our one line is qemu-img's two joined by '; '. */
  const words = (text: string) =>
    text
      .replace(/^qemu-img: /gm, '')
      .replace(/^qcow2: /gm, '')
      .replace(/\nTry /, '; Try ');

  beforeAll(() => {
    dir = tempDir('qcowkit-convert-bitmaps-');
    setup(['qemu-img', 'create', '-q', '-f', 'qcow2', 'src.qcow2', '64M']);
    setup(['qemu-img', 'bitmap', '--add', '-g', '64k', 'src.qcow2', 'coarse']);
    setup(['qemu-img', 'bitmap', '--add', 'src.qcow2', 'off']);
    setup(['qemu-img', 'bitmap', '--add', '-g', '512', 'src.qcow2', 'fine']);
    setup(['qemu-img', 'bitmap', '--add', '-g', '1M', 'src.qcow2', 'huge']);
    setup(['qemu-io', '-c', 'write -P 1 0 4k', '-c', 'write -P 2 1000000 300000', 'src.qcow2']);
    setup(['qemu-img', 'bitmap', '--disable', 'src.qcow2', 'off']);
    // The 512 B bitmap spans four 64 KiB bitmap clusters: bits in the first, third and last.
    setup(['qemu-io', '-c', 'write -P 3 20M 1536', '-c', 'write -P 4 67107840 1024', 'src.qcow2']);
    setup(['qemu-img', 'bitmap', '--add', '--disable', 'src.qcow2', 'empty']);
    setup(['qemu-img', 'snapshot', '-c', 's1', 'src.qcow2']);
    setup(['qemu-io', '-c', 'write -P 5 40M 64k', 'src.qcow2']);
    setup(['qemu-img', 'create', '-q', '-f', 'qcow2', 'base.qcow2', '64M']);
    setup(['qemu-io', '-c', 'write -P 1 0 2M', 'base.qcow2']);
  });
  afterAll(() => dir?.remove());

  test.each([
    ['plain', []],
    ['compressed (-c)', ['-c']],
    ['4 KiB clusters (bitmap chunks of another size)', ['-o', 'cluster_size=4096']],
    ['over a backing file (-B)', ['-B', 'base.qcow2', '-F', 'qcow2']],
    ['from a snapshot (-l): the active bitmaps', ['-l', 's1']],
  ])('%s: same bitmaps, bits and data as qemu-img', (_label, extra) => {
    const args = (target: string) => ['convert', '--bitmaps', '-O', 'qcow2', ...extra, 'src.qcow2', target];
    expect(qemuImg(args('qemu.qcow2')).status).toBe(0);
    const ours = cli(args('ours.qcow2'));
    expect(ours.stderr).toBe('');
    expect(ours.status).toBe(0);
    expect(qemuImg(['check', 'ours.qcow2']).status).toBe(0);
    expect(bitmapsInfo('ours.qcow2')).toEqual(bitmapsInfo('qemu.qcow2'));
    expect(bitmapsInfo('ours.qcow2')).toHaveLength(BITMAPS.length);
    for (const name of BITMAPS) expect(dirtyMap('ours.qcow2', name), name).toBe(dirtyMap('qemu.qcow2', name));
    expect(dirtyMap('ours.qcow2', 'fine')).toMatch(/dirty[\s\S]*dirty[\s\S]*dirty/);
    expect(qemuImg(['compare', 'ours.qcow2', 'qemu.qcow2']).stdout).toBe('Images are identical.\n');
  });

  test('-n: into an existing image, after its own bitmaps; a name it has already fails as in qemu-img', () => {
    for (const name of ['ours.qcow2', 'qemu.qcow2']) {
      setup(['qemu-img', 'create', '-q', '-f', 'qcow2', name, '64M']);
      setup(['qemu-img', 'bitmap', '--add', '--disable', name, 'mine']);
    }
    const args = (target: string) => ['convert', '-n', '--bitmaps', '-O', 'qcow2', 'src.qcow2', target];
    expect(qemuImg(args('qemu.qcow2')).status).toBe(0);
    expect(cli(args('ours.qcow2')).status).toBe(0);
    expect(qemuImg(['check', 'ours.qcow2']).status).toBe(0);
    expect(bitmapsInfo('ours.qcow2')).toEqual(bitmapsInfo('qemu.qcow2'));
    for (const name of [...BITMAPS, 'mine']) {
      expect(dirtyMap('ours.qcow2', name), name).toBe(dirtyMap('qemu.qcow2', name));
    }
    // Again: every name exists now; qemu-img walks them newest first and stops at the first.
    const theirs = qemuImg(args('qemu.qcow2'));
    const ours = cli(args('ours.qcow2'));
    expect([ours.status, theirs.status]).toEqual([1, 1]);
    expect(words(ours.stderr)).toBe(words(theirs.stderr));
    expect(qemuImg(['check', 'ours.qcow2']).status).toBe(0);
    expect(bitmapsInfo('ours.qcow2')).toEqual(bitmapsInfo('qemu.qcow2'));
  });

  test('refusals: the words and exit codes of qemu-img; nothing created where qemu-img creates nothing', () => {
    copyFileSync(join(dir.path, 'src.qcow2'), join(dir.path, 'broken.qcow2'));
    runStatus('qemu-io', ['-c', 'write 2M 4k', '-c', 'abort', 'broken.qcow2'], { cwd: dir.path });
    setup(['qemu-img', 'convert', '-O', 'raw', 'src.qcow2', 'src.raw']);
    const cases: [string[], boolean][] = [
      [['--skip-broken-bitmaps', '-O', 'qcow2', 'src.qcow2', 'T.qcow2'], false],
      [['--bitmaps', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'T.qcow2'], false],
      [['--bitmaps', '-O', 'qcow2', 'broken.qcow2', 'T.qcow2'], false],
      [['--bitmaps', '-O', 'raw', 'broken.qcow2', 'T.raw'], false],
      [['--bitmaps', '-O', 'raw', 'src.qcow2', 'T.raw'], true],
      [['--bitmaps', '-O', 'qcow2', '-o', 'compat=0.10', 'src.qcow2', 'T.qcow2'], true],
    ];
    for (const [args, qemuCreates] of cases) {
      const label = args.join(' ');
      const target = args.at(-1)!;
      for (const who of ['qemu.', 'ours.'])
        rmSync(join(dir.path, target.replace('T.', who)), { force: true });
      const theirs = qemuImg(['convert', ...args.map((arg) => arg.replace('T.', 'qemu.'))]);
      const ours = cli(['convert', ...args.map((arg) => arg.replace('T.', 'ours.'))]);
      expect(theirs.status, label).toBe(1);
      expect(ours.status, label).toBe(1);
      expect(words(ours.stderr), label).toBe(words(theirs.stderr));
      expect(ours.stderr.trim().split('\n'), label).toHaveLength(1);
      expect(existsSync(join(dir.path, target.replace('T.', 'qemu.'))), label).toBe(qemuCreates);
      // Ours refuses before creating anything.
      expect(existsSync(join(dir.path, target.replace('T.', 'ours.'))), label).toBe(false);
    }
    // --skip-broken-bitmaps: a warning for each (newest first), the data copied, no bitmap.
    const args = (target: string) => [
      'convert',
      '--bitmaps',
      '--skip-broken-bitmaps',
      '-O',
      'qcow2',
      'broken.qcow2',
      target,
    ];
    const theirs = qemuImg(args('qemu.qcow2'));
    const ours = cli(args('ours.qcow2'));
    expect([ours.status, theirs.status]).toEqual([0, 0]);
    expect(words(ours.stderr)).toBe(words(theirs.stderr));
    expect(ours.stderr).toMatch(/warning: Skipping inconsistent bitmap 'huge'\n/);
    expect(bitmapsInfo('ours.qcow2')).toBeUndefined();
    expect(bitmapsInfo('qemu.qcow2')).toBeUndefined();
    expect(qemuImg(['compare', 'ours.qcow2', 'qemu.qcow2']).status).toBe(0);
    // stdout cannot take bitmaps (qemu-img would write a file named '-').
    const piped = cli(['convert', '--bitmaps', '-O', 'qcow2', 'src.qcow2', '-']);
    expect(piped.status).toBe(1);
    expect(piped.stdout).toBe('');
    expect(piped.stderr).toBe(
      "qcow2: --bitmaps needs a target file to add the bitmaps to, not stdout ('-')\n",
    );
  });
});
