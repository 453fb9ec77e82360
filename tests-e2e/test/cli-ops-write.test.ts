/**
 * The writing subcommands (`create`, `snapshot`, `resize`, `check -r`) beside qemu-img: the same
 * invocation on copies of images made by QEMU gives the same exit code and output, and images
 * that qemu-img compare calls identical and qemu-img check calls clean.
 */
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

describe.skipIf(!haveTools)('qcow2 create, snapshot, resize and check -r against qemu-img', () => {
  let dir: { path: string; remove: () => void };
  const at = (name: string) => join(dir.path, name);
  const qemuImg = (args: readonly string[]) => runStatus('qemu-img', args, { cwd: dir.path });
  const cli = (args: readonly string[]) => qcow2(args, { cwd: dir.path });
  /** Replaces THEM/US in `args` by the two files' names. */
  const both = (args: readonly string[], theirs: string, ours: string) => ({
    expected: qemuImg(args.map((arg) => arg.replace('FILE', theirs))),
    actual: cli(args.map((arg) => arg.replace('FILE', ours))),
  });
  const expectClean = (file: string) => expect(qemuImg(['check', file]).status).toBe(0);
  const expectIdentical = (a: string, b: string) =>
    expect(qemuImg(['compare', a, b]).stdout).toBe('Images are identical.\n');

  beforeAll(() => {
    dir = tempDir('qcowkit-cli-write-');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '8M'], { cwd: dir.path });
    run(
      'qemu-io',
      ['-c', 'write -P 7 1M 192k', '-c', 'write -z 3M 64k', '-c', 'write -P 9 7M 4k', 'base.qcow2'],
      {
        cwd: dir.path,
      },
    );
    run('qemu-img', ['convert', '-O', 'raw', 'base.qcow2', 'base.raw'], { cwd: dir.path });
  });
  afterAll(() => dir?.remove());

  test.each([
    ['defaults', ['-f', 'qcow2', 'FILE', '1M']],
    [
      '4 KiB clusters, 64-bit refcounts',
      ['-f', 'qcow2', '-o', 'cluster_size=4k,refcount_bits=64', 'FILE', '1G'],
    ],
    ['v2', ['-f', 'qcow2', '-o', 'compat=0.10', 'FILE', '100M']],
    [
      'extended L2, zstd, lazy',
      ['-f', 'qcow2', '-o', 'extended_l2=on,compression_type=zstd,lazy_refcounts=on', 'FILE', '3G'],
    ],
    ['metadata preallocation', ['-f', 'qcow2', '-o', 'preallocation=metadata', 'FILE', '5M']],
    ['size from the backing file', ['-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'FILE']],
    ['unsafe backing', ['-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'FILE', '1M']],
    ['raw, size rounded up', ['-f', 'raw', 'FILE', '1.5k']],
    ['quiet', ['-q', '-f', 'qcow2', 'FILE', '1M']],
    ['bad size', ['-f', 'qcow2', 'FILE', '1Q']],
    ['bad option', ['-f', 'qcow2', '-o', 'bogus=1', 'FILE', '1M']],
    ['bad format name', ['-f', 'vhdy', 'FILE', '1M']],
    ['no size', ['-f', 'qcow2', 'FILE']],
  ])('create: %s', (_name, args) => {
    const { expected, actual } = both(['create', ...args], 'theirs.img', 'ours.img');
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout.replaceAll('ours.img', 'theirs.img')).toBe(expected.stdout);
    if (expected.status === 0) {
      expect(readFileSync(at('ours.img')).equals(readFileSync(at('theirs.img')))).toBe(true);
    } else {
      expect(actual.stderr.split('\n').filter(Boolean)).toHaveLength(1);
    }
    runStatus('rm', ['-f', 'theirs.img', 'ours.img'], { cwd: dir.path });
  });

  test('snapshot -c, -l, -a, -d and errors as qemu-img snapshot', () => {
    copyFileSync(at('base.qcow2'), at('snap-theirs.qcow2'));
    copyFileSync(at('base.qcow2'), at('snap-ours.qcow2'));
    const undated = (text: string) => text.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE');
    const steps: Array<[string[], () => void]> = [
      [['snapshot', '-c', 'one', 'FILE'], () => {}],
      [['snapshot', '-l', 'FILE'], () => {}],
      [['snapshot', '-c', 'two', 'FILE'], () => {}],
      [['snapshot', 'FILE'], () => {}],
      [['snapshot', '-a', 'one', 'FILE'], () => {}],
      [['snapshot', '-d', '2', 'FILE'], () => {}],
      [['snapshot', '-a', 'nope', 'FILE'], () => {}],
      [['snapshot', '-d', 'nope', 'FILE'], () => {}],
      [['snapshot', '-c', 'x', '-d', 'y', 'FILE'], () => {}],
    ];
    for (const [args] of steps) {
      if (args[1] === '-a' && args[2] === 'one') {
        // Change the data between the snapshot and its application.
        for (const file of ['snap-theirs.qcow2', 'snap-ours.qcow2']) {
          run('qemu-io', ['-c', 'write -P 3 1M 64k', file], { cwd: dir.path });
        }
      }
      const { expected, actual } = both(args, 'snap-theirs.qcow2', 'snap-ours.qcow2');
      expect(actual.status, args.join(' ')).toBe(expected.status);
      expect(undated(actual.stdout)).toBe(undated(expected.stdout));
      if (expected.status !== 0)
        expect(actual.stderr.replaceAll('qcow2:', 'qemu-img:')).toBe(
          `${expected.stderr.split('\nTry')[0]!.trimEnd()}\n`,
        );
    }
    expectClean('snap-ours.qcow2');
    expectIdentical('snap-theirs.qcow2', 'snap-ours.qcow2');
    expect(qemuImg(['snapshot', '-l', 'snap-ours.qcow2']).stdout).toContain(' one ');
  });

  test.each([
    ['grow qcow2', 'base.qcow2', ['resize', 'FILE', '+1M']],
    ['grow past the L1 table', 'base.qcow2', ['resize', 'FILE', '20G']],
    ['shrink refused', 'base.qcow2', ['resize', 'FILE', '1M']],
    ['shrink', 'base.qcow2', ['resize', '--shrink', 'FILE', '-1M']],
    ['grow raw', 'base.raw', ['resize', '-f', 'raw', 'FILE', '9M']],
    ['shrink raw', 'base.raw', ['resize', '-f', 'raw', '--shrink', 'FILE', '2M']],
    ['bad size', 'base.qcow2', ['resize', 'FILE', '1Q']],
  ])('resize: %s', (_name, source, args) => {
    const extension = source.endsWith('.raw') ? 'raw' : 'qcow2';
    copyFileSync(at(source), at(`theirs.${extension}`));
    copyFileSync(at(source), at(`ours.${extension}`));
    const { expected, actual } = both(args, `theirs.${extension}`, `ours.${extension}`);
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout).toBe(expected.stdout);
    if (expected.status === 0) {
      if (extension === 'qcow2') expectClean(`ours.${extension}`);
      expect(qemuImg(['compare', '-s', `theirs.${extension}`, `ours.${extension}`]).status).toBeLessThan(2);
      expectIdentical(`theirs.${extension}`, `ours.${extension}`);
      const size = (file: string) =>
        JSON.parse(qemuImg(['info', '--output=json', file]).stdout)['virtual-size'];
      expect(size(`ours.${extension}`)).toBe(size(`theirs.${extension}`));
    } else {
      expect(actual.stderr.split('\n').filter(Boolean)).toHaveLength(1);
    }
  });

  test.each([
    ['64 KiB clusters, the shared L2 table copied', [], '8M', '3M'],
    ['4 KiB clusters: tables kept, copied and dropped', ['-o', 'cluster_size=4k'], '8M', '3M'],
    ['extended L2, compressed clusters', ['-o', 'extended_l2=on'], '8M', '2500k'],
    ['v2: refused as qemu-img refuses it', ['-o', 'compat=0.10'], '8M', '3M'],
  ])('resize --shrink under an internal snapshot (%s), as qemu-img', (_name, createArgs, size, newSize) => {
    for (const side of ['theirs', 'ours']) {
      const file = `shrink-snap-${side}.qcow2`;
      run('qemu-img', ['create', '-q', '-f', 'qcow2', ...createArgs, file, size], { cwd: dir.path });
      run('qemu-io', ['-c', 'write -P 0x31 0 5M', '-c', 'write -c -P 0x32 6M 256k', file], { cwd: dir.path });
      run('qemu-img', ['snapshot', '-c', 'before', file], { cwd: dir.path });
      // One more write after the snapshot: a table copied already, beside the shared ones.
      run('qemu-io', ['-c', 'write -P 0x33 64k 64k', file], { cwd: dir.path });
    }
    const { expected, actual } = both(
      ['resize', '--shrink', 'FILE', newSize],
      'shrink-snap-theirs.qcow2',
      'shrink-snap-ours.qcow2',
    );
    expect(actual.status, actual.stderr).toBe(expected.status);
    if (expected.status !== 0) {
      expect(actual.stderr).toContain("Can't resize a v2 image which has snapshots");
      return;
    }
    expectClean('shrink-snap-ours.qcow2');
    expectIdentical('shrink-snap-theirs.qcow2', 'shrink-snap-ours.qcow2');
    // The snapshot still reads as it was taken, and applying it brings that back.
    for (const side of ['theirs', 'ours']) {
      run(
        'qemu-img',
        ['convert', '-O', 'raw', '-l', 'before', `shrink-snap-${side}.qcow2`, `snap-${side}.raw`],
        {
          cwd: dir.path,
        },
      );
    }
    expect(qemuImg(['compare', '-f', 'raw', '-F', 'raw', 'snap-theirs.raw', 'snap-ours.raw']).status).toBe(0);
    expect(cli(['snapshot', '-a', 'before', 'shrink-snap-ours.qcow2']).status).toBe(0);
    expect(qemuImg(['snapshot', '-a', 'before', 'shrink-snap-theirs.qcow2']).status).toBe(0);
    expectClean('shrink-snap-ours.qcow2');
    expectIdentical('shrink-snap-theirs.qcow2', 'shrink-snap-ours.qcow2');
  });

  test.each([
    ['leaks', 'human'],
    ['all', 'json'],
  ])('check -r %s --output=%s on leaked clusters', (mode, output) => {
    copyFileSync(at('base.qcow2'), at('leak.qcow2'));
    // Two clusters past the end get refcount 1 and no reference: leaks.
    const bytes = readFileSync(at('leak.qcow2'));
    const refcountTable = Number(bytes.readBigUInt64BE(48));
    const block = Number(bytes.readBigUInt64BE(refcountTable));
    const clusters = Math.ceil(bytes.length / 65536);
    const grown = Buffer.alloc((clusters + 2) * 65536);
    bytes.copy(grown);
    grown.writeUInt16BE(1, block + 2 * clusters);
    grown.writeUInt16BE(1, block + 2 * (clusters + 1));
    writeFileSync(at('leak-theirs.qcow2'), grown);
    writeFileSync(at('leak-ours.qcow2'), grown);
    expect(qemuImg(['check', 'leak-theirs.qcow2']).status).toBe(3);
    const { expected, actual } = both(
      ['check', '-r', mode, `--output=${output}`, 'FILE'],
      'leak-theirs.qcow2',
      'leak-ours.qcow2',
    );
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout.replaceAll('leak-ours', 'leak-theirs')).toBe(expected.stdout);
    expect(actual.stderr).toBe(expected.stderr);
    expectClean('leak-ours.qcow2');
    expectIdentical('leak-theirs.qcow2', 'leak-ours.qcow2');
  });
  test('amend: the same steps give the same image options and content as qemu-img amend', () => {
    copyFileSync(at('base.qcow2'), at('amend-theirs.qcow2'));
    copyFileSync(at('base.qcow2'), at('amend-ours.qcow2'));
    const specific = (file: string) => {
      const info = JSON.parse(qemuImg(['info', '--output=json', file]).stdout);
      return { size: info['virtual-size'], data: info['format-specific'] };
    };
    for (const options of [
      [],
      ['-o', 'bogus=1'],
      ['-o', 'refcount_bits=64,lazy_refcounts=on'],
      ['-o', 'compat=0.10'],
      ['-o', 'lazy_refcounts=off,refcount_bits=16'],
      ['-o', 'compat=0.10'],
      ['-o', 'size=1G'],
      ['-o', 'compat=1.1'],
    ]) {
      const { expected, actual } = both(
        ['amend', ...options, 'FILE'],
        'amend-theirs.qcow2',
        'amend-ours.qcow2',
      );
      expect(actual.status, options.join(' ')).toBe(expected.status);
      if (expected.status !== 0) expect(actual.stderr.split('\n').filter(Boolean)).toHaveLength(1);
      expect(specific('amend-ours.qcow2')).toEqual(specific('amend-theirs.qcow2'));
      expectClean('amend-ours.qcow2');
      expectIdentical('amend-theirs.qcow2', 'amend-ours.qcow2');
    }
  });
  /** base <- top (top holds data and a zeroed range over base's data) and a second base. */
  const chain = (suffix: string) => {
    const q = (args: string[]) => run('qemu-img', args, { cwd: dir.path });
    const io = (file: string, ...commands: string[]) =>
      run('qemu-io', [...commands.flatMap((command) => ['-c', command]), file], { cwd: dir.path });
    q(['create', '-q', '-f', 'qcow2', `cb-${suffix}.qcow2`, '8M']);
    io(`cb-${suffix}.qcow2`, 'write -P 1 0 1M', 'write -P 5 6M 64k');
    q(['create', '-q', '-f', 'qcow2', '-b', `cb-${suffix}.qcow2`, '-F', 'qcow2', `ct-${suffix}.qcow2`]);
    io(`ct-${suffix}.qcow2`, 'write -P 2 512k 1M', 'write -z 6M 4k');
    q(['create', '-q', '-f', 'qcow2', `nb-${suffix}.qcow2`, '8M']);
    io(`nb-${suffix}.qcow2`, 'write -P 1 0 256k');
  };
  const backingOf = (file: string) => {
    const info = JSON.parse(qemuImg(['info', '--output=json', file]).stdout);
    return [info['backing-filename'], info['backing-filename-format']];
  };

  test.each([
    ['commit', ['commit', 'ct-SIDE.qcow2']],
    ['commit -d', ['commit', '-d', 'ct-SIDE.qcow2']],
    ['commit without a backing file', ['commit', 'cb-SIDE.qcow2']],
    ['rebase', ['rebase', '-b', 'nb-SIDE.qcow2', '-F', 'qcow2', 'ct-SIDE.qcow2']],
    ['rebase onto nothing', ['rebase', '-b', '', 'ct-SIDE.qcow2']],
    ['rebase -u', ['rebase', '-u', '-b', 'nb-SIDE.qcow2', '-F', 'qcow2', 'ct-SIDE.qcow2']],
    ['rebase onto a missing file', ['rebase', '-b', 'nope.qcow2', '-F', 'qcow2', 'ct-SIDE.qcow2']],
  ])('%s as qemu-img', (_name, args) => {
    chain('theirs');
    chain('ours');
    const expected = qemuImg(args.map((arg) => arg.replace('SIDE', 'theirs')));
    const actual = cli(args.map((arg) => arg.replace('SIDE', 'ours')));
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout).toBe(expected.stdout);
    if (expected.status !== 0) {
      expect(actual.stderr.replace('qcow2:', 'qemu-img:')).toBe(expected.stderr);
      return;
    }
    for (const name of ['cb', 'ct']) {
      expectClean(`${name}-ours.qcow2`);
      expectIdentical(`${name}-theirs.qcow2`, `${name}-ours.qcow2`);
    }
    const [theirName, theirFormat] = backingOf('ct-theirs.qcow2');
    expect(backingOf('ct-ours.qcow2')).toEqual([theirName?.replace('theirs', 'ours'), theirFormat]);
  });
  test.each([
    ['qcow2 to qcow2', ['-O', 'qcow2', 'base.qcow2']],
    ['raw, compressed', ['-O', 'qcow2', '-c', 'base.raw']],
    [
      'small clusters, 64-bit refcounts',
      ['-O', 'qcow2', '-o', 'cluster_size=4k,refcount_bits=64', 'base.qcow2'],
    ],
    ['v2', ['-O', 'qcow2', '-o', 'compat=0.10', 'base.raw']],
    ['over a backing file', ['-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', 'base.raw']],
    ['fast path spelling', ['-O', 'qcow2', '-f', 'raw', 'base.raw']],
  ])('convert: %s gives an image qemu-img calls identical and clean', (_name, args) => {
    const expected = qemuImg(['convert', ...args, 'conv-theirs.qcow2']);
    const actual = cli(['convert', ...args, 'conv-ours.qcow2']);
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout).toBe(expected.stdout);
    expectClean('conv-ours.qcow2');
    expectIdentical('conv-theirs.qcow2', 'conv-ours.qcow2');
    expect(backingOf('conv-ours.qcow2')).toEqual(backingOf('conv-theirs.qcow2'));
  });
});
