/**
 * Writable qcow2 exports through qcow2-nbd: qemu-io writes of every kind compared with a raw file
 * that got the same writes (`qemu-img compare`), the image check-clean and its dirty bit cleared
 * after a clean stop; fio from 4 jobs with verify; kill -9 during fio random writes, round after
 * round: `qemu-img check` finds no corruption and data flushed before the kill is intact; SIGTERM
 * mid-write and an image left dirty by QEMU end clean.
 */
import { spawn } from 'node:child_process';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  exited,
  fioVerify,
  must,
  runAsync,
  startServer as startNbdServer,
  startQemuNbd,
} from '../src/nbd-server.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const ok = requireTools('qemu-img', 'qemu-io', 'fio', 'nbdinfo');

/** Every export here is writable: the bin with `-t` (persistent) in front of `args`. */
function startServer(dir: string, args: string[]) {
  return startNbdServer(dir, ['-t', ...args]);
}

/** fio random 4 KiB writes to `uri` for 10 s from 2 jobs, run in the background (`extra` appended). */
function fioRandomWrites(name: string, uri: string, extra: readonly string[] = [], size = '60M') {
  return spawn(
    'fio',
    [
      `--name=${name}`,
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      '--numjobs=2',
      '--thread', // one process: SIGKILL stops every job
      `--size=${size}`,
      '--time_based',
      '--runtime=10',
      ...extra,
    ],
    { stdio: 'ignore' },
  );
}

function infoJson(image: string): { dirtyFlag: boolean; lazy: boolean | undefined } {
  const info = JSON.parse(run('qemu-img', ['info', '--output=json', image])) as {
    'dirty-flag'?: boolean;
    'format-specific'?: { data?: { 'lazy-refcounts'?: boolean } };
  };
  return { dirtyFlag: info['dirty-flag'] === true, lazy: info['format-specific']?.data?.['lazy-refcounts'] };
}

const MiB = 1024 * 1024;

/** qemu-io commands of every kind: unaligned, aio in parallel, writev, FUA, zeroes, discard, flush. */
const WRITES = [
  'write -P 0x11 0 64k',
  'write -P 0x22 1000 5000',
  'write -P 0x23 65535 3',
  'aio_write -P 0x33 1M 128k',
  'aio_write -P 0x44 2M 64k',
  'aio_write -P 0x45 3M 192k',
  'aio_flush',
  'writev -P 0x55 4M 4k 8k 512',
  'write -f -P 0x66 5M 4k',
  'write -z 1M 4k',
  'write -z 1000 100',
  'write -z -u 6M 1M',
  'discard 2M 64k',
  'discard 3M 4k',
  'write -P 0x77 7M 1M',
  'write -z 7M 512k',
  'flush',
];

const READS = [
  'read -P 0x11 0 1000',
  'read -P 0 1000 100',
  'read -P 0x22 1100 4900',
  'read -P 0x66 5M 4k',
  'read -P 0 6M 1M',
  'read -P 0x77 7680k 512k',
  'read -P 0 7M 512k',
];

function qemuIoArgs(commands: string[]): string[] {
  return commands.flatMap((command) => ['-c', command]);
}

describe.skipIf(!ok)('qcow2-nbd writable qcow2 exports', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-nbd-qcow2-write-');
  });
  afterAll(() => dir.remove());

  it.each([
    ['plain', []],
    ['lazy refcounts, 4 KiB clusters', ['-o', 'lazy_refcounts=on,cluster_size=4096']],
    ['extended L2, over a backing file', ['-o', 'extended_l2=on,cluster_size=64k']],
  ] as const)(
    'qemu-io writes of every kind (%s) match a raw file; clean after stop',
    async (name, createArgs) => {
      const tag = name.replace(/\W+/g, '-');
      const image = join(dir.path, `${tag}.qcow2`);
      const reference = join(dir.path, `${tag}.raw`);
      run('qemu-img', ['create', '-f', 'raw', reference, '16M']);
      if (name.includes('backing')) {
        const base = join(dir.path, `${tag}-base.raw`);
        run('qemu-img', ['create', '-f', 'raw', base, '16M']);
        run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xbb 0 16M', base]);
        run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xbb 0 16M', reference]);
        run('qemu-img', ['create', '-f', 'qcow2', '-F', 'raw', '-b', base, ...createArgs, image]);
      } else {
        run('qemu-img', ['create', '-f', 'qcow2', ...createArgs, image, '16M']);
      }
      // Over a backing file, what a discarded range reads is left open by NBD: QEMU reads zeros,
      // qcow2-core (for now) the backing file's data. So that case makes no discards.
      const writes = name.includes('backing')
        ? WRITES.filter((command) => !command.startsWith('discard'))
        : WRITES;
      const server = await startServer(dir.path, ['-f', 'qcow2', '--discard=unmap', image]);
      try {
        const out = await must('qemu-io', ['-f', 'raw', ...qemuIoArgs([...writes, ...READS]), server.uri]);
        expect(out).not.toMatch(/fail|error/i);
      } finally {
        expect(await server.stop()).toBe(0);
      }
      run('qemu-io', ['-f', 'raw', ...qemuIoArgs(writes), reference]);
      const compare = runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', reference, image]);
      expect(compare.status, compare.stdout + compare.stderr).toBe(0);
      const check = runStatus('qemu-img', ['check', image]);
      expect(check.status, check.stdout + check.stderr).toBe(0);
      expect(infoJson(image).dirtyFlag).toBe(false);
    },
  );

  it('--discard=unmap gives TRIMmed clusters back to the file system, as qemu-nbd', async () => {
    const ours = join(dir.path, 'trim-ours.qcow2');
    const theirs = join(dir.path, 'trim-qemu.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ours, '64M']);
    run('qemu-io', ['-c', 'write -P 0x5a 0 32M', ours]);
    run('cp', [ours, theirs]);
    const allocated = (file: string) => statSync(file).blocks * 512;
    const before = allocated(ours);
    const server = await startServer(dir.path, ['-f', 'qcow2', '--discard=unmap', ours]);
    try {
      expect(await must('qemu-io', ['-f', 'raw', '-c', 'discard 0 16M', server.uri])).not.toMatch(
        /fail|error/i,
      );
    } finally {
      expect(await server.stop()).toBe(0);
    }
    const qemu = startQemuNbd(dir.path, ['-f', 'qcow2', '--discard=unmap', theirs]);
    try {
      await must('qemu-io', ['-f', 'raw', '-c', 'discard 0 16M', qemu.uri]);
    } finally {
      await qemu.stop();
    }
    // 16 MiB less on disk, give or take a metadata cluster, as qemu-nbd leaves it.
    expect(before - allocated(ours)).toBeGreaterThan(15 * 1024 * 1024);
    expect(Math.abs(allocated(ours) - allocated(theirs))).toBeLessThan(1024 * 1024);
    const compare = runStatus('qemu-img', ['compare', theirs, ours]);
    expect(compare.status, compare.stdout + compare.stderr).toBe(0);
    const check = runStatus('qemu-img', ['check', ours]);
    expect(check.status, check.stdout + check.stderr).toBe(0);
  });

  it('fio from 4 jobs with verify on a qcow2 export (multi-conn), then check-clean', async () => {
    const image = join(dir.path, 'fio.qcow2');
    run('qemu-img', ['create', '-f', 'qcow2', image, '64M']);
    const server = await startServer(dir.path, ['-e', '4', '-f', 'qcow2', image]);
    try {
      expect((await runAsync('nbdinfo', ['--can', 'multi-conn', server.uri])).status).toBe(0);
      const fio = await fioVerify(server.uri);
      expect(fio).toMatch(/err= 0/);
    } finally {
      expect(await server.stop()).toBe(0);
    }
    const check = runStatus('qemu-img', ['check', image]);
    expect(check.status, check.stdout + check.stderr).toBe(0);
  });

  it('SIGTERM during fio random writes: requests finish, image flushed, check-clean, dirty bit cleared', async () => {
    const image = join(dir.path, 'sigterm.qcow2');
    run('qemu-img', ['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', image, '64M']);
    const server = await startServer(dir.path, ['-e', '0', '-f', 'qcow2', image]);
    const fio = fioRandomWrites('term', server.uri);
    try {
      const grown = statSync(image).size + 2 * MiB;
      const deadline = Date.now() + 30_000;
      while (statSync(image).size < grown && Date.now() < deadline && fio.exitCode === null) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      expect(statSync(image).size).toBeGreaterThanOrEqual(grown);
      expect(await server.stop()).toBe(0);
    } finally {
      fio.kill('SIGKILL');
      await exited(fio);
      await server.kill();
    }
    const check = runStatus('qemu-img', ['check', image]);
    expect(check.status, check.stdout + check.stderr).toBe(0);
    expect(infoJson(image)).toEqual({ dirtyFlag: false, lazy: true });
  });

  it('serves an image left dirty by a QEMU crash with lazy refcounts: repaired on open, clean after', async () => {
    const image = join(dir.path, 'lazy-crash.qcow2');
    run('qemu-img', ['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', image, '64M']);
    // qemu-io kills itself after a flushed write: the image keeps its dirty bit.
    runStatus('qemu-io', ['-c', 'write -P 0x5c 1M 1M', '-c', 'flush', '-c', 'sigraise 9', image]);
    expect(infoJson(image).dirtyFlag).toBe(true);
    const again = await startServer(dir.path, ['-f', 'qcow2', image]);
    expect(await must('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5c 1M 1M', again.uri])).not.toMatch(/fail/i);
    expect(await again.stop()).toBe(0);
    const check = runStatus('qemu-img', ['check', image]);
    expect([0, 3], check.stdout + check.stderr).toContain(check.status);
    expect(infoJson(image).dirtyFlag).toBe(false);
  });

  it('kill -9 during fio random writes, 12 rounds: no corruption, flushed data intact', async () => {
    const image = join(dir.path, 'crash.qcow2');
    // Large enough that every round's random writes still allocate (the kill waits for growth):
    // a fast server fills a small disk within a few rounds.
    const disk = 2048 * MiB;
    const stampsAt = disk - MiB;
    const fioBytes = disk - 16 * MiB;
    run('qemu-img', ['create', '-f', 'qcow2', image, String(disk)]);
    const rounds = 12;
    for (let round = 0; round < rounds; round++) {
      const server = await startServer(dir.path, ['-e', '0', '-f', 'qcow2', image]);
      try {
        // Flushed before the kill: one 64 KiB stamp per round in the last 1 MiB of the disk.
        const stamp = (0x10 + round).toString(16);
        await must('qemu-io', [
          '-f',
          'raw',
          '-c',
          `write -P 0x${stamp} ${stampsAt + round * 65536} 64k`,
          '-c',
          'flush',
          server.uri,
        ]);
        const fio = fioRandomWrites(
          'crash',
          server.uri,
          [`--randseed=${round + 1}`, '--fsync=64'],
          String(fioBytes),
        );
        // Kill once fio's writes are under way (the file has grown), at a different moment each round.
        const grown = statSync(image).size + 2 * MiB;
        const deadline = Date.now() + 30_000;
        while (statSync(image).size < grown && Date.now() < deadline && fio.exitCode === null) {
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
        expect(statSync(image).size, `round ${round}: fio wrote nothing`).toBeGreaterThanOrEqual(grown);
        await new Promise((resolve) => setTimeout(resolve, (round * 37) % 200));
        await server.kill();
        fio.kill('SIGKILL');
        await exited(fio);
      } finally {
        await server.kill();
      }
      const check = runStatus('qemu-img', ['check', image]);
      expect([0, 3], `round ${round}: ${check.stdout}${check.stderr}`).toContain(check.status);
      const reads = [];
      for (let earlier = 0; earlier <= round; earlier++) {
        reads.push('-c', `read -P 0x${(0x10 + earlier).toString(16)} ${stampsAt + earlier * 65536} 64k`);
      }
      const verify = runStatus('qemu-io', ['-r', '-f', 'qcow2', ...reads, image]);
      expect(verify.stdout + verify.stderr, `round ${round}`).not.toMatch(/fail|error/i);
    }
    // fio did write before the kills: data clusters below the stamps.
    const map = JSON.parse(run('qemu-img', ['map', '--output=json', image])) as {
      start: number;
      length: number;
      data: boolean;
    }[];
    const fioData = map.filter((entry) => entry.data && entry.start < fioBytes);
    expect(fioData.reduce((sum, entry) => sum + entry.length, 0)).toBeGreaterThan(8 * MiB);
    // A clean stop afterwards leaves the image clean apart from the leaks the kills left.
    const server = await startServer(dir.path, ['-f', 'qcow2', image]);
    expect(
      await must('qemu-io', ['-f', 'raw', '-c', 'write -P 0x99 0 4k', '-c', 'read -P 0x99 0 4k', server.uri]),
    ).not.toMatch(/fail/i);
    expect(await server.stop()).toBe(0);
    const check = runStatus('qemu-img', ['check', image]);
    expect([0, 3], check.stdout + check.stderr).toContain(check.status);
    expect(infoJson(image).dirtyFlag).toBe(false);
  });
});
