/**
 * The CLI's image-to-image commands against qemu-img's, both run as processes (start-up included
 * on both sides): `qcow2 compare` against `qemu-img compare`, and `qcow2 commit` against
 * `qemu-img commit` on fresh copies of the same chain.
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
import { copyFile, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { qcow2FromRaw } from '../lib/qemu.mjs';

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
      qcow2FromRaw(raw, first);
      if (differ) {
        const handle = await open(raw, 'r+');
        // One byte flipped in the last data MiB (at 1022 MiB + 1000 bytes).
        const byte = Buffer.alloc(1);
        await handle.read(byte, 0, 1, 1022 * MiB + 1000);
        byte[0] ^= 0xff;
        await handle.write(byte, 0, 1, 1022 * MiB + 1000);
        await handle.close();
      }
      qcow2FromRaw(raw, second);
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

/**
 * A 1 GiB-guest chain: base.qcow2 with 512 MiB of data (as above), top.qcow2 over it with 256 MiB
 * written (two 128 MiB runs, one over data, one over holes). Each run commits a fresh copy (the
 * copy is not timed); teardown checks both sides left the same base.
 */
function commitJob(name, description) {
  const copyChain = async (ctx, tag) => {
    const base = join(ctx.dir, `${tag}.base.qcow2`);
    const top = join(ctx.dir, `${tag}.top.qcow2`);
    await copyFile(ctx.base, base);
    await copyFile(ctx.top, top);
    execFileSync('qemu-img', ['rebase', '-u', '-b', base, '-F', 'qcow2', top]);
    return { base, top };
  };
  const last = {};
  return {
    name,
    description,
    tools: ['qemu-img', 'qemu-io'],
    async setup(dir) {
      const raw = join(dir, `${name}.raw`);
      const base = join(dir, `${name}.base.qcow2`);
      const top = join(dir, `${name}.top.qcow2`);
      await makeHalfFullRaw(raw);
      qcow2FromRaw(raw, base);
      await rm(raw, { force: true });
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
      execFileSync('qemu-io', [
        '-f',
        'qcow2',
        '-c',
        'write -q -P 0x5a 0 128M',
        '-c',
        'write -q -P 0x33 513M 128M',
        top,
      ]);
      return { dir, base, top };
    },
    async ours(ctx) {
      const chain = await copyChain(ctx, 'ours');
      const run = timed(process.execPath, [QCOW2_BIN, 'commit', '-q', '-f', 'qcow2', chain.top]);
      if (run.status !== 0) throw new Error(`qcow2 commit failed: ${run.stdout}`);
      last.ours = chain;
      return run.seconds;
    },
    async theirs(ctx) {
      const chain = await copyChain(ctx, 'theirs');
      const run = timed('qemu-img', ['commit', '-q', '-f', 'qcow2', chain.top]);
      if (run.status !== 0) throw new Error(`qemu-img commit failed: ${run.stdout}`);
      last.theirs = chain;
      return run.seconds;
    },
    async teardown(ctx) {
      try {
        const same = spawnSync('qemu-img', ['compare', '-q', last.ours.base, last.theirs.base]);
        if (same.status !== 0) throw new Error(`${name}: the committed bases differ`);
        const check = spawnSync('qemu-img', ['check', '-q', last.ours.base]);
        if (check.status !== 0) throw new Error(`${name}: qemu-img check of our base: ${check.status}`);
        console.log(`  ${name}: both committed bases read the same, ours is clean`);
      } finally {
        for (const file of [
          ctx.base,
          ctx.top,
          last.ours?.base,
          last.ours?.top,
          last.theirs?.base,
          last.theirs?.top,
        ]) {
          if (file !== undefined) await rm(file, { force: true });
        }
      }
    },
  };
}

export const jobs = [
  commitJob('cli-commit', 'commit a 256 MiB overlay into a 1 GiB qcow2 base with 512 MiB data'),
  compareJob('cli-compare-identical', 'compare two 1 GiB qcow2 images, 512 MiB data, identical', false),
  compareJob(
    'cli-compare-differ-end',
    'compare two 1 GiB qcow2 images, 512 MiB data, differing near the end',
    true,
  ),
];
