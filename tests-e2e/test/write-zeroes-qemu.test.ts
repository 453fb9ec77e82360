/**
 * Write zeroes leaves the L2 state QEMU 7.2 leaves. Each case makes an image with qemu-img and
 * qemu-io, copies it, zeroes a range with `qemu-io write -z [-u]` on one copy and through the
 * library (`writeZeroes(offset, length, { mayUnmap })`, or our NBD server driven by qemu-io) on the
 * other, then compares `qemu-img map --output=json` (host offsets included: a cluster zeroed
 * without may-unmap keeps its host cluster), `qemu-img check --output=json` (allocated clusters,
 * no leak, no corruption) and `qemu-img compare`; our own check (in-process) finds ours clean too.
 * QEMU's image for a case is made once and copied for each variant (with and without may-unmap).
 */
import { copyFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { Qcow2Image } from '@qcowkit/qcow2-core';
import { openImage } from '@qcowkit/qcow2-core/node';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { must, startServer } from '../src/nbd-server.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');
const KiB = 1024;

interface Case {
  readonly name: string;
  /** qemu-img create options for the image (1 MiB, 64 KiB clusters unless said). */
  readonly create?: readonly string[];
  /** A backing file: qcow2, 1 MiB, with these qemu-io writes. */
  readonly backing?: readonly string[];
  /** qemu-io commands run on the image before zeroing. */
  readonly setup?: readonly string[];
  /** qemu-img snapshot -c after the setup (clusters shared with an internal snapshot). */
  readonly snapshot?: boolean;
  readonly offset: number;
  readonly length: number;
  /** Writes after the zeroing ([offset, length, byte]): qemu-io on QEMU's copy, the library on ours. */
  readonly thenWrite?: readonly (readonly [number, number, number])[];
  /** Only without may-unmap. (QEMU frees unmapped clusters at once and its next allocation
   * reuses them; ours frees them at the next metadata write-back, so offsets differ.) */
  readonly keepOnly?: boolean;
}

const DATA = ['write -P 1 0 256k'];

const CASES: readonly Case[] = [
  { name: 'whole allocated cluster', setup: DATA, offset: 0, length: 64 * KiB },
  { name: 'part of an allocated cluster', setup: DATA, offset: 192 * KiB, length: 4 * KiB },
  { name: 'part of an unallocated cluster', setup: DATA, offset: 512 * KiB, length: 4 * KiB },
  { name: 'unallocated clusters, no L2 table', offset: 512 * KiB, length: 128 * KiB },
  { name: 'allocated, unallocated and partial', setup: DATA, offset: 4 * KiB, length: 300 * KiB },
  {
    name: 'over a backing file',
    backing: ['write -P 7 0 1M'],
    setup: ['write -P 1 0 128k'],
    offset: 4 * KiB,
    length: 200 * KiB,
  },
  {
    name: 'over a backing file that reads as zeros past 128k',
    backing: ['write -P 7 0 128k'],
    setup: ['write -P 1 64k 64k'],
    offset: 132 * KiB,
    length: 200 * KiB,
  },
  { name: 'shared with a snapshot', setup: DATA, snapshot: true, offset: 0, length: 192 * KiB },
  {
    name: 'part of a cluster shared with a snapshot',
    setup: DATA,
    snapshot: true,
    offset: 4 * KiB,
    length: 8 * KiB,
  },
  {
    name: 'compressed clusters',
    setup: ['write -c -P 3 0 64k', 'write -c -P 3 64k 64k'],
    offset: 0,
    length: 64 * KiB,
  },
  { name: 'part of a compressed cluster', setup: ['write -c -P 3 0 64k'], offset: 4 * KiB, length: 4 * KiB },
  {
    name: 'extended L2, whole clusters',
    create: ['-o', 'extended_l2=on'],
    setup: DATA,
    offset: 0,
    length: 128 * KiB,
  },
  {
    name: 'extended L2, subclusters and clusters',
    create: ['-o', 'extended_l2=on'],
    setup: DATA,
    offset: 6 * KiB,
    length: 100 * KiB,
  },
  {
    name: 'extended L2, part of a subcluster',
    create: ['-o', 'extended_l2=on'],
    setup: ['write -P 1 0 4k'],
    offset: 5 * KiB,
    length: KiB,
  },
  {
    name: 'extended L2, unallocated subclusters',
    create: ['-o', 'extended_l2=on'],
    setup: ['write -P 1 0 4k'],
    offset: 300 * KiB,
    length: 3 * KiB,
  },
  {
    name: 'extended L2, part of a compressed cluster',
    create: ['-o', 'extended_l2=on'],
    setup: ['write -c -P 3 0 64k'],
    offset: 2 * KiB,
    length: 4 * KiB,
  },
  {
    name: 'compat=0.10 (no zero flag)',
    create: ['-o', 'compat=0.10'],
    setup: DATA,
    offset: 4 * KiB,
    length: 200 * KiB,
  },
  {
    name: 'compat=0.10 over a backing file',
    create: ['-o', 'compat=0.10'],
    backing: ['write -P 7 0 1M'],
    setup: DATA,
    offset: 0,
    length: 128 * KiB,
  },
  {
    name: 'zero-allocated clusters written again (their host clusters reused)',
    setup: DATA,
    offset: 0,
    length: 192 * KiB,
    keepOnly: true,
    thenWrite: [
      [4 * KiB, 4 * KiB, 2],
      [64 * KiB, 64 * KiB, 3],
    ],
  },
  {
    name: 'lazy refcounts',
    create: ['-o', 'lazy_refcounts=on'],
    setup: DATA,
    offset: 4 * KiB,
    length: 200 * KiB,
  },
];

describe.skipIf(!haveTools)('write zeroes: the L2 state QEMU leaves', () => {
  let dir: { path: string; remove: () => void };
  let serial = 0;

  beforeAll(() => {
    dir = tempDir('qcowkit-write-zeroes-');
  });
  afterAll(() => dir?.remove());

  /** Each case's image as QEMU made it (its folder holds the backing file too). */
  const templates = new Map<Case, string>();

  function template(item: Case): string {
    const made = templates.get(item);
    if (made !== undefined) return made;
    const folder = join(dir.path, String(serial++));
    mkdirSync(folder);
    const image = join(folder, 'template.qcow2');
    const qemuIo = (image: string, commands: readonly string[]) => {
      if (commands.length > 0) run('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), image]);
    };
    const create = ['create', '-q', '-f', 'qcow2', ...(item.create ?? [])];
    if (item.backing !== undefined) {
      run('qemu-img', ['create', '-q', '-f', 'qcow2', join(folder, 'base.qcow2'), '1M']);
      qemuIo(join(folder, 'base.qcow2'), item.backing);
      create.push('-b', 'base.qcow2', '-F', 'qcow2');
    }
    run('qemu-img', [...create, image, '1M']);
    qemuIo(image, item.setup ?? []);
    if (item.snapshot === true) run('qemu-img', ['snapshot', '-c', 's1', image]);
    templates.set(item, image);
    return image;
  }

  /** Two copies of a case's image, beside its backing file: [QEMU's, ours]. */
  function prepare(item: Case): [string, string] {
    const image = template(item);
    const copies = [`${serial}-qemu.qcow2`, `${serial++}-ours.qcow2`].map((name) =>
      join(dirname(image), name),
    );
    for (const copy of copies) copyFileSync(image, copy);
    return copies as [string, string];
  }

  function zeroWithQemu(image: string, item: Case, mayUnmap: boolean): void {
    const writes = (item.thenWrite ?? []).flatMap(([offset, length, byte]) => [
      '-c',
      `write -P ${byte} ${offset} ${length}`,
    ]);
    run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      `write -z ${mayUnmap ? '-u ' : ''}${item.offset} ${item.length}`,
      ...writes,
      image,
    ]);
  }

  async function expectSameState(qemuCopy: string, ourCopy: string): Promise<void> {
    const map = (image: string) => run('qemu-img', ['map', '--output=json', image]);
    expect(map(ourCopy)).toBe(map(qemuCopy));
    const check = (image: string) => {
      const result = runStatus('qemu-img', ['check', '--output=json', image]);
      expect(result.status, result.stdout + result.stderr).toBe(0);
      const { filename: _filename, ...figures } = JSON.parse(result.stdout) as Record<string, unknown>;
      return figures;
    };
    expect(check(ourCopy)).toEqual(check(qemuCopy));
    expect(runStatus('qemu-img', ['compare', qemuCopy, ourCopy]).stdout).toBe('Images are identical.\n');
    const opened = await openImage(ourCopy);
    try {
      const image = opened.image;
      if (!(image instanceof Qcow2Image)) throw new Error(`${ourCopy}: not opened as qcow2`);
      const report = await image.check();
      expect(report.corruptions + report.leaks, report.messages.join('\n')).toBe(0);
    } finally {
      await opened.close();
    }
  }

  for (const item of CASES) {
    for (const mayUnmap of item.keepOnly === true ? [false] : [false, true]) {
      test(`${item.name}${mayUnmap ? ', may unmap' : ''}`, async () => {
        const [qemuCopy, ourCopy] = prepare(item);
        zeroWithQemu(qemuCopy, item, mayUnmap);
        const opened = await openImage(ourCopy, { readOnly: false });
        try {
          await opened.device.writeZeroes(item.offset, item.length, { mayUnmap });
          for (const [offset, length, byte] of item.thenWrite ?? []) {
            await opened.device.write(offset, new Uint8Array(length).fill(byte));
          }
        } finally {
          await opened.close();
        }
        await expectSameState(qemuCopy, ourCopy);
      });
    }
  }

  describe('through the NBD server', () => {
    // qemu-io over NBD sends WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE unless -u: the server must
    // map it to may-unmap false, and its absence to may-unmap true.
    const nbdCases = [
      'allocated, unallocated and partial',
      'shared with a snapshot',
      'extended L2, subclusters and clusters',
    ].map((name) => CASES.find((item) => item.name === name)!);
    for (const item of nbdCases) {
      for (const mayUnmap of [false, true]) {
        test(`${item.name}${mayUnmap ? ', may unmap' : ''}`, async () => {
          const [qemuCopy, ourCopy] = prepare(item);
          zeroWithQemu(qemuCopy, item, mayUnmap);
          const server = await startServer(dir.path, ['-t', '-f', 'qcow2', ourCopy]);
          try {
            await must('qemu-io', [
              '-f',
              'raw',
              '-c',
              `write -z ${mayUnmap ? '-u ' : ''}${item.offset} ${item.length}`,
              server.uri,
            ]);
          } finally {
            expect(await server.stop()).toBe(0);
          }
          await expectSameState(qemuCopy, ourCopy);
        });
      }
    }
  });
});
