/**
 * `qcow2 convert -O raw`'s copy loop on the layouts it reads straight from the image file: runs of
 * data with holes between them that qemu-img convert lays out with L2 tables between the runs
 * (4 KiB clusters: one read covers two runs and the table between them), a raw backing file under
 * a qcow2 overlay (data at depth 1 read from the backing file), compressed clusters mixed in (read
 * through the image). Every output must equal qemu-img's, its data where qemu-img's is.
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');
const MiB = 2 ** 20;

describe.skipIf(!haveTools)('qcow2 convert -O raw copy loop', () => {
  let dir: { path: string; remove: () => void };
  beforeAll(() => {
    dir = tempDir('qcowkit-copy-loop-');
    // 48 MiB: 1 MiB runs of data at every other MiB (random, then a byte pattern with an all-zero
    // 4 KiB block inside), an unaligned short run near the end.
    const fd = openSync(join(dir.path, 'half.raw'), 'w');
    ftruncateSync(fd, 48 * MiB);
    const chunk = Buffer.alloc(MiB);
    for (let index = 0; index < 23; index++) {
      if (index % 2 === 0) randomFillSync(chunk);
      else {
        chunk.fill(0x5a);
        chunk.fill(0, 256 * 1024, 260 * 1024);
      }
      writeSync(fd, chunk, 0, MiB, index * 2 * MiB);
    }
    writeSync(fd, Buffer.alloc(777, 0x33), 0, 777, 47 * MiB + 1001);
    closeSync(fd);
    for (const cluster of ['4096', '65536']) {
      run(
        'qemu-img',
        [
          'convert',
          '-f',
          'raw',
          '-O',
          'qcow2',
          '-o',
          `cluster_size=${cluster}`,
          'half.raw',
          `half-${cluster}.qcow2`,
        ],
        {
          cwd: dir.path,
        },
      );
    }
    // An overlay over the raw file: some clusters rewritten, one range compressed, one zeroed.
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'half.raw', '-F', 'raw', 'over.qcow2', '48M'], {
      cwd: dir.path,
    });
    run(
      'qemu-io',
      [
        '-f',
        'qcow2',
        '-c',
        'write -P 0x77 3M 1M',
        '-c',
        'write -c -P 0x66 8M 128k',
        '-c',
        'write -z 20M 2M',
        'over.qcow2',
      ],
      { cwd: dir.path },
    );
  });
  afterAll(() => dir?.remove());

  test.each(['half-4096.qcow2', 'half-65536.qcow2', 'over.qcow2', 'half.raw'])(
    '%s converts to the bytes qemu-img writes, holes where it leaves them',
    (image) => {
      const ours = qcow2(['convert', '-O', 'raw', image, `${image}.ours.raw`], { cwd: dir.path });
      expect(ours.status, ours.stderr).toBe(0);
      run('qemu-img', ['convert', '-O', 'raw', image, `${image}.qemu.raw`], { cwd: dir.path });
      const compare = runStatus('qemu-img', [
        'compare',
        '-q',
        '-f',
        'raw',
        '-F',
        'raw',
        join(dir.path, `${image}.qemu.raw`),
        join(dir.path, `${image}.ours.raw`),
      ]);
      expect(compare.status, compare.stdout + compare.stderr).toBe(0);
      // Where data lies (SEEK_DATA, as qemu-img map reports it for a raw file), not st_blocks: the
      // file system's own extent blocks may differ with the order of the writes.
      const dataRanges = (name: string) =>
        (
          JSON.parse(run('qemu-img', ['map', '--output=json', '-f', 'raw', name], { cwd: dir.path })) as {
            start: number;
            length: number;
            data: boolean;
          }[]
        )
          .filter((extent) => extent.data)
          .map((extent) => [extent.start, extent.length]);
      expect(dataRanges(`${image}.ours.raw`)).toEqual(dataRanges(`${image}.qemu.raw`));
    },
  );
});
