/**
 * `qcow2 compare` against `qemu-img compare` on the same pair of images, both run as processes
 * (start-up included on both sides).
 *
 * Each pair is two 1 GiB qcow2 images (64 KiB clusters) holding the same 512 MiB of data (1 MiB
 * runs of random bytes at even MiB offsets, every other MiB unallocated), converted separately
 * by qemu-img so their host layouts are their own:
 * - identical: the whole guest is compared (exit 0);
 * - differing near the end: one byte differs in the last data MiB (exit 1), so nearly all of the
 *   data is compared before the difference is found.
 * Every round checks that both tools give the same exit code and the same output line.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const QCOW2_BIN = fileURLToPath(new URL('../../packages/qcow2-cli/dist/bin/qcow2.js', import.meta.url));
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** 512 MiB of random data in a 1 GiB raw file: 1 MiB runs at even MiB offsets. */
async function makeHalfFullRaw(file) {
  const handle = await open(file, 'w');
  await handle.truncate(GiB);
  const chunk = Buffer.alloc(MiB);
  for (let index = 0; index < 512; index++) {
    await handle.write(randomFillSync(chunk), 0, MiB, index * 2 * MiB);
  }
  await handle.close();
}

function toQcow2(raw, image) {
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);
}

function timed(command, args) {
  const start = process.hrtime.bigint();
  const result = spawnSync(command, args, { encoding: 'utf8' });
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  if (result.status !== 0 && result.status !== 1) {
    throw new Error(`${command} ${args.join(' ')} failed (${result.status}): ${result.stderr}`);
  }
  return { seconds, status: result.status, stdout: result.stdout };
}

function compareJob(name, description, differ) {
  const seen = { ours: undefined, theirs: undefined };
  return {
    name,
    description,
    tools: ['qemu-img'],
    async setup(dir) {
      const raw = join(dir, `${name}.raw`);
      const first = join(dir, `${name}.a.qcow2`);
      const second = join(dir, `${name}.b.qcow2`);
      await makeHalfFullRaw(raw);
      toQcow2(raw, first);
      if (differ) {
        const handle = await open(raw, 'r+');
        // One byte flipped in the last data MiB (at 1022 MiB + 1000 bytes).
        const byte = Buffer.alloc(1);
        await handle.read(byte, 0, 1, 1022 * MiB + 1000);
        byte[0] ^= 0xff;
        await handle.write(byte, 0, 1, 1022 * MiB + 1000);
        await handle.close();
      }
      toQcow2(raw, second);
      await rm(raw, { force: true });
      return { first, second };
    },
    async ours(ctx) {
      const run = timed(process.execPath, [
        QCOW2_BIN,
        'compare',
        '-f',
        'qcow2',
        '-F',
        'qcow2',
        ctx.first,
        ctx.second,
      ]);
      seen.ours = `${run.status} ${run.stdout.trim()}`;
      return run.seconds;
    },
    async theirs(ctx) {
      const run = timed('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', ctx.first, ctx.second]);
      seen.theirs = `${run.status} ${run.stdout.trim()}`;
      return run.seconds;
    },
    async teardown(ctx) {
      try {
        if (seen.ours !== seen.theirs) {
          throw new Error(`${name}: verdicts differ: ours '${seen.ours}', qemu-img '${seen.theirs}'`);
        }
        console.log(`  ${name}: same verdict on both sides: ${seen.ours}`);
      } finally {
        await rm(ctx.first, { force: true });
        await rm(ctx.second, { force: true });
      }
    },
  };
}

export const jobs = [
  compareJob('cli-compare-identical', 'compare two 1 GiB qcow2 images, 512 MiB data, identical', false),
  compareJob(
    'cli-compare-differ-end',
    'compare two 1 GiB qcow2 images, 512 MiB data, differing near the end',
    true,
  ),
];
