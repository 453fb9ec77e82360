/**
 * qcow2 images through qcow2-nbd: block status against `qemu-img map`, contents against
 * `qemu-img compare`, internal snapshots (-l), a writable overlay in memory (-s), allocation depth
 * over a backing chain (-A), and the refusal of a writable qcow (v1) export.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NBD_BIN as BIN, must, runAsync, startServer } from '../src/nbd-server.js';
import { requireTools, run, tempDir } from '../src/tools.js';

const ok = requireTools('qemu-img', 'qemu-io', 'nbdinfo');

type Run = { start: number; length: number; value: string };

/** Merges neighbouring runs with the same value. */
function merge(runs: Run[]): Run[] {
  const out: Run[] = [];
  for (const entry of runs) {
    const last = out[out.length - 1];
    if (last !== undefined && last.value === entry.value && last.start + last.length === entry.start) {
      last.length += entry.length;
    } else out.push({ ...entry });
  }
  return out;
}

function parseNbdinfoMap(text: string): Run[] {
  return merge(
    text
      .trim()
      .split('\n')
      .map((line) => line.trim().split(/\s+/))
      .map(([start, length, value]) => ({ start: Number(start), length: Number(length), value: value! })),
  );
}

function qemuMap(
  image: string,
  value: (e: { data: boolean; zero: boolean; present: boolean; depth: number }) => string,
) {
  const entries = JSON.parse(run('qemu-img', ['map', '--output=json', image])) as {
    start: number;
    length: number;
    data: boolean;
    zero: boolean;
    present: boolean;
    depth: number;
  }[];
  return merge(entries.map((e) => ({ start: e.start, length: e.length, value: value(e) })));
}

describe.skipIf(!ok)('qcow2 images over NBD', () => {
  let dir: { path: string; remove: () => void };
  let image: string;
  let base: string;
  let top: string;

  beforeAll(() => {
    dir = tempDir('qcowkit-nbd-qcow2-');
    image = join(dir.path, 'disk.qcow2');
    run('qemu-img', ['create', '-f', 'qcow2', image, '64M']);
    run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 0xab 1M 3M',
      '-c',
      'write -z 8M 1M',
      '-c',
      'write -c -P 0x12 16M 64k',
      image,
    ]);
    run('qemu-img', ['snapshot', '-c', 'before', image]);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 1M 64k', '-c', 'write -P 0x31 40M 100k', image]);
    base = join(dir.path, 'base.qcow2');
    top = join(dir.path, 'top.qcow2');
    run('qemu-img', ['create', '-f', 'qcow2', base, '16M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 2M', base]);
    run('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 2 1M 2M', top]);
  });
  afterAll(() => dir.remove());

  it('base:allocation matches qemu-img map and the export compares identical', async () => {
    const map = await must('nbdinfo', ['--map', '--', '[', process.execPath, BIN, '-r', image, ']']);
    // nbdinfo prints the raw flags: bit 0 hole (no data), bit 1 zero.
    const expected = qemuMap(image, (e) => String((e.data ? 0 : 1) | (e.zero ? 2 : 0)));
    expect(parseNbdinfoMap(map).map(({ start, length, value }) => ({ start, length, value: value }))).toEqual(
      expected,
    );
    const server = await startServer(dir.path, ['-r', '-t', '-e', '0', image]);
    try {
      expect((await runAsync('qemu-img', ['compare', image, server.uri])).status).toBe(0);
    } finally {
      expect(await server.stop()).toBe(0);
    }
  });

  it('qemu:allocation-depth over a backing chain matches qemu-img map depths', async () => {
    const map = await must('nbdinfo', [
      '--map=qemu:allocation-depth',
      '--',
      '[',
      process.execPath,
      BIN,
      '-r',
      '-A',
      top,
      ']',
    ]);
    const expected = qemuMap(top, (e) => String(e.present ? e.depth + 1 : 0));
    expect(parseNbdinfoMap(map)).toEqual(expected);
    const server = await startServer(dir.path, ['-r', top]);
    try {
      expect((await runAsync('qemu-img', ['compare', top, server.uri])).status).toBe(0);
    } finally {
      await server.stop();
    }
  });

  it('-l serves an internal snapshot read-only', async () => {
    const server = await startServer(dir.path, ['-r', '-l', 'before', image]);
    try {
      const out = await must('qemu-io', [
        '-r',
        '-f',
        'raw',
        '-c',
        'read -P 0xab 1M 64k',
        '-c',
        'read -P 0 40M 100k',
        server.uri,
      ]);
      expect(out).not.toMatch(/fail/i);
    } finally {
      await server.stop();
    }
  });

  it('-s makes a qcow2 export writable in memory and leaves the image untouched', async () => {
    const copy = join(dir.path, 'copy.qcow2');
    run('cp', [image, copy]);
    const server = await startServer(dir.path, ['-s', image]);
    try {
      const out = await must('qemu-io', [
        '-f',
        'raw',
        '-c',
        'write -P 0x99 0 64k',
        '-c',
        'write -z 1M 64k',
        '-c',
        'read -P 0x99 0 64k',
        '-c',
        'read -P 0 1M 64k',
        server.uri,
      ]);
      expect(out).not.toMatch(/fail/i);
    } finally {
      expect(await server.stop()).toBe(0);
    }
    expect((await runAsync('qemu-img', ['compare', image, copy])).status).toBe(0);
    expect((await runAsync('qemu-img', ['check', image])).status).toBe(0);
  });

  it('refuses a writable qcow (v1) export without -r or -s, in one line', async () => {
    const qcow = join(dir.path, 'old.qcow');
    run('qemu-img', ['create', '-f', 'qcow', qcow, '1M']);
    const result = await runAsync(process.execPath, [BIN, '-k', join(dir.path, 'never.sock'), qcow]);
    expect(result.status).toBe(1);
    expect(result.stderr).toMatch(
      /^qcow2-nbd: .*qcow images are served read-only: add -r\/--read-only or -s\/--snapshot\n$/,
    );
  });
});
