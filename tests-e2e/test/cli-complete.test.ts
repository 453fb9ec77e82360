/**
 * The `qcow2` subcommands' remaining qemu-img flags, side by side with qemu-img on images made by
 * QEMU: commit -b / -r / -t, -p progress of commit and rebase, create -o preallocation=falloc|full,
 * bench -q, dd -O qcow2 and measure of an image with persistent bitmaps.
 */
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

describe.skipIf(!haveTools)('qcow2 commit, create, bench, dd and measure: the rest of qemu-img flags', () => {
  let dir: { path: string; remove: () => void };
  const qemuImg = (args: readonly string[]) => runStatus('qemu-img', args, { cwd: dir.path });
  const cli = (args: readonly string[], env?: NodeJS.ProcessEnv) =>
    qcow2(args, { cwd: dir.path, ...(env === undefined ? {} : { env: { ...process.env, ...env } }) });
  const must = (args: string[]) => run('qemu-img', args, { cwd: dir.path });
  const io = (file: string, ...commands: string[]) =>
    run('qemu-io', [...commands.flatMap((command) => ['-c', command]), file], { cwd: dir.path });
  const expectClean = (file: string) => expect(qemuImg(['check', file]).status).toBe(0);
  const expectIdentical = (a: string, b: string) =>
    expect(qemuImg(['compare', a, b]).stdout).toBe('Images are identical.\n');
  const map = (file: string) => JSON.parse(qemuImg(['map', '--output=json', file]).stdout) as unknown[];
  /** The map without host offsets (where clusters land is the allocator's choice). */
  const layout = (file: string) =>
    (JSON.parse(qemuImg(['map', '--output=json', file]).stdout) as Record<string, unknown>[]).map(
      ({ offset: _offset, ...rest }) => rest,
    );

  beforeAll(() => {
    dir = tempDir('qcowkit-cli-complete-');
  });
  afterAll(() => dir?.remove());

  /** base <- mid <- top, each holding data of its own, some over the layers below. */
  const chain = (side: string) => {
    must(['create', '-q', '-f', 'qcow2', `base-${side}.qcow2`, '4M']);
    io(`base-${side}.qcow2`, 'write -P 1 0 1M', 'write -P 1 3M 64k');
    must([
      'create',
      '-q',
      '-f',
      'qcow2',
      '-b',
      `base-${side}.qcow2`,
      '-F',
      'qcow2',
      `mid-${side}.qcow2`,
      '6M',
    ]);
    io(`mid-${side}.qcow2`, 'write -P 2 512k 128k', 'write -z 3M 64k', 'write -P 2 5M 64k');
    must(['create', '-q', '-f', 'qcow2', '-b', `mid-${side}.qcow2`, '-F', 'qcow2', `top-${side}.qcow2`]);
    io(`top-${side}.qcow2`, 'write -P 3 576k 8k', 'write -P 3 2M 100k');
  };

  test.each([
    ['-b the deepest image', ['commit', '-b', 'base-SIDE.qcow2', 'top-SIDE.qcow2']],
    ['-b the backing file', ['commit', '-b', 'mid-SIDE.qcow2', 'top-SIDE.qcow2']],
    ['-b with -d and -p', ['commit', '-d', '-p', '-b', 'base-SIDE.qcow2', 'mid-SIDE.qcow2']],
    [
      '-b with a rate limit and a cache mode',
      ['commit', '-r', '1M', '-t', 'none', '-b', 'base-SIDE.qcow2', 'top-SIDE.qcow2'],
    ],
    ['-b not in the chain', ['commit', '-b', 'nope.qcow2', 'top-SIDE.qcow2']],
    ['-b the image itself', ['commit', '-b', 'top-SIDE.qcow2', 'top-SIDE.qcow2']],
    ['a bad rate limit', ['commit', '-r', 'fast', 'top-SIDE.qcow2']],
    ['a bad cache mode', ['commit', '-t', 'bogus', 'top-SIDE.qcow2']],
  ])('commit %s as qemu-img', (_name, args) => {
    chain('theirs');
    chain('ours');
    const expected = qemuImg(args.map((arg) => arg.replace('SIDE', 'theirs')));
    const actual = cli(args.map((arg) => arg.replace('SIDE', 'ours')));
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout.replace(/^ {4}\(.*\r\n/, '')).toBe(
      expected.stdout.replace(/^( {4}\(\d+\.\d\d\/100%\)\r?)+\n?/, ''),
    );
    if (expected.status !== 0) {
      expect(actual.stderr.split('\n').filter(Boolean)).toHaveLength(1);
      // qemu-img wraps its long messages over two lines; ours is one.
      expect(actual.stderr.replace('qcow2:', 'qemu-img:').replaceAll('ours', 'theirs')).toContain(
        expected.stderr.split('\n')[0]!.replace(/ You may use.*/, ''),
      );
      return;
    }
    for (const layer of ['base', 'mid', 'top']) {
      expectClean(`${layer}-ours.qcow2`);
      expectIdentical(`${layer}-theirs.qcow2`, `${layer}-ours.qcow2`);
      expect(layout(`${layer}-ours.qcow2`)).toEqual(layout(`${layer}-theirs.qcow2`));
    }
  });

  test('commit -p and rebase -p report progress as they go, in qemu-img form off a terminal', () => {
    must(['create', '-q', '-f', 'qcow2', 'pbase.qcow2', '16M']);
    must(['create', '-q', '-f', 'qcow2', '-b', 'pbase.qcow2', '-F', 'qcow2', 'ptop.qcow2']);
    io('ptop.qcow2', 'write -P 4 0 12M');
    must(['create', '-q', '-f', 'qcow2', 'pnew.qcow2', '16M']);
    io('pbase.qcow2', 'write -P 5 0 16M');
    const figures = (stderr: string) => [...stderr.matchAll(/ {4}\((\d+\.\d\d)\/100%\)\r/g)].map((m) => m[1]);

    const rebase = cli(['rebase', '-p', '-b', 'pnew.qcow2', '-F', 'qcow2', 'ptop.qcow2']);
    expect(rebase.status).toBe(0);
    expect(rebase.stderr.endsWith('    (100.00/100%)\r\n')).toBe(true);
    expect(new Set(figures(rebase.stderr)).size).toBeGreaterThan(3);

    const commit = cli(['commit', '-p', 'ptop.qcow2']);
    expect(commit.status).toBe(0);
    expect(commit.stdout).toBe('Image committed.\n');
    const seen = figures(commit.stderr);
    expect(seen[0]).toBe('0.00');
    expect(seen.at(-1)).toBe('100.00');
    expect(new Set(seen).size).toBeGreaterThan(3);
    expect(seen.map(Number)).toEqual([...seen.map(Number)].sort((a, b) => a - b));

    // -q silences -p.
    expect(cli(['commit', '-q', '-p', 'ptop.qcow2'])).toMatchObject({ status: 0, stdout: '', stderr: '' });

    // amend -p: qemu-img's 0% and 100% lines (on stderr here), the image amended as qemu-img does.
    must(['create', '-q', '-f', 'qcow2', 'pam-theirs.qcow2', '1M']);
    must(['create', '-q', '-f', 'qcow2', 'pam-ours.qcow2', '1M']);
    const theirs = qemuImg(['amend', '-p', '-o', 'lazy_refcounts=on', 'pam-theirs.qcow2']);
    const amend = cli(['amend', '-p', '-o', 'lazy_refcounts=on', 'pam-ours.qcow2']);
    expect(amend.status).toBe(theirs.status);
    expect(amend.stderr).toBe(theirs.stdout);
    expect(cli(['amend', '-p', '-q', '-o', 'lazy_refcounts=off', 'pam-ours.qcow2'])).toMatchObject({
      status: 0,
      stdout: '',
      stderr: '',
    });
  });

  test.each([
    ['qcow2, falloc', ['-f', 'qcow2', '-o', 'preallocation=falloc', 'FILE', '5M']],
    ['qcow2, full', ['-f', 'qcow2', '-o', 'preallocation=full', 'FILE', '3M']],
    [
      'qcow2, falloc, 4k clusters, five L2 tables',
      ['-f', 'qcow2', '-o', 'preallocation=falloc,cluster_size=4k', 'FILE', '9M'],
    ],
    [
      'qcow2, metadata, extended L2',
      ['-f', 'qcow2', '-o', 'preallocation=metadata,extended_l2=on,cluster_size=16k', 'FILE', '9M'],
    ],
    ['qcow2 v2, full', ['-f', 'qcow2', '-o', 'preallocation=full,compat=0.10', 'FILE', '1M']],
    [
      'qcow2, metadata, over a backing file (refused without extended L2)',
      ['-f', 'qcow2', '-b', 'pre-base.raw', '-F', 'raw', '-o', 'preallocation=metadata', 'FILE', '2M'],
    ],
    [
      'qcow2, falloc, extended L2, over a backing file',
      [
        '-f',
        'qcow2',
        '-b',
        'pre-base.raw',
        '-F',
        'raw',
        '-o',
        'preallocation=falloc,extended_l2=on',
        'FILE',
        '2M',
      ],
    ],
    [
      'qcow2, metadata, extended L2, over a backing file',
      [
        '-f',
        'qcow2',
        '-b',
        'pre-base.raw',
        '-F',
        'raw',
        '-o',
        'preallocation=metadata,extended_l2=on',
        'FILE',
        '2M',
      ],
    ],
    [
      'qcow2, extended L2, falloc',
      ['-f', 'qcow2', '-o', 'preallocation=falloc,extended_l2=on', 'FILE', '2M'],
    ],
    ['raw, falloc', ['-f', 'raw', '-o', 'preallocation=falloc', 'FILE', '3M']],
    ['raw, full', ['-f', 'raw', '-o', 'preallocation=full', 'FILE', '3M']],
    ['raw, metadata', ['-f', 'raw', '-o', 'preallocation=metadata', 'FILE', '3M']],
    ['qcow2, bad mode', ['-f', 'qcow2', '-o', 'preallocation=bogus', 'FILE', '1M']],
  ])('create -o preallocation: %s as qemu-img', (_name, args) => {
    const ext = args[1] === 'raw' ? 'raw' : 'qcow2';
    const [theirs, ours] = [`pre-theirs.${ext}`, `pre-ours.${ext}`];
    if (args.includes('pre-base.raw')) qemuImg(['create', '-q', '-f', 'raw', 'pre-base.raw', '2M']);
    const expected = qemuImg(['create', ...args.map((arg) => arg.replace('FILE', theirs))]);
    const actual = cli(['create', ...args.map((arg) => arg.replace('FILE', ours))]);
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout).toBe(expected.stdout.replaceAll('theirs', 'ours'));
    if (expected.status !== 0) {
      expect(actual.stderr.replace('qcow2:', 'qemu-img:').replaceAll('ours', 'theirs')).toBe(expected.stderr);
      return;
    }
    const info = (file: string) => {
      const {
        filename: _f,
        'actual-size': actualSize,
        ...rest
      } = JSON.parse(qemuImg(['info', '--output=json', file]).stdout) as Record<string, unknown>;
      return { rest, actualSize: actualSize as number };
    };
    const [mine, qemu] = [info(ours), info(theirs)];
    expect(mine.rest).toEqual(qemu.rest);
    // Allocated within a cluster or two of qemu-img's (file systems round differently).
    expect(Math.abs(mine.actualSize - qemu.actualSize)).toBeLessThanOrEqual(256 * 1024);
    expect(statSync(join(dir.path, ours)).size).toBe(statSync(join(dir.path, theirs)).size);
    expect(map(ours)).toEqual(map(theirs));
    if (ext === 'qcow2') {
      expectClean(ours);
      // The same layout: host offsets and every byte.
      const hostMap = (file: string) => qemuImg(['map', '--output=json', file]).stdout;
      expect(hostMap(ours)).toBe(hostMap(theirs));
      expect(Buffer.compare(readFileSync(join(dir.path, ours)), readFileSync(join(dir.path, theirs)))).toBe(
        0,
      );
    }
    expectIdentical(theirs, ours);
  });

  test('bench -q prints what qemu-img bench -q prints', () => {
    must(['create', '-q', '-f', 'qcow2', 'bq.qcow2', '1M']);
    const timeless = (text: string) => text.replace(/in \d+\.\d{3} seconds/, 'in T seconds');
    for (const extra of [[], ['-w', '-d', '4', '--flush-interval=10']]) {
      const args = ['bench', '-q', '-c', '100', ...extra, 'bq.qcow2'];
      const expected = qemuImg(args);
      const actual = cli(args);
      expect(actual.status).toBe(expected.status);
      expect(timeless(actual.stdout)).toBe(timeless(expected.stdout));
      expect(actual.stdout).toContain('Run completed in');
    }
  });

  test.each([
    ['whole image', ['-O', 'qcow2', 'if=dd-src.qcow2', 'of=OUT']],
    [
      'blocks, skip and count',
      ['-O', 'qcow2', 'if=dd-src.qcow2', 'of=OUT', 'bs=1000', 'skip=3', 'count=2000'],
    ],
    ['from raw, big blocks', ['-f', 'raw', '-O', 'qcow2', 'if=dd-src.raw', 'of=OUT', 'bs=1M', 'skip=1']],
    ['skip past the end', ['-O', 'qcow2', 'if=dd-src.qcow2', 'of=OUT', 'skip=99999']],
  ])('dd -O qcow2: %s as qemu-img', (_name, args) => {
    must(['create', '-q', '-f', 'qcow2', 'dd-src.qcow2', '3M']);
    io('dd-src.qcow2', 'write -P 6 4000 70k', 'write -P 7 2M 1M');
    must(['convert', '-O', 'raw', 'dd-src.qcow2', 'dd-src.raw']);
    const expected = qemuImg(['dd', ...args.map((arg) => arg.replace('OUT', 'dd-theirs.qcow2'))]);
    const actual = cli(['dd', ...args.map((arg) => arg.replace('OUT', 'dd-ours.qcow2'))]);
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout).toBe(expected.stdout);
    expect(actual.stderr.split('\n').filter(Boolean)).toHaveLength(expected.stderr === '' ? 0 : 1);
    expectClean('dd-ours.qcow2');
    expectIdentical('dd-theirs.qcow2', 'dd-ours.qcow2');
    const virtualSize = (file: string) =>
      JSON.parse(qemuImg(['info', '--output=json', file]).stdout)['virtual-size'] as number;
    expect(virtualSize('dd-ours.qcow2')).toBe(virtualSize('dd-theirs.qcow2'));
  });

  test('measure counts persistent bitmaps as qemu-img measure does', () => {
    must(['create', '-q', '-f', 'qcow2', 'bm.qcow2', '3G']);
    must(['bitmap', '--add', 'bm.qcow2', 'b0']);
    must(['bitmap', '--add', '-g', '4k', 'bm.qcow2', 'a-longer-bitmap-name']);
    must(['bitmap', '--add', '-g', '1M', '--disable', 'bm.qcow2', 'b2']);
    for (const args of [
      ['-O', 'qcow2', 'bm.qcow2'],
      ['--output=json', '-O', 'qcow2', 'bm.qcow2'],
      ['-O', 'qcow2', '-o', 'cluster_size=4k', 'bm.qcow2'],
      ['--output=json', '-O', 'qcow2', '-o', 'cluster_size=2M,extended_l2=on', 'bm.qcow2'],
      ['--output=json', '-O', 'qcow2', '-o', 'compat=0.10', 'bm.qcow2'],
      ['-O', 'raw', 'bm.qcow2'],
    ]) {
      const expected = qemuImg(['measure', ...args]);
      expect(expected.stdout).not.toBe('');
      expect(cli(['measure', ...args]), args.join(' ')).toEqual(expected);
    }
    expect(qemuImg(['measure', '-O', 'qcow2', 'bm.qcow2']).stdout).toMatch(/bitmaps size: [1-9]/);
  });

  test.each([
    ['raw, falloc', 'raw', ['--preallocation=falloc', '-f', 'raw', 'FILE', '3M']],
    ['raw, full, relative', 'raw', ['--preallocation=full', '-f', 'raw', 'FILE', '+1M']],
    ['qcow2, falloc', 'qcow2', ['--preallocation=falloc', 'FILE', '3M']],
    ['qcow2, full', 'qcow2', ['--preallocation=full', 'FILE', '+2M']],
    ['qcow2, metadata', 'qcow2', ['--preallocation=metadata', 'FILE', '3M']],
    ['qcow2, metadata, relative', 'qcow2', ['--preallocation=metadata', 'FILE', '+100M']],
    ['raw, metadata', 'raw', ['--preallocation=metadata', '-f', 'raw', 'FILE', '3M']],
    ['a bad mode', 'raw', ['--preallocation=bogus', '-f', 'raw', 'FILE', '3M']],
    ['shrinking', 'raw', ['--shrink', '--preallocation=full', '-f', 'raw', 'FILE', '512k']],
    ['to 0 bytes (refused)', 'qcow2', ['--shrink', 'FILE', '0']],
    ['to 0 bytes, relative (refused)', 'raw', ['--shrink', '-f', 'raw', 'FILE', '--', '-1M']],
  ])('resize --preallocation: %s as qemu-img', (_name, format, args) => {
    for (const side of ['theirs', 'ours']) {
      must(['create', '-q', '-f', format, `rs-${side}.${format}`, '1M']);
      io(`rs-${side}.${format}`, 'write -P 8 0 64k');
    }
    const [theirs, ours] = [`rs-theirs.${format}`, `rs-ours.${format}`];
    const expected = qemuImg(['resize', ...args.map((arg) => arg.replace('FILE', theirs))]);
    const actual = cli(['resize', ...args.map((arg) => arg.replace('FILE', ours))]);
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout).toBe(expected.stdout);
    if (expected.status !== 0) {
      expect(actual.stderr.replace('qcow2:', 'qemu-img:')).toBe(expected.stderr);
      return;
    }
    expectIdentical(theirs, ours);
    expect(layout(ours)).toEqual(layout(theirs));
    if (format === 'qcow2') expectClean(ours);
  });

  test.each([
    ['check -T', ['check', '-T', 'bogus', 'ck.qcow2']],
    ['compare -T', ['compare', '-T', 'bogus', 'ck.qcow2', 'ck.qcow2']],
    ['rebase -t', ['rebase', '-t', 'bogus', '-u', '-b', '', 'ck.qcow2']],
    ['rebase -T', ['rebase', '-T', 'bogus', '-u', '-b', '', 'ck.qcow2']],
    ['amend -t', ['amend', '-t', 'bogus', '-o', 'lazy_refcounts=on', 'ck.qcow2']],
    ['commit -t', ['commit', '-t', 'bogus', 'ck.qcow2']],
    ['good cache modes', ['compare', '-T', 'writeback', 'ck.qcow2', 'ck.qcow2']],
    ['amend -t and --force', ['amend', '-t', 'none', '--force', '-o', 'lazy_refcounts=on', 'ck.qcow2']],
  ])('cache flags: %s as qemu-img', (_name, args) => {
    must(['create', '-q', '-f', 'qcow2', 'ck.qcow2', '1M']);
    const expected = qemuImg(args);
    const actual = cli(args);
    expect(actual.status).toBe(expected.status);
    expect(actual.stdout).toBe(expected.stdout);
    expect(actual.stderr.replace('qcow2:', 'qemu-img:')).toBe(expected.stderr);
  });
});
