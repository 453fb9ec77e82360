/**
 * Images with persistent dirty bitmaps (made by qemu-img) written by the `qcow2` CLI beside the
 * same invocation of qemu-img: qemu-img check is clean, qemu-img info lists the same bitmaps with
 * the same flags, qemu-nbd exports the same dirty bits (nbdinfo --map=qemu:dirty-bitmap:NAME), and
 * qemu-img compare finds the data identical. What QEMU refuses (resize with an inconsistent bitmap,
 * snapshot apply with bitmaps) is refused with the same exit code.
 */
import { spawn } from 'node:child_process';
import { copyFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qemuBitmapsInfo, qemuDirtyMap } from '../src/bitmaps.js';
import { exited, must, startServer } from '../src/nbd-server.js';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo');
const BITMAPS = ['b0', 'b1', 'fine'];

describe.skipIf(!haveTools)('writing images with persistent bitmaps, beside QEMU', () => {
  let dir: { path: string; remove: () => void };
  const qemuImg = (args: readonly string[]) => runStatus('qemu-img', args, { cwd: dir.path });
  const cli = (args: readonly string[]) => qcow2(args, { cwd: dir.path });
  const copy = (from: string, to: string) => copyFileSync(join(dir.path, from), join(dir.path, to));
  const bitmapsInfo = (file: string) => qemuBitmapsInfo(file, dir.path);
  const dirtyMap = (file: string, name: string) => qemuDirtyMap(file, name, dir.path);
  const expectSameAsQemu = (ours: string, theirs: string, names = BITMAPS) => {
    expect(qemuImg(['check', ours]).status).toBe(0);
    expect(bitmapsInfo(ours)).toEqual(bitmapsInfo(theirs));
    for (const name of names) expect(dirtyMap(ours, name), name).toBe(dirtyMap(theirs, name));
    expect(qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', ours, theirs]).stdout).toBe(
      'Images are identical.\n',
    );
  };

  beforeAll(() => {
    dir = tempDir('qcowkit-bitmaps-');
    const setup = (args: string[]) => run(args[0]!, args.slice(1), { cwd: dir.path });
    setup(['qemu-img', 'create', '-q', '-f', 'qcow2', 'base.qcow2', '64M']);
    setup(['qemu-img', 'bitmap', '--add', '-g', '65536', 'base.qcow2', 'b0']);
    setup(['qemu-img', 'bitmap', '--add', '--disable', 'base.qcow2', 'b1']);
    setup(['qemu-img', 'bitmap', '--add', '-g', '4096', 'base.qcow2', 'fine']);
    setup(['qemu-io', '-c', 'write -P 1 0 1M', 'base.qcow2']);
  });
  afterAll(() => dir?.remove());

  test.each([
    ['spread 4 KiB writes', ['-c', '200', '-s', '4096', '-S', '300000', '-o', '512']],
    ['one 64 KiB write at the end', ['-c', '1', '-s', '65536', '-o', String(64 * 1024 * 1024 - 65536)]],
    [
      'overlapping writes, one in flight',
      ['-c', '50', '-d', '1', '-s', '1536', '-S', '1024', '-o', '8000000'],
    ],
  ])('bench -w, %s: same bits, flags and data as qemu-img bench -w', (_label, args) => {
    copy('base.qcow2', 'ours.qcow2');
    copy('base.qcow2', 'qemu.qcow2');
    expect(cli(['bench', '-q', '-w', '--pattern', '7', ...args, 'ours.qcow2']).status).toBe(0);
    expect(qemuImg(['bench', '-q', '-w', '--pattern', '7', ...args, 'qemu.qcow2']).status).toBe(0);
    expectSameAsQemu('ours.qcow2', 'qemu.qcow2');
  });

  test('a bitmap left in use by a crash stays in use; resize is refused as qemu-img refuses it', () => {
    copy('base.qcow2', 'stale.qcow2');
    runStatus('qemu-io', ['-c', 'write 2M 4k', '-c', 'abort', 'stale.qcow2'], { cwd: dir.path });
    copy('stale.qcow2', 'ours.qcow2');
    copy('stale.qcow2', 'qemu.qcow2');
    const args = ['-c', '10', '-s', '4096', '-o', '4194304'];
    expect(cli(['bench', '-q', '-w', ...args, 'ours.qcow2']).status).toBe(0);
    expect(qemuImg(['bench', '-q', '-w', ...args, 'qemu.qcow2']).status).toBe(0);
    expect(qemuImg(['check', 'ours.qcow2']).status).toBe(0);
    expect(bitmapsInfo('ours.qcow2')).toEqual(bitmapsInfo('qemu.qcow2'));
    const theirs = qemuImg(['resize', 'qemu.qcow2', '128M']);
    const ours = cli(['resize', 'ours.qcow2', '128M']);
    expect(ours.status).toBe(theirs.status);
    expect(ours.status).toBe(1);
    expect(ours.stderr).toMatch(/inconsistent/);
    expect(qemuImg(['compare', 'ours.qcow2', 'qemu.qcow2']).status).toBe(0);
  });

  test('resize grows and shrinks the bitmaps as qemu-img resize does', () => {
    copy('base.qcow2', 'ours.qcow2');
    copy('base.qcow2', 'qemu.qcow2');
    for (const [size, shrink] of [
      ['3G', false],
      ['40M', true],
    ] as const) {
      const args = ['resize', ...(shrink ? ['--shrink'] : []), 'FILE', size];
      expect(cli(args.map((arg) => arg.replace('FILE', 'ours.qcow2'))).status).toBe(0);
      expect(qemuImg(args.map((arg) => arg.replace('FILE', 'qemu.qcow2'))).status).toBe(0);
      const bench = ['-q', '-w', '-c', '4', '-s', '65536', '-S', '9000000', '-o', '100000'];
      expect(cli(['bench', ...bench, 'ours.qcow2']).status).toBe(0);
      expect(qemuImg(['bench', ...bench, 'qemu.qcow2']).status).toBe(0);
      expectSameAsQemu('ours.qcow2', 'qemu.qcow2');
    }
  });

  test('snapshot create works, apply is refused while there are bitmaps (as qemu-img)', () => {
    copy('base.qcow2', 'ours.qcow2');
    copy('base.qcow2', 'qemu.qcow2');
    expect(cli(['snapshot', '-c', 's1', 'ours.qcow2']).status).toBe(0);
    expect(qemuImg(['snapshot', '-c', 's1', 'qemu.qcow2']).status).toBe(0);
    const theirs = qemuImg(['snapshot', '-a', 's1', 'qemu.qcow2']);
    const ours = cli(['snapshot', '-a', 's1', 'ours.qcow2']);
    expect([ours.status, theirs.status]).toEqual([1, 1]);
    expect(qemuImg(['check', 'ours.qcow2']).status).toBe(0);
    expect(bitmapsInfo('ours.qcow2')).toEqual(bitmapsInfo('qemu.qcow2'));
  });

  test('qcow2 bitmap runs the operations of qemu-img bitmap with its messages and exit codes', () => {
    copy('base.qcow2', 'ours.qcow2');
    copy('base.qcow2', 'qemu.qcow2');
    const steps: string[][] = [
      ['--add', '-g', '64k', 'FILE', 'n1'],
      ['--add', '--disable', 'FILE', 'n2'],
      ['--merge', 'b0', 'FILE', 'n2'],
      ['--disable', 'FILE', 'b0'],
      ['--clear', '--enable', 'FILE', 'b1'],
      ['--merge', 'b0', '-b', 'base.qcow2', '-F', 'qcow2', 'FILE', 'fine'],
      ['--add', 'FILE', 'b0'],
      ['--remove', 'FILE', 'nope'],
      ['FILE', 'b0'],
      ['-g', '4096', '--clear', 'FILE', 'b0'],
      ['--add', 'FILE', 'n3', '--clear', '--merge', 'missing'],
      ['--remove', 'FILE', 'n1'],
    ];
    for (const step of steps) {
      const theirs = qemuImg(['bitmap', ...step.map((arg) => arg.replace('FILE', 'qemu.qcow2'))]);
      const ours = cli(['bitmap', ...step.map((arg) => arg.replace('FILE', 'ours.qcow2'))]);
      expect(ours.status, step.join(' ')).toBe(theirs.status);
      expect(ours.stderr.replace(/^qcow2: /, '')).toBe(theirs.stderr.replace(/^qemu-img: /, ''));
    }
    const bench = ['-q', '-w', '-c', '3', '-s', '4096', '-S', '5000000', '-o', '2000000'];
    expect(cli(['bench', ...bench, 'ours.qcow2']).status).toBe(0);
    expect(qemuImg(['bench', ...bench, 'qemu.qcow2']).status).toBe(0);
    expectSameAsQemu('ours.qcow2', 'qemu.qcow2', ['b0', 'b1', 'fine', 'n2', 'n3']);
    for (const name of ['b0', 'b1', 'fine', 'n2', 'n3']) {
      expect(cli(['bitmap', '--remove', 'ours.qcow2', name]).status).toBe(0);
    }
    expect(qemuImg(['check', 'ours.qcow2']).status).toBe(0);
    expect(bitmapsInfo('ours.qcow2')).toBeUndefined();
  });

  test('qcow2-nbd keeps the bitmaps true: the same bits as qemu-nbd after the same requests', async () => {
    copy('base.qcow2', 'ours.qcow2');
    copy('base.qcow2', 'qemu.qcow2');
    const requests = [
      '-c',
      'write -P 5 3M 8k',
      '-c',
      'write -z 6M 64k',
      '-c',
      'discard 9M 128k',
      '-c',
      'write -P 6 63M 1k',
    ];
    const server = await startServer(dir.path, [
      '-f',
      'qcow2',
      '--discard=unmap',
      join(dir.path, 'ours.qcow2'),
    ]);
    await must('qemu-io', ['-f', 'raw', ...requests, server.uri]);
    expect(await server.stop()).toBe(0);
    const socket = join(dir.path, 'qemu-nbd.sock');
    const qemu = spawn(
      'qemu-nbd',
      ['-f', 'qcow2', '--discard=unmap', '-k', socket, join(dir.path, 'qemu.qcow2')],
      {
        stdio: 'ignore',
      },
    );
    for (let tries = 0; tries < 200 && !existsSync(socket); tries++)
      await new Promise((resolve) => setTimeout(resolve, 25));
    await must('qemu-io', ['-f', 'raw', ...requests, `nbd+unix:///?socket=${socket}`]);
    expect(await exited(qemu)).toBe(0);
    expectSameAsQemu('ours.qcow2', 'qemu.qcow2');
  });

  test('qcow2 info lists the bitmaps and flags as qemu-img info (json and human)', () => {
    copy('base.qcow2', 'info.qcow2');
    runStatus('qemu-io', ['-c', 'abort', 'info.qcow2'], { cwd: dir.path });
    expect(
      JSON.parse(cli(['info', '--output=json', 'info.qcow2']).stdout)['format-specific'].data.bitmaps,
    ).toEqual(bitmapsInfo('info.qcow2'));
    const human = (text: string) =>
      text.slice(text.indexOf('    bitmaps:'), text.indexOf('    refcount bits:'));
    const ours = human(cli(['info', 'info.qcow2']).stdout);
    expect(ours).toBe(human(qemuImg(['info', 'info.qcow2']).stdout));
    expect(ours).toMatch(/in-use/);
  });
});
