/**
 * qcow2-nbd against nbdkit's file plugin (the fastest peer for raw files here) serving the same
 * 1 GiB raw file over a unix socket on /dev/shm. The same client runs against each server: fio's
 * nbd engine (4 KiB random read and write at depth 16, 1 MiB sequential read) and nbdcopy with 4
 * connections out of and into the export. Only the client's run is timed (server start excluded).
 *
 * Wall times on a shared 2-core machine swing by 2x between rounds of one job; the servers' CPU
 * during the client's run is steadier. Each job prints it after its ratio: the medians of the
 * server's user and system seconds (all threads, from /proc/PID/stat) for each side, and for ours
 * the event loop's sleeps (voluntary context switches of the main thread): on these VMs a sleeping
 * thread woken from the other CPU costs an interrupt between CPUs, and 4 KiB requests at depth 16
 * are a ping-pong with the client whose cost is mostly those wake-ups. Raw exports here are
 * served by connection threads (qcow2-nbd's `--connection-threads`): the main thread only does
 * the handshakes, so its sleeps count for the qcow2 jobs only.
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { copyFile, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const BIN = fileURLToPath(new URL('../../packages/qcow2-nbd/dist/bin/qcow2-nbd.js', import.meta.url));
const FILE_SIZE = 1024 * 1024 * 1024;
const MiB = 1024 * 1024;

async function makeFile(path) {
  const handle = await open(path, 'w');
  const chunk = randomFillSync(Buffer.alloc(8 * MiB));
  for (let offset = 0; offset < FILE_SIZE; offset += chunk.length)
    await handle.write(chunk, 0, chunk.length, offset);
  await handle.close();
}

async function setup(dir) {
  const file = join(dir, 'nbd-export.raw');
  const source = join(dir, 'nbd-source.raw');
  await makeFile(file);
  await makeFile(source);
  return { dir, file, source };
}

async function teardown(ctx) {
  await rm(ctx.file, { force: true });
  await rm(ctx.source, { force: true });
}

/** A fully allocated 1 GiB qcow2 image (64 KiB clusters) made from random data by qemu-img. */
async function setupQcow2(dir) {
  const raw = join(dir, 'nbd-qcow2-source.raw');
  const image = join(dir, 'nbd-export.qcow2');
  await makeFile(raw);
  const result = spawnSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);
  await rm(raw, { force: true });
  if (result.status !== 0) throw new Error(`qemu-img convert failed: ${result.stderr}`);
  return { dir, image };
}

/** Starts a server process listening on a fresh unix socket; resolves once the socket exists. */
async function startServer(command, args, socket) {
  await rm(socket, { force: true });
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'inherit'] });
  const deadline = Date.now() + 20_000;
  while (!existsSync(socket)) {
    if (child.exitCode !== null) throw new Error(`${command} exited with ${child.exitCode}`);
    if (Date.now() > deadline) throw new Error(`${command} did not start`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return {
    uri: `nbd+unix:///?socket=${socket}`,
    pid: child.pid,
    async stop() {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      if (child.exitCode === null) child.kill('SIGTERM');
      await exited;
      await rm(socket, { force: true });
    },
  };
}

const servers = {
  ours: (ctx) =>
    startServer(
      process.execPath,
      [BIN, '-f', 'raw', '-t', '-e', '0', '-k', join(ctx.dir, 'ours.sock'), ctx.file],
      join(ctx.dir, 'ours.sock'),
    ),
  theirs: (ctx) =>
    startServer(
      'nbdkit',
      ['-f', '-U', join(ctx.dir, 'nbdkit.sock'), 'file', ctx.file],
      join(ctx.dir, 'nbdkit.sock'),
    ),
};

const qcow2Servers = {
  ours: (ctx) =>
    startServer(
      process.execPath,
      [BIN, '-r', '-f', 'qcow2', '-t', '-e', '0', '-k', join(ctx.dir, 'ours.sock'), ctx.image],
      join(ctx.dir, 'ours.sock'),
    ),
  theirs: (ctx) =>
    startServer(
      'qemu-nbd',
      ['-r', '-f', 'qcow2', '-t', '-e', '4', '-k', join(ctx.dir, 'qemu-nbd.sock'), ctx.image],
      join(ctx.dir, 'qemu-nbd.sock'),
    ),
};

/** Clock ticks per second of /proc/PID/stat's times (USER_HZ: 100 on Linux). */
const TICKS = 100;

/** The process's CPU seconds (all its threads, living and gone) and its main thread's sleeps. */
function usage(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const sleeps = /^voluntary_ctxt_switches:\s+(\d+)/m.exec(status);
    return {
      user: Number(fields[11]) / TICKS,
      system: Number(fields[12]) / TICKS,
      sleeps: sleeps === null ? Number.NaN : Number(sleeps[1]),
    };
  } catch {
    return undefined;
  }
}

/** Runs the client against `server`, recording the server's CPU meanwhile in ctx.cpu[side]. */
function measured(ctx, side, server, run) {
  const before = usage(server.pid);
  const seconds = run();
  const after = usage(server.pid);
  if (before !== undefined && after !== undefined) {
    ctx.cpu ??= {};
    ctx.cpu[side] ??= [];
    ctx.cpu[side].push({
      user: after.user - before.user,
      system: after.system - before.system,
      sleeps: after.sleeps - before.sleeps,
    });
  }
  return seconds;
}

function medianOf(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** The job, printing the servers' CPU (see the header comment) before its own teardown. */
function reportingCpu(job) {
  return {
    ...job,
    teardown: async (ctx) => {
      const sides = Object.entries(ctx?.cpu ?? {}).map(([side, runs]) => {
        const user = medianOf(runs.map((run) => run.user));
        const system = medianOf(runs.map((run) => run.system));
        const label = side === 'ours' || side === 'auto' ? 'ours' : (job.theirsName ?? 'qemu');
        const sleeps =
          label === 'ours' ? `, ${medianOf(runs.map((run) => run.sleeps))} event-loop sleeps` : '';
        return `${label} ${user.toFixed(2)} u + ${system.toFixed(2)} s${sleeps}`;
      });
      if (sides.length > 0)
        console.log(`  ${job.name}: server CPU during the client's run (medians): ${sides.join('; ')}`);
      await job.teardown?.(ctx);
    },
  };
}

function qcow2Job(name, description, work) {
  const side = (which) => async (ctx) => {
    const server = await qcow2Servers[which](ctx);
    try {
      return measured(ctx, which, server, () => work(ctx, server.uri));
    } finally {
      await server.stop();
    }
  };
  return {
    name,
    description,
    tools: ['qemu-nbd', 'qemu-img', 'fio', 'nbdcopy'],
    setup: setupQcow2,
    ours: side('ours'),
    theirs: side('theirs'),
    teardown: (ctx) => rm(ctx.image, { force: true }),
  };
}

/**
 * Writable qcow2 exports: a fully allocated image (overwrites in place) and an empty one (every
 * write allocates), copied afresh for each run so both servers start from the same bytes.
 */
async function setupQcow2Write(dir) {
  const full = await setupQcow2(dir);
  const empty = join(dir, 'nbd-empty.qcow2');
  const result = spawnSync('qemu-img', ['create', '-f', 'qcow2', empty, '1G']);
  if (result.status !== 0) throw new Error(`qemu-img create failed: ${result.stderr}`);
  return { dir, full: full.image, empty, image: join(dir, 'nbd-write.qcow2') };
}

const qcow2WriteServers = {
  ours: (ctx) =>
    startServer(
      process.execPath,
      [BIN, '-f', 'qcow2', '-t', '-e', '0', '-k', join(ctx.dir, 'ours.sock'), ctx.image],
      join(ctx.dir, 'ours.sock'),
    ),
  theirs: (ctx) =>
    startServer(
      'qemu-nbd',
      ['-f', 'qcow2', '-t', '-e', '4', '-k', join(ctx.dir, 'qemu-nbd.sock'), ctx.image],
      join(ctx.dir, 'qemu-nbd.sock'),
    ),
};

function qcow2WriteJob(name, description, source, work) {
  const side = (which) => async (ctx) => {
    await copyFile(ctx[source], ctx.image);
    const server = await qcow2WriteServers[which](ctx);
    try {
      return measured(ctx, which, server, () => work(ctx, server.uri));
    } finally {
      await server.stop();
      await rm(ctx.image, { force: true });
    }
  };
  return {
    name,
    description,
    tools: ['qemu-nbd', 'qemu-img', 'fio'],
    setup: setupQcow2Write,
    ours: side('ours'),
    theirs: side('theirs'),
    teardown: async (ctx) => {
      await rm(ctx.full, { force: true });
      await rm(ctx.empty, { force: true });
      await rm(ctx.image, { force: true });
    },
  };
}

/** Ours with file I/O inline (--aio=auto, on /dev/shm) against ours through the pool (--aio=threads). */
function aioJob(name, description, format, work) {
  const start = (ctx, mode) =>
    startServer(
      process.execPath,
      [BIN, '-f', format, '-t', '-e', '0', `--aio=${mode}`, '-k', join(ctx.dir, `${mode}.sock`), ctx.image],
      join(ctx.dir, `${mode}.sock`),
    );
  const side = (mode) => async (ctx) => {
    if (format === 'qcow2') await copyFile(ctx.full, ctx.image);
    const server = await start(ctx, mode);
    try {
      return measured(ctx, mode, server, () => work(ctx, server.uri));
    } finally {
      await server.stop();
    }
  };
  return {
    name,
    description,
    theirsName: 'threads',
    tools: ['qemu-img', 'fio'],
    setup: async (dir) => {
      if (format === 'qcow2') return setupQcow2Write(dir);
      const ctx = await setup(dir);
      return { ...ctx, image: ctx.file };
    },
    ours: side('auto'),
    theirs: side('threads'),
    teardown: async (ctx) => {
      for (const path of [ctx.file, ctx.source, ctx.full, ctx.empty, ctx.image]) {
        if (path !== undefined) await rm(path, { force: true });
      }
    },
  };
}

function timed(command, args) {
  const start = performance.now();
  const result = spawnSync(command, args, { encoding: 'utf8' });
  const seconds = (performance.now() - start) / 1000;
  if (result.status !== 0) throw new Error(`${command} failed: ${result.stderr}`);
  return seconds;
}

function fio(uri, rw, bs, ioSize) {
  return timed('fio', [
    '--name=bench',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${rw}`,
    `--bs=${bs}`,
    '--iodepth=16',
    `--io_size=${ioSize}`,
    '--norandommap',
    '--randrepeat=0',
    '--output-format=terse',
  ]);
}

function job(name, description, work) {
  const side = (which) => async (ctx) => {
    const server = await servers[which](ctx);
    try {
      return measured(ctx, which, server, () => work(ctx, server.uri));
    } finally {
      await server.stop();
    }
  };
  return {
    name,
    description,
    theirsName: 'nbdkit',
    tools: ['nbdkit', 'fio', 'nbdcopy'],
    setup,
    ours: side('ours'),
    theirs: side('theirs'),
    teardown,
  };
}

const rawAndQcow2Jobs = [
  job('nbd-fio-randread-4k', 'fio 4 KiB random reads, depth 16, 256 MiB, vs nbdkit file', (_ctx, uri) =>
    fio(uri, 'randread', '4k', '256M'),
  ),
  job('nbd-fio-randwrite-4k', 'fio 4 KiB random writes, depth 16, 256 MiB, vs nbdkit file', (_ctx, uri) =>
    fio(uri, 'randwrite', '4k', '256M'),
  ),
  job('nbd-fio-seqread-1m', 'fio 1 MiB sequential reads, depth 16, 4 GiB, vs nbdkit file', (_ctx, uri) =>
    fio(uri, 'read', '1m', '4G'),
  ),
  job('nbd-nbdcopy-out', 'nbdcopy of the 1 GiB export to null:, 4 connections, vs nbdkit file', (_ctx, uri) =>
    timed('nbdcopy', ['--connections=4', uri, 'null:']),
  ),
  job(
    'nbd-nbdcopy-in',
    'nbdcopy of a 1 GiB file into the export, 4 connections, vs nbdkit file',
    (ctx, uri) => timed('nbdcopy', ['--connections=4', ctx.source, uri]),
  ),
  qcow2Job(
    'nbd-qcow2-fio-randread-4k',
    'qcow2 (read-only): fio 4 KiB random reads, depth 16, 256 MiB, vs qemu-nbd',
    (_ctx, uri) => fio(uri, 'randread', '4k', '256M'),
  ),
  qcow2Job(
    'nbd-qcow2-nbdcopy-out',
    'qcow2 (read-only): nbdcopy of 1 GiB to null:, 4 connections, vs qemu-nbd',
    (_ctx, uri) => timed('nbdcopy', ['--connections=4', uri, 'null:']),
  ),
  qcow2WriteJob(
    'nbd-qcow2-fio-randwrite-4k',
    'qcow2 (writable, allocated): fio 4 KiB random writes, depth 16, 256 MiB, vs qemu-nbd',
    'full',
    (_ctx, uri) => fio(uri, 'randwrite', '4k', '256M'),
  ),
  qcow2WriteJob(
    'nbd-qcow2-fio-randwrite-4k-alloc',
    'qcow2 (writable, empty: every cluster allocated): fio 4 KiB random writes, depth 16, 64 MiB, vs qemu-nbd',
    'empty',
    (_ctx, uri) => fio(uri, 'randwrite', '4k', '64M'),
  ),
  aioJob(
    'nbd-aio-raw-randread-4k',
    'raw: --aio=auto (inline on tmpfs) vs --aio=threads, fio 4 KiB random reads',
    'raw',
    (_ctx, uri) => fio(uri, 'randread', '4k', '256M'),
  ),
  aioJob(
    'nbd-aio-raw-randwrite-4k',
    'raw: --aio=auto (inline on tmpfs) vs --aio=threads, fio 4 KiB random writes',
    'raw',
    (_ctx, uri) => fio(uri, 'randwrite', '4k', '256M'),
  ),
  aioJob(
    'nbd-aio-qcow2-randwrite-4k',
    'writable qcow2: --aio=auto (inline on tmpfs) vs --aio=threads, fio 4 KiB random writes',
    'qcow2',
    (_ctx, uri) => fio(uri, 'randwrite', '4k', '256M'),
  ),
  aioJob(
    'nbd-aio-qcow2-randread-4k',
    'writable qcow2: --aio=auto (inline on tmpfs) vs --aio=threads, fio 4 KiB random reads',
    'qcow2',
    (_ctx, uri) => fio(uri, 'randread', '4k', '256M'),
  ),
];

export const jobs = rawAndQcow2Jobs.map(reportingCpu);
