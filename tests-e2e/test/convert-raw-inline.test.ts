/**
 * `qcow2 convert -O raw` writes a target on tmpfs inline on its main thread and a target on a disk
 * file system through libuv's pool: the output, its holes and its failures must not depend on
 * which. Each case runs on /dev/shm and in the usual temporary folder, against qemu-img.
 *
 * A write failing mid-copy: the target is an existing file (`-n`) and the process may not write
 * past 4 MiB of any file (RLIMIT_FSIZE through prlimit, SIGXFSZ ignored so the write returns
 * EFBIG instead of killing the process). Both tools stop with the same `error while writing at
 * byte N` and leave the same first 4 MiB.
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { QCOW2_BIN } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'prlimit');
const MiB = 2 ** 20;

describe.skipIf(!haveTools)('qcow2 convert -O raw on tmpfs and on disk', () => {
  let disk: { path: string; remove: () => void };
  let shm: string;
  beforeAll(() => {
    disk = tempDir('qcowkit-convert-inline-');
    shm = mkdtempSync('/dev/shm/qcowkit-convert-inline-');
    // 12 MiB: 1 MiB runs of random data at every other MiB, an all-zero 4 KiB block in one of them.
    const raw = join(disk.path, 'src.raw');
    const fd = openSync(raw, 'w');
    ftruncateSync(fd, 12 * MiB);
    const chunk = Buffer.alloc(MiB);
    for (let index = 0; index < 6; index++) {
      randomFillSync(chunk);
      if (index === 1) chunk.fill(0, 512 * 1024, 516 * 1024);
      writeSync(fd, chunk, 0, MiB, index * 2 * MiB);
    }
    closeSync(fd);
    for (const folder of [disk.path, shm]) {
      run('qemu-img', [
        'convert',
        '-f',
        'raw',
        '-O',
        'qcow2',
        '-o',
        'cluster_size=4096',
        raw,
        join(folder, 'src.qcow2'),
      ]);
      run('qemu-img', [
        'convert',
        '-f',
        'qcow2',
        '-O',
        'raw',
        join(folder, 'src.qcow2'),
        join(folder, 'qemu.raw'),
      ]);
    }
  });
  afterAll(() => {
    disk?.remove();
    if (shm !== undefined) rmSync(shm, { recursive: true, force: true });
  });

  const folders = [
    ['/dev/shm (inline writes)', () => shm],
    ['a disk folder (the pool)', () => disk.path],
  ] as const;

  /** Runs `command args...` with RLIMIT_FSIZE at `bytes` and SIGXFSZ ignored. */
  const limited = (bytes: number, command: string, args: string[], cwd: string) =>
    runStatus(
      'sh',
      ['-c', 'trap "" XFSZ; exec prlimit --fsize=$0 -- "$@"', String(bytes), command, ...args],
      {
        cwd,
      },
    );

  /** The file's data and holes as qemu-img maps them (st_blocks also counts a disk file system's
   * own extent blocks, which depend on the order of the writes). */
  const layout = (path: string) => run('qemu-img', ['map', '-f', 'raw', '--output=json', path]);

  test.each(folders)('%s: the same file as qemu-img, with its holes', (_name, folder) => {
    const cwd = folder();
    const ours = runStatus(process.execPath, [QCOW2_BIN, 'convert', '-O', 'raw', 'src.qcow2', 'ours.raw'], {
      cwd,
    });
    expect(ours.status, ours.stderr).toBe(0);
    expect(readFileSync(join(cwd, 'ours.raw')).equals(readFileSync(join(cwd, 'qemu.raw')))).toBe(true);
    expect(layout(join(cwd, 'ours.raw'))).toBe(layout(join(cwd, 'qemu.raw')));
    rmSync(join(cwd, 'ours.raw'));
  });

  test.each(folders)('%s: a write failing mid-copy is reported as qemu-img reports it', (_name, folder) => {
    const cwd = folder();
    for (const name of ['ours-n.raw', 'qemu-n.raw']) {
      run('qemu-img', ['create', '-q', '-f', 'raw', join(cwd, name), '12M']);
    }
    const ours = limited(
      4 * MiB,
      process.execPath,
      [QCOW2_BIN, 'convert', '-n', '-O', 'raw', 'src.qcow2', 'ours-n.raw'],
      cwd,
    );
    const qemu = limited(4 * MiB, 'qemu-img', ['convert', '-n', '-O', 'raw', 'src.qcow2', 'qemu-n.raw'], cwd);
    expect(qemu.status).toBe(1);
    expect(ours.status).toBe(1);
    expect(qemu.stderr).toMatch(/^qemu-img: error while writing at byte 4194304: /);
    expect(ours.stderr).toMatch(/^qcow2: error while writing at byte 4194304 of 'ours-n.raw': .*\(EFBIG\)/);
    expect(ours.stderr.trim().split('\n')).toHaveLength(1);
    const mine = readFileSync(join(cwd, 'ours-n.raw'));
    const theirs = readFileSync(join(cwd, 'qemu-n.raw'));
    expect(mine.subarray(0, 4 * MiB).equals(theirs.subarray(0, 4 * MiB))).toBe(true);
    expect(mine.subarray(0, 4 * MiB).equals(readFileSync(join(cwd, 'qemu.raw')).subarray(0, 4 * MiB))).toBe(
      true,
    );
  });
});
