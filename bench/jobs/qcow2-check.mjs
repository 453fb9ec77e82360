/**
 * `qcow2 check` against `qemu-img check`, and `qcow2 snapshot` against `qemu-img snapshot`, both
 * run as processes (start-up included on both sides), on /dev/shm:
 *
 * - check of a 1 GiB guest fully written with random bytes (qemu-img convert from a raw file),
 *   with 4 KiB and with 64 KiB clusters: every round, stdout and the exit code must be equal;
 * - snapshot create, apply and delete on copies of a 1 GiB guest with 64 KiB clusters, fully
 *   written (and for apply and delete, a snapshot taken by qemu-img, then 64 MiB rewritten): each
 *   round works on a fresh copy (the copy is not timed); afterwards `qemu-img snapshot -l` must
 *   list the same snapshots (dates aside) and `qemu-img check` must find both images clean.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { copyFile, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

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
    execFileSync('qemu-img', [
      'convert',
      '-f',
      'raw',
      '-O',
      'qcow2',
      '-o',
      `cluster_size=${clusterSize}`,
      raw,
      image,
    ]);
  } finally {
    await rm(raw, { force: true });
  }
  return image;
}

/** Runs a process; returns its wall time, exit code and output (a failure to start throws). */
function timed(command, args) {
  const start = process.hrtime.bigint();
  const result = spawnSync(command, args, { encoding: 'utf8', maxBuffer: 64 * MiB });
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  if (result.error) throw result.error;
  return { seconds, status: result.status, stdout: result.stdout, stderr: result.stderr };
}

function ok(run, what) {
  if (run.status !== 0) throw new Error(`${what} failed (exit ${run.status}): ${run.stderr}`);
  return run.seconds;
}

function checkJob(clusterSize) {
  const name = `check-${clusterSize / 1024}k`;
  const seen = {};
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
      seen.ours = `exit ${run.status}\n${run.stderr}${run.stdout}`;
      compare();
      return ok(run, 'qcow2 check');
    },
    async theirs(ctx) {
      const run = timed('qemu-img', ['check', ctx.image]);
      seen.theirs = `exit ${run.status}\n${run.stderr}${run.stdout}`;
      compare();
      return ok(run, 'qemu-img check');
    },
    async teardown(ctx) {
      console.log(`  ${name}: qcow2 check and qemu-img check printed the same and exited alike`);
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

/** `snapshot -c|-a|-d NAME` on a fresh copy of the prepared image each round. */
function snapshotJob(verb, flag) {
  const name = `snapshot-${verb}-64k`;
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
      return { image, ours: join(dir, `${name}.ours.qcow2`), theirs: join(dir, `${name}.qemu.qcow2`) };
    },
    async ours(ctx) {
      await copyFile(ctx.image, ctx.ours);
      return ok(
        timed(process.execPath, [QCOW2_BIN, 'snapshot', flag, 's1', ctx.ours]),
        `qcow2 snapshot ${flag}`,
      );
    },
    async theirs(ctx) {
      await copyFile(ctx.image, ctx.theirs);
      return ok(timed('qemu-img', ['snapshot', flag, 's1', ctx.theirs]), `qemu-img snapshot ${flag}`);
    },
    async teardown(ctx) {
      try {
        const [mine, qemu] = [snapshotList(ctx.ours), snapshotList(ctx.theirs)];
        if (mine !== qemu) throw new Error(`${name}: snapshot lists differ:\nours:\n${mine}\nqemu:\n${qemu}`);
        expectClean(ctx.ours);
        expectClean(ctx.theirs);
        if (verb === 'apply') {
          execFileSync('qemu-img', ['compare', '-q', ctx.ours, ctx.theirs]);
        }
        console.log(
          `  ${name}: same snapshot list, both images clean${verb === 'apply' ? ', same guest data' : ''}`,
        );
      } finally {
        for (const path of [ctx.image, ctx.ours, ctx.theirs]) await rm(path, { force: true });
      }
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
