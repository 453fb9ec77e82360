/**
 * The qcow2 engine's request path: `qcow2 bench` against `qemu-img bench -f qcow2 -t writeback
 * -i threads` on copies of one image (/dev/shm), each side timing only its requests (the "Run
 * completed in" line; process start-up and opening excluded on both sides):
 *
 * - 4 KiB writes into allocated clusters, depth 32, scattered over a 256 MiB image;
 * - 1 MiB sequential writes into a fresh (empty) 512 MiB image, depth 8: allocation, refcounts and
 *   L2 updates on every request, metadata written back once at the end;
 * - 4 KiB reads, depth 32, scattered.
 *
 * After each write run our image must pass `qemu-img check` with no error and no leak.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const QCOW2_BIN = fileURLToPath(new URL('../../packages/qcow2-cli/dist/bin/qcow2.js', import.meta.url));
const MiB = 1024 * 1024;
const FILLED_SIZE = 256 * MiB;
const FRESH_SIZE = 512 * MiB;
/** A prime number of 4 KiB blocks: stepping by it (modulo the image size) visits every block in a
 * scattered order. */
const SCATTER_STEP = 4096 * 104729;

function benchArgs({ count, depth, size, step = size, write = false }) {
  const args = ['-c', String(count), '-d', String(depth), '-s', String(size), '-S', String(step)];
  if (write) args.push('-w');
  return args;
}

function runCompleted(command, args) {
  const out = execFileSync(command, args, { encoding: 'utf8', maxBuffer: 16 * MiB });
  const match = /Run completed in ([0-9.]+) seconds/.exec(out);
  if (!match) throw new Error(`${command} bench: unexpected output: ${out}`);
  return Number(match[1]);
}

function ourBench(file, params) {
  return runCompleted(process.execPath, [QCOW2_BIN, 'bench', '-f', 'qcow2', ...benchArgs(params), file]);
}

function qemuBench(file, params) {
  return runCompleted('qemu-img', [
    'bench',
    '-f',
    'qcow2',
    '-t',
    'writeback',
    '-i',
    'threads',
    ...benchArgs(params),
    file,
  ]);
}

/** `qemu-img check` must find the image clean (exit 0: no corruption, no leak). */
function checkClean(file) {
  const result = spawnSync('qemu-img', ['check', file], { encoding: 'utf8' });
  if (result.status !== 0)
    throw new Error(`qemu-img check ${file} (exit ${result.status}): ${result.stdout}${result.stderr}`);
}

/** A 256 MiB image with every cluster allocated (written by qemu-io). */
function makeFilled(dir) {
  const base = join(dir, 'qcow2-image-filled.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(FILLED_SIZE)]);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a 0 ${FILLED_SIZE}`, base], { stdio: 'ignore' });
  const ours = join(dir, 'qcow2-image-filled.ours.qcow2');
  const theirs = join(dir, 'qcow2-image-filled.qemu.qcow2');
  copyFileSync(base, ours);
  copyFileSync(base, theirs);
  rmSync(base);
  return { ours, theirs };
}

function filledJob(name, description, params) {
  return {
    name,
    description,
    tools: ['qemu-img', 'qemu-io'],
    setup: makeFilled,
    ours: (ctx) => {
      const seconds = ourBench(ctx.ours, params);
      if (params.write) checkClean(ctx.ours);
      return seconds;
    },
    theirs: (ctx) => qemuBench(ctx.theirs, params),
    teardown: (ctx) => {
      rmSync(ctx.ours, { force: true });
      rmSync(ctx.theirs, { force: true });
    },
  };
}

/** Each run writes into its own fresh copy of an empty image (removed afterwards). */
function freshJob(name, description, params) {
  const run = (ctx, side, bench) => {
    const file = join(ctx.dir, `qcow2-image-fresh.${side}.qcow2`);
    copyFileSync(ctx.empty, file);
    try {
      const seconds = bench(file, params);
      if (side === 'ours') checkClean(file);
      return seconds;
    } finally {
      rmSync(file, { force: true });
    }
  };
  return {
    name,
    description,
    tools: ['qemu-img'],
    setup: (dir) => {
      const empty = join(dir, 'qcow2-image-empty.qcow2');
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', empty, String(FRESH_SIZE)]);
      return { dir, empty };
    },
    ours: (ctx) => run(ctx, 'ours', ourBench),
    theirs: (ctx) => run(ctx, 'qemu', qemuBench),
    teardown: (ctx) => rmSync(ctx.empty, { force: true }),
  };
}

export const jobs = [
  filledJob(
    'qcow2-write-4k-allocated',
    '4 KiB scattered writes into allocated clusters, depth 32, 100k requests',
    {
      count: 100_000,
      depth: 32,
      size: 4096,
      step: SCATTER_STEP,
      write: true,
    },
  ),
  freshJob('qcow2-write-1m-fresh', '1 MiB sequential writes into a fresh 512 MiB image, depth 8', {
    count: 512,
    depth: 8,
    size: MiB,
    write: true,
  }),
  filledJob('qcow2-read-4k', '4 KiB scattered reads, depth 32, 100k requests', {
    count: 100_000,
    depth: 32,
    size: 4096,
    step: SCATTER_STEP,
  }),
];
