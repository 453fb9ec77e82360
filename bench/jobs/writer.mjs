/**
 * @qcowkit/qcow2-writer against qemu-img, both run as processes (start-up included on both sides),
 * on /dev/shm:
 *
 * - raw -> qcow2 of a 1 GiB guest holding 512 MiB of data (1 MiB runs alternating random bytes and
 *   text, every other MiB unallocated): `qcow2 convert -O qcow2` (the bundled CLI, which calls
 *   `convertToQcow2`) vs `qemu-img convert -O qcow2`;
 * - the same with compression: `compress: true` (worker threads) vs `qemu-img convert -c`, with
 *   zlib and with zstd (`compressionType: 'zstd'` vs `-o compression_type=zstd`);
 * - creating an empty 1 PiB image: `qcow2 create` vs `qemu-img create`.
 *
 * Every round checks the output (qemu-img check and compare); peak RSS is printed per job.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { open, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const QCOW2_BIN = fileURLToPath(new URL('../../packages/qcow2-cli/dist/bin/qcow2.js', import.meta.url));

/** `qcow2 convert -f raw -O qcow2 ...` as a user runs it. */
function cli(...args) {
  return [process.execPath, [QCOW2_BIN, 'convert', '-f', 'raw', '-O', 'qcow2', ...args]];
}

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
  return { seconds, maxRssKiB: Number(lines[lines.length - 1]) };
}

function verify(raw, image) {
  execFileSync('qemu-img', ['check', '-q', image]);
  if (raw !== undefined) execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', raw, image]);
}

function job(name, description, { setup, ours, theirs, raw }) {
  const peaks = { ours: 0, theirs: 0 };
  return {
    name,
    description,
    tools: ['qemu-img'],
    async setup(dir) {
      const ctx = { dir, ours: join(dir, `${name}.ours.qcow2`), theirs: join(dir, `${name}.qemu.qcow2`) };
      await setup?.(ctx);
      return ctx;
    },
    async ours(ctx) {
      await rm(ctx.ours, { force: true });
      const [command, args] = ours(ctx);
      const run = timed(command, args);
      peaks.ours = Math.max(peaks.ours, run.maxRssKiB);
      verify(raw?.(ctx), ctx.ours);
      return run.seconds;
    },
    async theirs(ctx) {
      await rm(ctx.theirs, { force: true });
      const [command, args] = theirs(ctx);
      const run = timed(command, args);
      peaks.theirs = Math.max(peaks.theirs, run.maxRssKiB);
      return run.seconds;
    },
    async teardown(ctx) {
      const size = async (path) => (await stat(path).catch(() => ({ size: Number.NaN }))).size;
      const [sizeOurs, sizeTheirs] = [await size(ctx.ours), await size(ctx.theirs)];
      console.log(
        `  ${name}: file ours ${(sizeOurs / MiB).toFixed(1)} MiB, qemu ${(sizeTheirs / MiB).toFixed(1)} MiB; ` +
          `peak RSS ours ${(peaks.ours / 1024).toFixed(0)} MiB, qemu ${(peaks.theirs / 1024).toFixed(0)} MiB`,
      );
      await rm(ctx.ours, { force: true });
      await rm(ctx.theirs, { force: true });
      if (ctx.raw !== undefined) await rm(ctx.raw, { force: true });
    },
  };
}

const halfFull = {
  async setup(ctx) {
    ctx.raw = join(ctx.dir, 'writer-half.raw');
    await makeHalfFullRaw(ctx.raw);
  },
  raw: (ctx) => ctx.raw,
};

export const jobs = [
  job('writer-convert', 'raw -> qcow2, 1 GiB guest, 512 MiB data', {
    ...halfFull,
    ours: (ctx) => cli(ctx.raw, ctx.ours),
    theirs: (ctx) => ['qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ctx.raw, ctx.theirs]],
  }),
  job('writer-convert-c', 'raw -> qcow2 compressed (zlib), 1 GiB guest, 512 MiB data', {
    ...halfFull,
    ours: (ctx) => cli('-c', ctx.raw, ctx.ours),
    theirs: (ctx) => ['qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', ctx.raw, ctx.theirs]],
  }),
  job('writer-convert-zstd', 'raw -> qcow2 compressed (zstd), 1 GiB guest, 512 MiB data', {
    ...halfFull,
    ours: (ctx) => cli('-c', '-o', 'compression_type=zstd', ctx.raw, ctx.ours),
    theirs: (ctx) => [
      'qemu-img',
      ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', ctx.raw, ctx.theirs],
    ],
  }),
  job('writer-create-1p', 'create an empty 1 PiB image', {
    // The command a user runs (start-up included), with qemu-img's arguments.
    ours: (ctx) => [process.execPath, [QCOW2_BIN, 'create', '-q', '-f', 'qcow2', ctx.ours, String(2 ** 50)]],
    theirs: (ctx) => ['qemu-img', ['create', '-q', '-f', 'qcow2', ctx.theirs, String(2 ** 50)]],
  }),
];
