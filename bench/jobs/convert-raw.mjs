/**
 * `qcow2 convert -O raw` against `qemu-img convert -O raw` on the same qcow2 images, both run as
 * processes (start-up included on both sides), writing a fresh sparse raw file each round.
 *
 * - a 1 GiB guest holding 512 MiB of data (1 MiB runs alternating random bytes and text, every
 *   other MiB left unallocated), with 64 KiB and with 4 KiB clusters;
 * - a sparse 8 TiB guest holding 2 MiB (1 MiB at each end): time must follow the data, not the size;
 * - the 64 KiB image again with `-S 0` (no zero scan, output fully allocated), where our data
 *   ranges go file to file through copy_file_range.
 *
 * Peak memory (max RSS, from /usr/bin/time) of each side is printed after each job, and every
 * round checks the two outputs are identical (qemu-img compare) and ours is no less sparse.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { open, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { qcow2FromRaw } from '../lib/qemu.mjs';

const QCOW2_BIN = fileURLToPath(new URL('../../packages/qcow2-cli/dist/bin/qcow2.js', import.meta.url));
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

/** 512 MiB of data in a 1 GiB raw file: 1 MiB runs at even MiB offsets, random and text in turn. */
async function makeHalfFullRaw(file) {
  const handle = await open(file, 'w');
  await handle.truncate(GiB);
  const random = Buffer.alloc(MiB);
  const text = Buffer.from(
    'The quick brown fox jumps over the lazy dog; qcow2 clusters, L2 tables and refcounts.\n'.repeat(
      Math.ceil(MiB / 86),
    ),
  ).subarray(0, MiB);
  for (let index = 0; index < 512; index++) {
    const chunk = index % 2 === 0 ? randomFillSync(random) : text;
    await handle.write(chunk, 0, MiB, index * 2 * MiB);
  }
  await handle.close();
}

function timed(command, args) {
  const start = process.hrtime.bigint();
  const result = spawnSync('/usr/bin/time', ['-f', '%M', command, ...args], { encoding: 'utf8' });
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  if (result.status !== 0) throw new Error(`${command} ${args.join(' ')} failed: ${result.stderr}`);
  const lines = result.stderr.trim().split('\n');
  const maxRssKiB = Number(lines[lines.length - 1]);
  return { seconds, maxRssKiB };
}

function convertJob(name, description, makeImage, extraArgs = []) {
  const peaks = { ours: 0, theirs: 0 };
  /** One side's run into a fresh output file; its peak memory is kept. */
  const convert = async (ctx, side, command, prefix) => {
    await rm(ctx[side], { force: true });
    const run = timed(command, [
      ...prefix,
      'convert',
      '-f',
      'qcow2',
      '-O',
      'raw',
      ...extraArgs,
      ctx.image,
      ctx[side],
    ]);
    peaks[side] = Math.max(peaks[side], run.maxRssKiB);
    return run.seconds;
  };
  return {
    name,
    description,
    tools: ['qemu-img'],
    async setup(dir) {
      const image = await makeImage(dir);
      return { dir, image, ours: join(dir, `${name}.ours.raw`), theirs: join(dir, `${name}.qemu.raw`) };
    },
    ours: (ctx) => convert(ctx, 'ours', process.execPath, [QCOW2_BIN]),
    theirs: (ctx) => convert(ctx, 'theirs', 'qemu-img', []),
    async teardown(ctx) {
      try {
        execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', ctx.theirs, ctx.ours]);
        const [mine, qemu] = await Promise.all([stat(ctx.ours), stat(ctx.theirs)]);
        console.log(
          `  ${name}: outputs identical; allocated ours ${(mine.blocks / 2048).toFixed(1)} MiB, qemu ${(qemu.blocks / 2048).toFixed(1)} MiB; ` +
            `peak RSS ours ${(peaks.ours / 1024).toFixed(0)} MiB, qemu ${(peaks.theirs / 1024).toFixed(0)} MiB`,
        );
      } finally {
        await rm(ctx.image, { force: true });
        await rm(ctx.ours, { force: true });
        await rm(ctx.theirs, { force: true });
      }
    },
  };
}

function halfFull(clusterSize) {
  return async (dir) => {
    const raw = join(dir, `convert-raw-${clusterSize}.src.raw`);
    const image = join(dir, `convert-raw-${clusterSize}.src.qcow2`);
    await makeHalfFullRaw(raw);
    qcow2FromRaw(raw, image, { clusterSize });
    await rm(raw, { force: true });
    return image;
  };
}

async function sparse8T(dir) {
  const image = join(dir, 'convert-raw-sparse-8t.src.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(8 * TiB)]);
  execFileSync(
    'qemu-io',
    ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', '-c', `write -P 0xa5 ${8 * TiB - MiB} 1M`, image],
    {
      stdio: 'ignore',
    },
  );
  return image;
}

export const jobs = [
  convertJob('convert-raw-64k', 'qcow2 -> raw, 1 GiB guest, 512 MiB data, 64 KiB clusters', halfFull(65536)),
  convertJob('convert-raw-4k', 'qcow2 -> raw, 1 GiB guest, 512 MiB data, 4 KiB clusters', halfFull(4096)),
  convertJob('convert-raw-sparse-8t', 'qcow2 -> raw, 8 TiB guest holding 2 MiB', sparse8T),
  convertJob(
    'convert-raw-64k-S0',
    'qcow2 -> raw -S 0 (fully allocated), 1 GiB guest, 512 MiB data, 64 KiB clusters',
    halfFull(65536),
    ['-S', '0'],
  ),
];
