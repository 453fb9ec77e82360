/**
 * FileBlockDevice against `qemu-img bench -f raw -t writeback -i threads` on the same 1 GiB file:
 * both sides go through the page cache with a thread pool, issue the same requests (count, size,
 * step, queue depth) and time only the requests.
 */
import { randomFillSync } from 'node:crypto';
import { open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { FileBlockDevice } from '../../packages/blockdev/dist/node/index.js';
import { benchDevice } from '../lib/device-bench.mjs';
import { qemuImgBench } from '../lib/qemu.mjs';

const FILE_SIZE = 1024 * 1024 * 1024;
const MiB = 1024 * 1024;
/** A prime number of 4 KiB blocks: stepping by it (modulo 1 GiB) visits every block in a
 * scattered order, the closest qemu-img bench comes to random I/O. */
const SCATTER_STEP = 4096 * 104729;

async function makeFile(dir) {
  const file = join(dir, 'file-device.raw');
  const handle = await open(file, 'w');
  const chunk = randomFillSync(Buffer.alloc(8 * MiB));
  for (let offset = 0; offset < FILE_SIZE; offset += chunk.length)
    await handle.write(chunk, 0, chunk.length, offset);
  await handle.close();
  return { file };
}

async function ours(ctx, params) {
  const device = await FileBlockDevice.open(ctx.file);
  try {
    return await benchDevice(device, params);
  } finally {
    await device.close();
  }
}

function fileJob(name, description, params) {
  return {
    name,
    description,
    tools: ['qemu-img'],
    setup: makeFile,
    ours: (ctx) => ours(ctx, params),
    theirs: (ctx) => qemuImgBench({ file: ctx.file, ...params }),
    teardown: (ctx) => rm(ctx.file, { force: true }),
  };
}

export const jobs = [
  fileJob('file-seq-read-1m', '1 MiB sequential reads, depth 8, 4 GiB', {
    count: 4096,
    depth: 8,
    size: MiB,
  }),
  fileJob('file-seq-write-1m', '1 MiB sequential writes, depth 8, 2 GiB', {
    count: 2048,
    depth: 8,
    size: MiB,
    write: true,
  }),
  fileJob('file-rand-read-4k', '4 KiB scattered reads, depth 32, 200k requests', {
    count: 200_000,
    depth: 32,
    size: 4096,
    step: SCATTER_STEP,
  }),
];
