/**
 * `qcow2 check` against `qemu-img check`, and `qcow2 snapshot` against `qemu-img snapshot`, both
 * run as processes (start-up included on both sides), on /dev/shm:
 *
 * - check of a 1 GiB guest fully written with random bytes (qemu-img convert from a raw file),
 *   with 4 KiB and with 64 KiB clusters: every round, stdout and the exit code must be equal;
 * - snapshot create, apply and delete on copies of a 1 GiB guest with 64 KiB clusters, fully
 *   written (and for apply and delete, a snapshot taken by qemu-img, then 64 MiB rewritten): each
 *   round works on a fresh copy (the copy is not timed); after each run `qemu-img check` must find
 *   the copy clean, and `qemu-img snapshot -l` (dates aside; after apply, `qemu-img map` too) must
 *   be the same for ours and qemu-img's.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { copyFile, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { qcow2FromRaw } from '../lib/qemu.mjs';

const QCOW2_BIN = fileURLToPath(new URL('../../packages/qcow2-cli/dist/bin/qcow2.js', import.meta.url));
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** A 1 GiB raw file of random bytes (no run of zeros: every cluster gets allocated). */
async function makeRandomRaw(file) {
  const handle = await open(file, 'w');
  const chunk = Buffer.alloc(16 * MiB);
  for (let at = 0; at < GiB; at += chunk.length) {
    await handle.write(randomFillSync(chunk), 0, chunk.length, at);
  }
  await handle.close();
}

/** A fully written 1 GiB qcow2 image with `clusterSize` clusters, made by qemu-img. */
async function fullImage(dir, clusterSize) {
  const raw = join(dir, `full-${clusterSize}.raw`);
  const image = join(dir, `full-${clusterSize}.qcow2`);
  await makeRandomRaw(raw);
  try {
    qcow2FromRaw(raw, image, { clusterSize });
  } finally {
    await rm(raw, { force: true });
  }
  return image;
}

/**
 * Runs a process; returns its wall time, CPU time (user + system, from bash's `time`: steadier
 * than wall time on a loaded machine), exit code and output (a failure to start throws).
 */
function timed(command, args) {
  const start = process.hrtime.bigint();
  // bash's `time` reports CPU time to the millisecond (/usr/bin/time only to 10 ms).
  const script = 'TIMEFORMAT="cpu %3U %3S"; time "$@"';
  const result = spawnSync('bash', ['-c', script, 'bash', command, ...args], {
    encoding: 'utf8',
    maxBuffer: 64 * MiB,
  });
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  if (result.error) throw result.error;
  const lines = result.stderr.split('\n');
  let last = lines.length - 1;
  while (last > 0 && lines[last] === '') last--;
  const match = /^cpu ([0-9.]+) ([0-9.]+)$/.exec(lines[last] ?? '');
  const cpuSeconds = match ? Number(match[1]) + Number(match[2]) : Number.NaN;
  const stderr = match ? `${lines.slice(0, last).join('\n')}${last > 0 ? '\n' : ''}` : result.stderr;
  return { seconds, cpuSeconds, status: result.status, stdout: result.stdout, stderr };
}

/** CPU seconds of each side's runs, printed as medians after the job. */
function cpuLog() {
  const log = { ours: [], theirs: [] };
  return {
    add(side, run) {
      log[side].push(run.cpuSeconds);
    },
    print(name) {
      const median = (values) => {
        const sorted = [...values].sort((a, b) => a - b);
        const mid = sorted.length >> 1;
        return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
      };
      const ours = median(log.ours);
      const theirs = median(log.theirs);
      console.log(
        `  ${name}: CPU time (user + system) ours ${(ours * 1000).toFixed(0)} ms, qemu ${(theirs * 1000).toFixed(0)} ms, ratio ${(ours / theirs).toFixed(2)}`,
      );
    },
  };
}

function ok(run, what) {
  if (run.status !== 0) throw new Error(`${what} failed (exit ${run.status}): ${run.stderr}`);
  return run.seconds;
}

function checkJob(clusterSize) {
  const name = `check-${clusterSize / 1024}k`;
  const seen = {};
  const cpu = cpuLog();
  const compare = () => {
    if (seen.ours === undefined || seen.theirs === undefined) return;
    if (seen.ours !== seen.theirs) {
      throw new Error(`${name}: outputs differ:\nours: ${seen.ours}\nqemu: ${seen.theirs}`);
    }
  };
  return {
    name,
    description: `check, 1 GiB guest fully written, ${clusterSize / 1024} KiB clusters`,
    tools: ['qemu-img'],
    async setup(dir) {
      return { image: await fullImage(dir, clusterSize) };
    },
    async ours(ctx) {
      const run = timed(process.execPath, [QCOW2_BIN, 'check', ctx.image]);
      cpu.add('ours', run);
      seen.ours = `exit ${run.status}\n${run.stderr}${run.stdout}`;
      compare();
      return ok(run, 'qcow2 check');
    },
    async theirs(ctx) {
      const run = timed('qemu-img', ['check', ctx.image]);
      cpu.add('theirs', run);
      seen.theirs = `exit ${run.status}\n${run.stderr}${run.stdout}`;
      compare();
      return ok(run, 'qemu-img check');
    },
    async teardown(ctx) {
      console.log(`  ${name}: qcow2 check and qemu-img check printed the same and exited alike`);
      cpu.print(name);
      await rm(ctx.image, { force: true });
    },
  };
}

/** `qemu-img snapshot -l` without the date column (the copies were made at different times). */
function snapshotList(image) {
  return execFileSync('qemu-img', ['snapshot', '-l', image], { encoding: 'utf8' })
    .split('\n')
    .slice(2)
    .filter((line) => line !== '')
    .map((line) => {
      const f = line.split(/\s+/);
      return `${f[0]} ${f[1]} ${f[2]} ${f[3]} ${f[6]} ${f[7]}`;
    })
    .join('\n');
}

function expectClean(image) {
  const run = spawnSync('qemu-img', ['check', image], { encoding: 'utf8' });
  if (run.status !== 0)
    throw new Error(`qemu-img check ${image}: exit ${run.status}: ${run.stdout}${run.stderr}`);
}

/** What a finished snapshot operation left: the snapshot list (dates aside) and, after apply,
 * the active layer's mapping (apply points the active L1 at the snapshot's tables, so equal maps
 * mean equal guest data); the image must check clean. */
function outcome(image, verb) {
  expectClean(image);
  const map =
    verb === 'apply' ? execFileSync('qemu-img', ['map', '--output=json', image], { encoding: 'utf8' }) : '';
  return `${snapshotList(image)}\n${map}`;
}

/**
 * `snapshot -c|-a|-d NAME` on a fresh copy of the prepared image each round (one work copy at a
 * time: with the prepared image, two 1 GiB files on /dev/shm at most); each side's outcome is
 * recorded and removed before the other side runs, and the two must agree.
 */
function snapshotJob(verb, flag) {
  const name = `snapshot-${verb}-64k`;
  const seen = {};
  const cpu = cpuLog();
  const run = async (ctx, side, command, args) => {
    await copyFile(ctx.image, ctx.work);
    try {
      const done = timed(command, [...args, ctx.work]);
      const seconds = ok(done, `${command} snapshot ${flag}`);
      cpu.add(side, done);
      seen[side] = outcome(ctx.work, verb);
      if (seen.ours !== undefined && seen.theirs !== undefined && seen.ours !== seen.theirs) {
        throw new Error(`${name}: outcomes differ:\nours:\n${seen.ours}\nqemu:\n${seen.theirs}`);
      }
      return seconds;
    } finally {
      await rm(ctx.work, { force: true });
    }
  };
  return {
    name,
    description: `snapshot ${flag}, 1 GiB guest fully written, 64 KiB clusters${verb === 'create' ? '' : ', one snapshot'}`,
    tools: ['qemu-img', 'qemu-io'],
    async setup(dir) {
      const image = await fullImage(dir, 65536);
      if (verb !== 'create') {
        execFileSync('qemu-img', ['snapshot', '-c', 's1', image]);
        execFileSync('qemu-io', ['-c', 'write -P 7 128M 64M', image], { stdio: 'ignore' });
      }
      return { image, work: join(dir, `${name}.work.qcow2`) };
    },
    ours: (ctx) => run(ctx, 'ours', process.execPath, [QCOW2_BIN, 'snapshot', flag, 's1']),
    theirs: (ctx) => run(ctx, 'theirs', 'qemu-img', ['snapshot', flag, 's1']),
    async teardown(ctx) {
      await rm(ctx.image, { force: true });
      if (seen.ours !== undefined && seen.ours === seen.theirs) {
        console.log(
          `  ${name}: same snapshot list${verb === 'apply' ? ' and guest mapping' : ''}, both images clean`,
        );
      }
      cpu.print(name);
    },
  };
}

export const jobs = [
  checkJob(4096),
  checkJob(65536),
  snapshotJob('create', '-c'),
  snapshotJob('apply', '-a'),
  snapshotJob('delete', '-d'),
];
