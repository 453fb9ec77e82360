/**
 * On tmpfs, `qcow2 convert` scans and writes the source's data in place from a read-only mapping
 * of the file holding it (a qcow2 image's data clusters, a raw file) instead of reading it into
 * buffers; with `-U` it reads as before. Both must write what qemu-img writes, with the same
 * holes, and must never change the source: a hole inside a data cluster of the source file (a
 * range no page backs) is read, not mapped, so it stays a hole.
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { QCOW2_BIN } from '../src/qcow2-cli.js';
import { requireTools, run } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io', 'fallocate');
const MiB = 2 ** 20;

describe.skipIf(!haveTools)('qcow2 convert from a mapped source on tmpfs', () => {
  let dir: string;
  const at = (name: string) => join(dir, name);
  const ours = (...args: string[]) => run(process.execPath, [QCOW2_BIN, 'convert', ...args]);
  const qemu = (...args: string[]) => run('qemu-img', ['convert', ...args]);
  const same = (a: string, b: string, formatA = 'raw', formatB = 'raw') =>
    run('qemu-img', ['compare', '-q', '-f', formatA, '-F', formatB, a, b]);

  beforeAll(() => {
    dir = mkdtempSync('/dev/shm/qcowkit-convert-mapped-');
    // 40 MiB: random 1 MiB runs at every other MiB, a zero 4 KiB block inside one of them.
    const fd = openSync(at('src.raw'), 'w');
    ftruncateSync(fd, 40 * MiB);
    const chunk = Buffer.alloc(MiB);
    for (let index = 0; index < 20; index++) {
      randomFillSync(chunk);
      if (index === 3) chunk.fill(0, 256 * 1024, 260 * 1024);
      writeSync(fd, chunk, 0, MiB, index * 2 * MiB);
    }
    closeSync(fd);
    qemu('-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', at('src.raw'), at('src.qcow2'));
    // An overlay over it, holding a little data of its own.
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'src.qcow2', '-F', 'qcow2', at('top.qcow2')]);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 5M 3M', at('top.qcow2')]);
  });
  afterAll(() => {
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  test.each([
    ['qcow2', 'src.qcow2'],
    ['qcow2', 'top.qcow2'],
    ['raw', 'src.raw'],
  ])('-f %s %s -O raw: as qemu-img, with and without -U', (format, source) => {
    qemu('-f', format, '-O', 'raw', at(source), at('qemu.raw'));
    for (const extra of [[], ['-U']]) {
      ours('-f', format, '-O', 'raw', ...extra, at(source), at('ours.raw'));
      same(at('ours.raw'), at('qemu.raw'));
      expect(statSync(at('ours.raw')).blocks).toBeLessThanOrEqual(statSync(at('qemu.raw')).blocks);
    }
  });

  test('-f raw -O qcow2: the same image as with -U, equal to the source for qemu-img', () => {
    ours('-f', 'raw', '-O', 'qcow2', at('src.raw'), at('mapped.qcow2'));
    ours('-U', '-f', 'raw', '-O', 'qcow2', at('src.raw'), at('read.qcow2'));
    run('qemu-img', ['check', '-q', at('mapped.qcow2')]);
    same(at('src.raw'), at('mapped.qcow2'), 'raw', 'qcow2');
    expect(run('cmp', [at('mapped.qcow2'), at('read.qcow2')])).toBe('');
  });

  test('a hole punched inside a data cluster of the source is read as zeros and stays a hole', () => {
    qemu('-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', at('src.raw'), at('holed.qcow2'));
    // The host offset of guest 8 MiB (data), then a 16 KiB hole in the middle of that cluster.
    const map = JSON.parse(run('qemu-img', ['map', '--output=json', at('holed.qcow2')])) as {
      start: number;
      length: number;
      data: boolean;
      offset?: number;
    }[];
    const extent = map.find((e) => e.data && e.start <= 8 * MiB && 8 * MiB < e.start + e.length)!;
    const host = extent.offset! + (8 * MiB - extent.start) + 16384;
    run('fallocate', ['-p', '-o', String(host), '-l', '16384', at('holed.qcow2')]);
    const blocks = statSync(at('holed.qcow2')).blocks;
    qemu('-f', 'qcow2', '-O', 'raw', at('holed.qcow2'), at('qemu.raw'));
    ours('-f', 'qcow2', '-O', 'raw', at('holed.qcow2'), at('ours.raw'));
    same(at('ours.raw'), at('qemu.raw'));
    expect(statSync(at('holed.qcow2')).blocks).toBe(blocks);
  });
});
