/**
 * Command lines where an audit against qemu-img 7.2 found us answering differently, each run with
 * both tools in copies of the same folder: the exit codes must match, and where qemu-img prints
 * data (JSON, option lists) ours must say the same thing.
 */
import { cpSync, existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

interface Outcome {
  readonly status: number;
  readonly stdout: string;
  readonly stderr: string;
}

describe.skipIf(!haveTools)('qcow2 answers as qemu-img does', () => {
  let dir: { path: string; remove: () => void };
  let round = 0;
  beforeAll(() => {
    dir = tempDir('qcowkit-parity-');
    const seed = join(dir.path, 'seed');
    run('mkdir', ['-p', seed]);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'], { cwd: seed });
    run('qemu-io', ['-c', 'write -P 0x11 0 1M', 'base.qcow2'], { cwd: seed });
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'top.qcow2', '64M'], { cwd: seed });
  });
  afterAll(() => dir?.remove());

  /** Runs `args` with qemu-img and with ours, each in its own fresh copy of the seed folder. */
  const both = (
    args: readonly string[],
  ): { theirs: Outcome; ours: Outcome; qemuDir: string; ourDir: string } => {
    round++;
    const qemuDir = join(dir.path, `q${round}`);
    const ourDir = join(dir.path, `o${round}`);
    cpSync(join(dir.path, 'seed'), qemuDir, { recursive: true });
    cpSync(join(dir.path, 'seed'), ourDir, { recursive: true });
    return {
      theirs: runStatus('qemu-img', args, { cwd: qemuDir }),
      ours: qcow2(args, { cwd: ourDir }),
      qemuDir,
      ourDir,
    };
  };

  /** Our refusal: exit 1 as qemu-img's, one line naming `message`, nothing on stdout. */
  const expectSameRefusal = (args: readonly string[], message: string) => {
    const { theirs, ours } = both(args);
    expect(theirs.status, theirs.stderr).toBe(1);
    expect(ours.status, ours.stderr).toBe(1);
    expect(ours.stderr).toContain(message);
    expect(ours.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(ours.stdout).toBe('');
  };

  /** The `key=` names of an option list as qemu-img prints it. */
  const optionKeys = (text: string) => [...text.matchAll(/^ {2}([a-z_.-]+)=/gm)].map((match) => match[1]);

  test.each([
    [['create', '-f', 'qcow2', '-o', 'help'], 'Supported qcow2 options:'],
    [['create', '-f', 'qcow2', '-o', '?'], 'Supported qcow2 options:'],
    [['create', '-o', 'help'], 'Supported raw options:'],
    [['convert', '-O', 'qcow2', '-o', 'help'], 'Supported qcow2 options:'],
    [['create', '-f', 'qcow2', '-o', 'cluster_size=4k,help', 'new.qcow2', '1M'], 'Supported options:'],
    [['amend', '-o', 'help', 'base.qcow2'], "Amend options for 'qcow2':"],
    [['amend', '-f', 'qcow2', '-o', 'help'], "Amend options for 'qcow2':"],
  ])('%j lists the options (ours a subset of qemu-img list) and creates nothing', (args, heading) => {
    const { theirs, ours, ourDir } = both(args);
    expect(theirs.status).toBe(0);
    expect(ours.status, ours.stderr).toBe(0);
    expect(ours.stdout.split('\n')[0]).toBe(heading);
    const keys = optionKeys(ours.stdout);
    expect(keys.length).toBeGreaterThan(0);
    const theirKeys = new Set(optionKeys(theirs.stdout));
    for (const key of keys) expect(theirKeys, key).toContain(key);
    expect(existsSync(join(ourDir, 'new.qcow2'))).toBe(false);
  });

  test.each([
    [
      ['convert', '-c', '-O', 'raw', 'base.qcow2', 'out.img'],
      'Compression not supported for this file format',
    ],
    [
      ['convert', '-O', 'raw', '-B', 'base.qcow2', '-F', 'qcow2', 'top.qcow2', 'out.img'],
      "Backing file not supported for file format 'raw'",
    ],
    [
      ['convert', '-O', 'raw', '-o', 'cluster_size=4k', 'base.qcow2', 'out.img'],
      "Invalid parameter 'cluster_size'",
    ],
    [
      ['convert', '-O', 'raw', '-o', 'preallocation=metadata', 'base.qcow2', 'out.img'],
      'Unsupported preallocation mode: metadata',
    ],
    [
      ['create', '-f', 'raw', '-b', 'base.qcow2', '-F', 'qcow2', 'new.img'],
      "Backing file not supported for file format 'raw'",
    ],
    [
      ['convert', '-O', 'qcow2', '-B', 'base.qcow2', 'top.qcow2', 'out.qcow2'],
      'Use of backing file requires explicit backing format',
    ],
    [
      ['rebase', '-b', 'base.qcow2', 'top.qcow2'],
      "Could not change the backing file to 'base.qcow2': backing format must be specified",
    ],
    [
      ['rebase', '-u', '-b', 'base.qcow2', 'top.qcow2'],
      "Could not change the backing file to 'base.qcow2': backing format must be specified",
    ],
    [['rebase', 'top.qcow2'], 'Must specify backing file (-b) or use unsafe mode (-u)'],
    [['create', '-f', 'raw', '-o', 'size=2M', 'new.img', '4M'], 'The image size must be specified only once'],
    [
      ['convert', '-m', '17', '-O', 'raw', 'base.qcow2', 'out.img'],
      'Allowed number of coroutines is between 1 and 16',
    ],
    [['bench', '-c', '10', '-s', '1G', 'base.qcow2'], 'Failed request: Input/output error'],
  ])('%j is refused as qemu-img refuses it', (args, message) => {
    if (args[0] === 'bench') {
      // qemu-img prints its "Sending ..." line before the failure; ours does too.
      const { theirs, ours } = both(args);
      expect(theirs.status).toBe(1);
      expect(ours.status).toBe(1);
      expect(ours.stderr.trim()).toBe(`qcow2: ${message}`);
      return;
    }
    expectSameRefusal(args, message);
  });

  test('a refused rebase leaves the image as it was', () => {
    const { ourDir } = both(['rebase', '-b', 'base.qcow2', 'top.qcow2']);
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', 'top.qcow2'], { cwd: ourDir }));
    expect(info['backing-filename']).toBeUndefined();
  });

  test.each([
    ['0x100000', 1048576],
    ['+1M', 1048576],
    ['1.0', 512],
  ])('create takes the size %s as qemu-img does', (text, bytes) => {
    const { theirs, ours, qemuDir, ourDir } = both(['create', '-q', '-f', 'raw', 'new.img', text]);
    expect(theirs.status).toBe(0);
    expect(ours.status, ours.stderr).toBe(0);
    expect(statSync(join(ourDir, 'new.img')).size).toBe(statSync(join(qemuDir, 'new.img')).size);
    expect(statSync(join(ourDir, 'new.img')).size).toBe(bytes);
  });

  test.each([
    [['measure', '--output=json', '--size', '1G', '-O', 'qcow2', '-o', 'preallocation=full']],
    [['measure', '--output=json', '--size', '1G', '-O', 'qcow2', '-o', 'preallocation=falloc']],
    [['measure', '--output=json', '--size', '1G', '-O', 'qcow2', '-o', 'preallocation=metadata']],
    [['measure', '--output=json', '-O', 'qcow2', '-o', 'preallocation=falloc', 'base.qcow2']],
    [['map', '--output=json', '--start-offset=64M', 'base.qcow2']],
    [['map', '--output=json', '--start-offset=100M', 'base.qcow2']],
    [['map', '--output=json', '--max-length=0', 'base.qcow2']],
  ])('%j prints the JSON qemu-img prints', (args) => {
    const { theirs, ours } = both(args);
    expect(theirs.status).toBe(0);
    expect(ours.status, ours.stderr).toBe(0);
    expect(JSON.parse(ours.stdout)).toEqual(JSON.parse(theirs.stdout));
  });

  test('a raw file of 25 bytes is a guest of one 512-byte sector, as qemu-img sees it', () => {
    round++;
    const folder = join(dir.path, `raw25-${round}`);
    cpSync(join(dir.path, 'seed'), folder, { recursive: true });
    writeFileSync(join(folder, 'short.raw'), 'twenty-five bytes of text');
    for (const args of [
      ['info', '--output=json', '-f', 'raw', 'short.raw'],
      ['map', '--output=json', '-f', 'raw', 'short.raw'],
    ]) {
      const theirs = runStatus('qemu-img', args, { cwd: folder });
      const ours = qcow2(args, { cwd: folder });
      expect(ours.status, ours.stderr).toBe(0);
      const parsed = JSON.parse(ours.stdout);
      const expected = JSON.parse(theirs.stdout);
      if (args[0] === 'info') {
        expect(parsed['virtual-size']).toBe(expected['virtual-size']);
        expect(parsed['virtual-size']).toBe(512);
      } else {
        expect(parsed).toEqual(expected);
      }
    }
    expect(
      qcow2(['convert', '-f', 'raw', '-O', 'raw', 'short.raw', 'ours.raw'], { cwd: folder }).status,
    ).toBe(0);
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', 'short.raw', 'theirs.raw'], { cwd: folder });
    expect(readFileSync(join(folder, 'ours.raw'))).toEqual(readFileSync(join(folder, 'theirs.raw')));
  });

  test('convert -O raw -o preallocation=falloc allocates the whole target, as qemu-img', () => {
    const args = ['convert', '-O', 'raw', '-o', 'preallocation=falloc', 'base.qcow2', 'out.img'];
    const { theirs, ours, qemuDir, ourDir } = both(args);
    expect(theirs.status).toBe(0);
    expect(ours.status, ours.stderr).toBe(0);
    const allocated = (folder: string) => statSync(join(folder, 'out.img')).blocks * 512;
    expect(allocated(ourDir)).toBe(allocated(qemuDir));
    expect(allocated(ourDir)).toBeGreaterThanOrEqual(64 * 1024 * 1024);
    run('qemu-img', [
      'compare',
      '-q',
      '-f',
      'raw',
      '-F',
      'raw',
      join(qemuDir, 'out.img'),
      join(ourDir, 'out.img'),
    ]);
  });

  test('convert -n into a qcow2 image gives the clusters it frees back, as qemu-img', () => {
    const setup = (folder: string) => {
      run('qemu-img', ['create', '-q', '-f', 'qcow2', 'out.qcow2', '64M'], { cwd: folder });
      run('qemu-io', ['-c', 'write -P 0x77 0 8M', 'out.qcow2'], { cwd: folder });
    };
    round++;
    const qemuDir = join(dir.path, `q${round}`);
    const ourDir = join(dir.path, `o${round}`);
    for (const folder of [qemuDir, ourDir]) {
      cpSync(join(dir.path, 'seed'), folder, { recursive: true });
      setup(folder);
    }
    const args = ['convert', '-n', '-O', 'qcow2', 'base.qcow2', 'out.qcow2'];
    expect(runStatus('qemu-img', args, { cwd: qemuDir }).status).toBe(0);
    const ours = qcow2(args, { cwd: ourDir });
    expect(ours.status, ours.stderr).toBe(0);
    const allocated = (folder: string) => statSync(join(folder, 'out.qcow2')).blocks * 512;
    expect(allocated(ourDir)).toBeLessThan(allocated(qemuDir) + 1024 * 1024);
    run('qemu-img', ['compare', '-q', join(qemuDir, 'out.qcow2'), join(ourDir, 'out.qcow2')]);
    run('qemu-img', ['check', 'out.qcow2'], { cwd: ourDir });
  });

  test('amend -o size= shrinks the image, as qemu-img amend does', () => {
    const { theirs, ours, qemuDir, ourDir } = both(['amend', '-o', 'size=32M', 'base.qcow2']);
    expect(theirs.status, theirs.stderr).toBe(0);
    expect(ours.status, ours.stderr).toBe(0);
    const size = (folder: string) =>
      JSON.parse(run('qemu-img', ['info', '--output=json', 'base.qcow2'], { cwd: folder }))['virtual-size'];
    expect(size(ourDir)).toBe(size(qemuDir));
    run('qemu-img', ['check', 'base.qcow2'], { cwd: ourDir });
    run('qemu-img', ['compare', '-q', join(qemuDir, 'base.qcow2'), join(ourDir, 'base.qcow2')]);
  });
});
