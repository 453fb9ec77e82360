/**
 * `qcow2 convert` details beyond the bytes: every way of naming a snapshot, the progress line,
 * converting a raw file, `-n` (into an existing file) and `-` (stdout).
 */
import { copyFileSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { QCOW2_BIN, qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

describe.skipIf(!haveTools)('qcow2 convert', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-convert-');
    const io = (...commands: string[]) =>
      run('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), 'snap.qcow2'], { cwd: dir.path });
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'snap.qcow2', '8M'], { cwd: dir.path });
    io('write -P 0x11 0 1M', 'write -P 0x12 5M 100k');
    run('qemu-img', ['snapshot', '-c', 'first', 'snap.qcow2'], { cwd: dir.path });
    io('write -P 0x21 512k 1M', 'discard 5M 64k');
    run('qemu-img', ['snapshot', '-c', '7', 'snap.qcow2'], { cwd: dir.path });
    io('write -z 0 4M');
    run('qemu-img', ['convert', '-l', 'snapshot.name=first', '-O', 'raw', 'snap.qcow2', 'qemu-first.raw'], {
      cwd: dir.path,
    });
    run('qemu-img', ['convert', '-l', 'snapshot.id=2', '-O', 'raw', 'snap.qcow2', 'qemu-id2.raw'], {
      cwd: dir.path,
    });
  });
  afterAll(() => dir?.remove());

  const same = (a: string, b: string) =>
    runStatus('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', join(dir.path, a), join(dir.path, b)])
      .status;

  test.each([
    [['-l', 'snapshot.name=first'], 'qemu-first.raw'],
    [['-l', 'snapshot.id=1'], 'qemu-first.raw'],
    [['-l', 'first'], 'qemu-first.raw'],
    [['-s', 'first'], 'qemu-first.raw'],
    [['-l', 'snapshot.id=2'], 'qemu-id2.raw'],
    // A snapshot named "7" whose id is 2: a bare "7" is looked up as an id first, then as a name.
    [['-s', '7'], 'qemu-id2.raw'],
  ])('snapshot %j converts as qemu-img converts it', (flags, expected) => {
    const result = qcow2(['convert', ...flags, '-O', 'raw', 'snap.qcow2', 'ours.raw'], { cwd: dir.path });
    expect(result.status, result.stderr).toBe(0);
    expect(same(expected, 'ours.raw')).toBe(0);
  });

  test('-p draws the progress line qemu-img draws (on stderr; qemu-img uses stdout)', () => {
    const ours = qcow2(['convert', '-p', '-O', 'raw', 'snap.qcow2', 'progress.raw'], { cwd: dir.path });
    const theirs = runStatus('qemu-img', ['convert', '-p', '-O', 'raw', 'snap.qcow2', 'progress-qemu.raw'], {
      cwd: dir.path,
    });
    for (const line of [ours.stderr, theirs.stdout]) {
      expect(line).toMatch(
        /^ {4}\(0\.00\/100%\)\r( {4}\(\d{1,3}\.\d\d\/100%\)\r)* {4}\(100\.00\/100%\)\r\n$/,
      );
    }
    expect(ours.stdout).toBe('');
    expect(same('progress-qemu.raw', 'progress.raw')).toBe(0);
  });

  test('a raw file converts to an identical raw file', () => {
    const result = qcow2(['convert', '-f', 'raw', '-O', 'raw', 'qemu-first.raw', 'copy.raw'], {
      cwd: dir.path,
    });
    expect(result.status, result.stderr).toBe(0);
    expect(
      readFileSync(join(dir.path, 'copy.raw')).equals(readFileSync(join(dir.path, 'qemu-first.raw'))),
    ).toBe(true);
  });

  test('a target of - streams every byte through a pipe, as qemu-img writes the file', () => {
    run('qemu-img', ['convert', '-O', 'raw', 'snap.qcow2', 'qemu-now.raw'], { cwd: dir.path });
    // Through a pipe (cmp reads it), with -p: the progress line stays on stderr.
    const piped = runStatus(
      'sh',
      [
        '-c',
        `"${process.execPath}" "${QCOW2_BIN}" convert -p -O raw snap.qcow2 - 2>progress.txt | cmp - qemu-now.raw`,
      ],
      { cwd: dir.path },
    );
    expect(piped.stdout + piped.stderr).toBe('');
    expect(piped.status).toBe(0);
    expect(readFileSync(join(dir.path, 'progress.txt'), 'utf8')).toMatch(/\(100\.00\/100%\)\r\n$/);
    // A reader that stops early ends the command quietly.
    const head = runStatus(
      'sh',
      ['-c', `"${process.execPath}" "${QCOW2_BIN}" convert -O raw snap.qcow2 - | head -c 10 | wc -c`],
      {
        cwd: dir.path,
      },
    );
    expect(head.stdout.trim()).toBe('10');
    expect(head.stderr).toBe('');
  });

  test('-n writes into an existing file as qemu-img -n does: zeros where the guest has them, the tail kept', () => {
    // A 12 MiB target full of 0x77: the 8 MiB guest overwrites its start, zeros included.
    run('qemu-img', ['create', '-q', '-f', 'raw', 'full.raw', '12M'], { cwd: dir.path });
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 12M', 'full.raw'], { cwd: dir.path });
    copyFileSync(join(dir.path, 'full.raw'), join(dir.path, 'full-qemu.raw'));
    const ours = qcow2(['convert', '-n', '-O', 'raw', 'snap.qcow2', 'full.raw'], { cwd: dir.path });
    expect(ours.status, ours.stderr).toBe(0);
    run('qemu-img', ['convert', '-n', '-O', 'raw', 'snap.qcow2', 'full-qemu.raw'], { cwd: dir.path });
    expect(
      readFileSync(join(dir.path, 'full.raw')).equals(readFileSync(join(dir.path, 'full-qemu.raw'))),
    ).toBe(true);
    // The guest's zeros became holes, as qemu-img leaves them.
    expect(statSync(join(dir.path, 'full.raw')).blocks).toBeLessThanOrEqual(
      statSync(join(dir.path, 'full-qemu.raw')).blocks,
    );

    run('qemu-img', ['create', '-q', '-f', 'raw', 'small.raw', '1M'], { cwd: dir.path });
    const small = qcow2(['convert', '-n', '-O', 'raw', 'snap.qcow2', 'small.raw'], { cwd: dir.path });
    const qemuSmall = runStatus('qemu-img', ['convert', '-n', '-O', 'raw', 'snap.qcow2', 'small.raw'], {
      cwd: dir.path,
    });
    expect(small.status).toBe(1);
    expect(qemuSmall.status).toBe(1);
    expect(small.stderr.replace(/^qcow2: /, '')).toBe(qemuSmall.stderr.replace(/^qemu-img: /, ''));
  });

  test('--target-is-zero takes the target at its word as qemu-img does, and needs -n', () => {
    // A target full of 0x77: with --target-is-zero neither tool zeroes it, so the guest's zero
    // ranges keep the 0x77 bytes, the same in both files.
    for (const [format, name] of [
      ['raw', 'tz.raw'],
      ['qcow2', 'tz.qcow2'],
    ] as const) {
      const theirs = `qemu-${name}`;
      run('qemu-img', ['create', '-q', '-f', format, name, '8M'], { cwd: dir.path });
      run('qemu-io', ['-f', format, '-c', 'write -P 0x77 0 8M', name], { cwd: dir.path });
      copyFileSync(join(dir.path, name), join(dir.path, theirs));
      const args = ['convert', '-n', '--target-is-zero', '-O', format, 'snap.qcow2'];
      const ours = qcow2([...args, name], { cwd: dir.path });
      expect(ours.status, ours.stderr).toBe(0);
      run('qemu-img', [...args, theirs], { cwd: dir.path });
      const compare = runStatus('qemu-img', ['compare', '-f', format, '-F', format, name, theirs], {
        cwd: dir.path,
      });
      expect(compare.status, compare.stdout).toBe(0);
      // It differs from the source where the source has zeros: nothing was zeroed.
      expect(
        runStatus('qemu-img', ['compare', '-F', format, 'snap.qcow2', name], { cwd: dir.path }).status,
      ).toBe(1);
    }
    const alone = qcow2(['convert', '--target-is-zero', '-O', 'raw', 'snap.qcow2', 'tz-new.raw'], {
      cwd: dir.path,
    });
    const qemuAlone = runStatus(
      'qemu-img',
      ['convert', '--target-is-zero', '-O', 'raw', 'snap.qcow2', 'tz-new.raw'],
      {
        cwd: dir.path,
      },
    );
    expect(alone.status).toBe(1);
    expect(qemuAlone.status).toBe(1);
    expect(alone.stderr.replace(/^qcow2: /, '')).toBe(qemuAlone.stderr.replace(/^qemu-img: /, ''));
  });

  test('-S 0 gives a fully allocated copy and -S 64k the holes qemu-img leaves', () => {
    for (const size of ['0', '64k']) {
      const ours = qcow2(['convert', '-S', size, '-O', 'raw', 'snap.qcow2', `s${size}.raw`], {
        cwd: dir.path,
      });
      expect(ours.status, ours.stderr).toBe(0);
      run('qemu-img', ['convert', '-S', size, '-O', 'raw', 'snap.qcow2', `s${size}-qemu.raw`], {
        cwd: dir.path,
      });
      const [mine, theirs] = [`s${size}.raw`, `s${size}-qemu.raw`].map((name) => join(dir.path, name));
      expect(readFileSync(mine!).equals(readFileSync(theirs!))).toBe(true);
      if (size === '0') expect(statSync(mine!).blocks * 512).toBeGreaterThanOrEqual(8 * 2 ** 20);
      else expect(statSync(mine!).blocks).toBeLessThanOrEqual(statSync(theirs!).blocks);
    }
    const bad = qcow2(['convert', '-S', '1000', '-O', 'raw', 'snap.qcow2', 'bad.raw'], { cwd: dir.path });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/^qcow2: Invalid buffer size for sparse output specified/);
  });
});
