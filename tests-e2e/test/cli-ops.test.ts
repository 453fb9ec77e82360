/**
 * `qcow2 compare`, `bench` and `dd` against qemu-img: the same invocations on images made by
 * QEMU give the same exit codes and lines (bench's timing aside), and dd writes the same bytes.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

describe.skipIf(!haveTools)('qcow2 compare, bench and dd against qemu-img', () => {
  let dir: { path: string; remove: () => void };
  const qemuImg = (args: readonly string[]) => runStatus('qemu-img', args, { cwd: dir.path });
  const cli = (args: readonly string[]) => qcow2(args, { cwd: dir.path });
  const qemuIo = (file: string, ...commands: string[]) =>
    run('qemu-io', [...commands.flatMap((command) => ['-c', command]), file], { cwd: dir.path });

  beforeAll(() => {
    dir = tempDir('qcowkit-cli-ops-');
    const create = (...args: string[]) => run('qemu-img', ['create', '-q', ...args], { cwd: dir.path });
    create('-f', 'qcow2', 'base.qcow2', '8M');
    qemuIo('base.qcow2', 'write -P 7 2M 64k', 'write -z 3M 64k', 'write -P 9 7M 4k');
    run('qemu-img', ['convert', '-O', 'qcow2', 'base.qcow2', 'copy.qcow2'], { cwd: dir.path });
    run('qemu-img', ['convert', '-O', 'raw', 'base.qcow2', 'base.raw'], { cwd: dir.path });
    create('-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2');
    qemuIo('top.qcow2', 'write -P 7 5M 64k');
    create('-f', 'qcow2', '-o', 'cluster_size=4096', 'other.qcow2', '8M');
    qemuIo('other.qcow2', 'write -P 7 2M 64k', 'write -P 9 7M 4k', 'write -P 1 2100000 1');
    create('-f', 'qcow2', 'long.qcow2', '12M');
    qemuIo('long.qcow2', 'write -P 7 2M 64k', 'write -P 9 7M 4k', 'write -P 0 10M 64k', 'write -P 3 11M 512');
    create('-f', 'qcow2', 'longzero.qcow2', '12M');
    qemuIo('longzero.qcow2', 'write -P 7 2M 64k', 'write -P 9 7M 4k', 'write -P 0 10M 64k');
  });
  afterAll(() => dir?.remove());

  test.each([
    ['identical qcow2', ['base.qcow2', 'copy.qcow2']],
    ['qcow2 and raw', ['base.qcow2', 'base.raw']],
    ['explicit formats', ['-f', 'qcow2', '-F', 'raw', 'base.qcow2', 'base.raw']],
    ['a qcow2 read as raw', ['-f', 'raw', 'base.qcow2', 'base.raw']],
    ['over a backing file', ['top.qcow2', 'base.qcow2']],
    ['one byte apart, other cluster size', ['other.qcow2', 'base.qcow2']],
    ['longer with zeros only', ['base.qcow2', 'longzero.qcow2']],
    ['longer with data past the end', ['long.qcow2', 'base.raw']],
    ['strict, identical', ['-s', 'base.raw', 'base.raw']],
    ['strict, allocation differs', ['-s', 'base.qcow2', 'copy.qcow2']],
    ['strict over a backing file', ['-s', 'top.qcow2', 'base.qcow2']],
    ['strict, sizes differ', ['-s', 'base.qcow2', 'longzero.qcow2']],
    ['quiet', ['-q', 'other.qcow2', 'base.qcow2']],
    ['missing file', ['base.qcow2', 'nope.qcow2']],
    ['bad format name', ['-F', 'vhdx', 'base.qcow2', 'base.raw']],
  ])('compare: %s', (_name, args) => {
    const expected = qemuImg(['compare', ...args]);
    const actual = cli(['compare', ...args]);
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout).toBe(expected.stdout);
    if (expected.stderr !== '') {
      expect(actual.stderr.split('\n').filter(Boolean)).toHaveLength(1);
      expect(actual.stderr).toContain(expected.stderr.split(': ').slice(1, 2).join(''));
    } else {
      expect(actual.stderr).toBe('');
    }
  });

  test('compare -p draws its progress on stderr and ends at 100%', () => {
    const actual = cli(['compare', '-p', 'base.qcow2', 'base.raw']);
    expect(actual.status).toBe(0);
    expect(actual.stdout).toBe('Images are identical.\n');
    expect(actual.stderr).toMatch(/^ {4}\(0\.00\/100%\)\r.* {4}\(100\.00\/100%\)\r\n$/s);
  });

  const timeless = (text: string) => text.replace(/in \d+\.\d{3} seconds/, 'in T seconds');

  test.each([
    ['defaults', ['-c', '2000', 'base.qcow2']],
    ['sizes and steps', ['-c', '100', '-d', '4', '-s', '64k', '-S', '128k', '-o', '512', 'top.qcow2']],
    ['one request in flight', ['-c', '10', '-d', '1', '-f', 'raw', 'base.raw']],
    ['past the end', ['-c', '10', '-o', '9M', 'base.qcow2']],
    ['flush interval when reading', ['-c', '10', '--flush-interval=10', 'base.qcow2']],
    ['bad count', ['-c', 'x', 'base.qcow2']],
    ['bad size', ['-c', '10', '-s', '1Q', 'base.qcow2']],
    ['bad pattern', ['-c', '10', '-w', '--pattern=300', 'base.raw']],
    ['bad cache mode', ['-c', '10', '-t', 'fast', 'base.qcow2']],
    ['native aio without O_DIRECT', ['-c', '10', '-n', 'base.qcow2']],
    ['flush interval under the depth', ['-w', '-c', '10', '--flush-interval=10', 'base.raw']],
    ['missing file', ['-c', '10', 'nope.qcow2']],
  ])('bench: %s', (_name, args) => {
    const expected = qemuImg(['bench', ...args]);
    const actual = cli(['bench', ...args]);
    expect(actual.status).toBe(expected.status);
    expect(timeless(actual.stdout)).toBe(timeless(expected.stdout));
    if (expected.status !== 0) {
      expect(actual.stderr.split('\n').filter(Boolean)).toHaveLength(1);
      expect(actual.stderr.startsWith('qcow2: ')).toBe(true);
    }
  });

  test('bench -w writes what qemu-img bench -w writes', () => {
    run('cp', ['base.raw', 'ours.raw'], { cwd: dir.path });
    run('cp', ['base.raw', 'theirs.raw'], { cwd: dir.path });
    const args = [
      '-f',
      'raw',
      '-w',
      '--pattern=5',
      '-c',
      '50',
      '-d',
      '8',
      '-s',
      '64k',
      '-S',
      '100k',
      '-o',
      '1000',
    ];
    const flush = ['--flush-interval=8'];
    expect(qemuImg(['bench', ...args, ...flush, 'theirs.raw']).status).toBe(0);
    const actual = cli(['bench', ...args, ...flush, 'ours.raw']);
    expect(actual.status).toBe(0);
    expect(actual.stdout.split('\n')[1]).toBe('Sending flush every 8 requests');
    expect(readFileSync(join(dir.path, 'ours.raw')).equals(readFileSync(join(dir.path, 'theirs.raw')))).toBe(
      true,
    );
  });

  test('bench -w on a qcow2 overlay gives the image qemu-img bench -w gives', () => {
    for (const side of ['theirs', 'ours']) {
      run(
        'qemu-img',
        ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', `bw-${side}.qcow2`],
        {
          cwd: dir.path,
        },
      );
    }
    const args = ['-w', '--pattern=9', '-c', '300', '-d', '8', '-s', '3000', '-S', '5000', '-o', '100'];
    const expected = qemuImg(['bench', ...args, 'bw-theirs.qcow2']);
    const actual = cli(['bench', ...args, 'bw-ours.qcow2']);
    expect(actual.status).toBe(expected.status);
    expect(timeless(actual.stdout)).toBe(timeless(expected.stdout));
    expect(qemuImg(['check', 'bw-ours.qcow2']).status).toBe(0);
    expect(qemuImg(['compare', 'bw-theirs.qcow2', 'bw-ours.qcow2']).stdout).toBe('Images are identical.\n');
  });

  test.each([
    ['whole image', ['if=top.qcow2', 'of=OUT']],
    ['count bounds the end, skip included', ['if=base.qcow2', 'of=OUT', 'bs=64k', 'count=40', 'skip=1']],
    ['odd block size', ['if=top.qcow2', 'of=OUT', 'bs=1000', 'skip=3']],
    [
      'explicit formats',
      ['-f', 'qcow2', '-O', 'raw', 'if=top.qcow2', 'of=OUT', 'bs=1M', 'skip=1', 'count=6'],
    ],
    ['count 0', ['if=base.qcow2', 'of=OUT', 'bs=4k', 'count=0']],
    ['skip past the end', ['if=base.qcow2', 'of=OUT', 'skip=99999']],
    ['bad block size', ['if=base.qcow2', 'of=OUT', 'bs=0']],
    ['bad count', ['if=base.qcow2', 'of=OUT', 'count=x']],
    ['unknown operand', ['if=base.qcow2', 'of=OUT', 'foo=1']],
    ['no output', ['if=base.qcow2']],
    ['missing file', ['if=nope.qcow2', 'of=OUT']],
    ['unknown output format', ['-O', 'nosuchformat', 'if=base.qcow2', 'of=OUT']],
  ])('dd: %s', (_name, args) => {
    const expected = qemuImg(['dd', ...args.map((arg) => arg.replace('OUT', 'theirs.out'))]);
    const actual = cli(['dd', ...args.map((arg) => arg.replace('OUT', 'ours.out'))]);
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout).toBe(expected.stdout);
    expect(actual.stderr.split('\n').filter(Boolean)).toHaveLength(expected.stderr === '' ? 0 : 1);
    if (expected.status === 0) {
      const theirs = readFileSync(join(dir.path, 'theirs.out'));
      const ours = readFileSync(join(dir.path, 'ours.out'));
      expect(ours.length).toBe(theirs.length);
      expect(ours.equals(theirs)).toBe(true);
    }
    runStatus('rm', ['-f', 'theirs.out', 'ours.out'], { cwd: dir.path });
  });

  test.each([
    ['new image', ['-O', 'qcow2', '--size', '1G']],
    ['new image, JSON', ['--output=json', '-O', 'qcow2', '--size', '1G']],
    ['options', ['-O', 'qcow2', '-o', 'cluster_size=2M,refcount_bits=1', '--size', '1G']],
    [
      'extended L2, metadata',
      ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k,preallocation=metadata', '--size', '3G'],
    ],
    ['raw output', ['--size', '1G']],
    ['a qcow2 chain', ['--output=json', '-O', 'qcow2', 'top.qcow2']],
    ['a raw file, small clusters', ['-O', 'qcow2', '-o', 'cluster_size=4k', 'base.raw']],
    ['v2 target', ['-O', 'qcow2', '-o', 'compat=0.10', 'base.qcow2']],
    ['raw target', ['-O', 'raw', 'top.qcow2']],
    ['size and file', ['-O', 'qcow2', '--size', '1G', 'base.qcow2']],
    ['neither', ['-O', 'qcow2']],
    ['bad size', ['-O', 'qcow2', '--size', '1Q']],
    ['bad option', ['-O', 'qcow2', '-o', 'bogus=1', '--size', '1G']],
    ['unknown output format', ['-O', 'nosuchformat', '--size', '1G']],
  ])('measure: %s', (_name, args) => {
    const expected = qemuImg(['measure', ...args]);
    const actual = cli(['measure', ...args]);
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout).toBe(expected.stdout);
    if (expected.status !== 0) expect(actual.stderr.split('\n').filter(Boolean)).toHaveLength(1);
  });

  test('help and version', () => {
    for (const name of [
      'compare',
      'bench',
      'dd',
      'create',
      'measure',
      'snapshot',
      'resize',
      'amend',
      'commit',
      'rebase',
    ]) {
      const help = cli(['help', name]);
      expect(help.status).toBe(0);
      expect(help.stdout).toContain(`qcow2 ${name}`);
    }
    expect(cli(['--help']).stdout).toMatch(/compare.*\n[\s\S]*bench[\s\S]*dd/);
    expect(cli(['--version']).stdout).toMatch(/^\d+\.\d+\.\d+\n$/);
  });
});
