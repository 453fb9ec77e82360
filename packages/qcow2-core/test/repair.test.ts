/**
 * check -r leaks|all against qemu-img check -r on copies of the same damaged image: the same
 * counts before and after, then both checks clean (mode all) and the guest data unchanged.
 */
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { describe, expect, it } from 'vitest';
import { requireTools, run, runStatus } from '../../../tests-e2e/src/tools.js';
import {
  checkQcow2Image,
  checkResultToQemuJson,
  checkVerdictExitCode,
  formatCheckResultHuman,
  Qcow2RebuildNeededError,
} from '../src/check/index.js';
import { planRefcountStructure } from '../src/check/rebuild-refcounts.js';
import { suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img', 'qemu-io');

const WRITES = ['write -P 1 0 200k', 'write -c 1M 64k', 'write -z 2M 64k', 'write -P 3 4M 300k'];

/** Byte patches on a qcow2 file (16-bit refcounts, first refcount block, first L2 table). */
class Patch {
  readonly bytes: Buffer;
  constructor(readonly path: string) {
    this.bytes = readFileSync(path);
  }
  u64(offset: number): number {
    return Number(this.bytes.readBigUInt64BE(offset) & 0x00ff_ffff_ffff_fe00n);
  }
  get clusterSize(): number {
    return 2 ** this.bytes.readUInt32BE(20);
  }
  get reftableOffset(): number {
    return this.u64(48);
  }
  get firstRefblock(): number {
    return this.u64(this.reftableOffset);
  }
  l2EntryAt(index: number): number {
    return this.u64(this.u64(40)) + index * 8;
  }
  dataCluster(index: number): number {
    return this.u64(this.l2EntryAt(index)) / this.clusterSize;
  }
  setRefcount16(clusterIndex: number, value: number): void {
    this.bytes.writeUInt16BE(value, this.firstRefblock + clusterIndex * 2);
  }
  save(): void {
    writeFileSync(this.path, this.bytes);
  }
}

interface Case {
  name: string;
  mode: 'leaks' | 'all';
  create?: string[];
  prepare?: (path: string) => void;
  damage?: (p: Patch) => void;
  /** The damage changes the guest view: compare with the view after it. */
  dataChanged?: boolean;
}

const snapshot = (path: string) => run('qemu-img', ['snapshot', '-c', 's1', path]);

const cases: Case[] = [
  { name: 'leak (refcount raised)', mode: 'leaks', damage: (p) => p.setRefcount16(p.dataCluster(0), 2) },
  {
    name: 'leak (entry dropped)',
    mode: 'all',
    damage: (p) => p.bytes.writeBigUInt64BE(0n, p.l2EntryAt(1)),
    dataChanged: true,
  },
  {
    name: 'leaks only mode leaves a corruption',
    mode: 'leaks',
    prepare: snapshot,
    damage: (p) => {
      p.setRefcount16(p.dataCluster(0), 1);
      p.setRefcount16(p.dataCluster(1), 5);
    },
  },
  {
    // qemu-img checks again only when it fixed something: its lines end with the repair's.
    name: 'leaks mode with nothing to fix (no second check)',
    mode: 'leaks',
    prepare: snapshot,
    damage: (p) => p.setRefcount16(p.dataCluster(0), 1),
  },
  {
    // Mode leaks reports it and goes on (mode all rebuilds: QEMU grows the file first).
    name: 'refcount block outside the image, leaks mode',
    mode: 'leaks',
    damage: (p) => p.bytes.writeBigUInt64BE(0x1000_0000n, p.reftableOffset + 8),
  },
  {
    name: 'refcount too low (shared cluster)',
    mode: 'all',
    prepare: snapshot,
    damage: (p) => p.setRefcount16(p.dataCluster(0), 1),
  },
  { name: 'refcount zero: rebuild', mode: 'all', damage: (p) => p.setRefcount16(p.dataCluster(0), 0) },
  {
    name: 'refcount block lost: rebuild',
    mode: 'all',
    damage: (p) => p.bytes.writeBigUInt64BE(0n, p.reftableOffset),
  },
  {
    name: 'COPIED flag cleared',
    mode: 'all',
    damage: (p) => p.bytes.writeUInt8(p.bytes.readUInt8(p.l2EntryAt(0)) & 0x7f, p.l2EntryAt(0)),
  },
  {
    name: 'lazy refcounts after a crash',
    mode: 'all',
    create: ['-o', 'lazy_refcounts=on'],
    prepare: (path) => {
      runStatus('qemu-io', ['-c', 'write -P 7 0 300k', '-c', 'write -P 8 3M 64k', '-c', 'abort', path]);
    },
  },
  {
    name: '1-bit refcounts, refcount zero: rebuild',
    mode: 'all',
    create: ['-o', 'refcount_bits=1'],
    damage: (p) => {
      const cluster = p.dataCluster(0);
      p.bytes[p.firstRefblock + (cluster >> 3)]! &= ~(1 << (cluster & 7));
    },
  },
];

describe.skipIf(!haveQemu)('check repair agrees with qemu-img check -r', () => {
  const dir = suiteTempDir('qcowkit-repair-');

  it.each(cases)('$name (-r $mode)', async (testCase) => {
    const base = join(dir.path, testCase.name.replace(/\W+/g, '-'));
    const ours = `${base}.qcow2`;
    const theirs = `${base}.qemu.qcow2`;
    const expectedRaw = `${base}.raw`;
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ...(testCase.create ?? []), ours, '8M']);
    if (testCase.prepare === undefined || testCase.create === undefined) {
      run('qemu-io', [...WRITES.flatMap((w) => ['-c', w]), ours]);
    }
    testCase.prepare?.(ours);
    if (!testCase.dataChanged) run('qemu-img', ['convert', '-O', 'raw', ours, expectedRaw]);
    if (testCase.damage !== undefined) {
      const patch = new Patch(ours);
      testCase.damage(patch);
      patch.save();
    }
    if (testCase.dataChanged) run('qemu-img', ['convert', '-O', 'raw', ours, expectedRaw]);
    copyFileSync(ours, theirs);
    const damaged = runStatus('qemu-img', ['check', ours]);
    expect(damaged.status).not.toBe(0);

    copyFileSync(theirs, `${theirs}.human`);
    const qemu = runStatus('qemu-img', ['check', '-r', testCase.mode, '--output=json', theirs]);
    const human = runStatus('qemu-img', ['check', '-r', testCase.mode, `${theirs}.human`]);
    const expected = JSON.parse(qemu.stdout) as Record<string, unknown>;

    const file = await FileBlockDevice.open(ours);
    let result: Awaited<ReturnType<typeof checkQcow2Image>>;
    try {
      result = await checkQcow2Image({ file }, { repair: testCase.mode });
    } finally {
      await file.close();
    }
    // The same lines (the check, the repair, the check after) and the same summary.
    const qemuLines = qemu.stderr.split('\n').filter((line) => line !== '' && !line.startsWith('qemu-img:'));
    expect(result.messages).toEqual(qemuLines);
    expect(formatCheckResultHuman(result)).toBe(human.stdout);
    expect(checkVerdictExitCode(result)).toBe(human.status);
    const json = checkResultToQemuJson(result, { filename: theirs });
    expect(json).toEqual(expected);

    const after = runStatus('qemu-img', ['check', '--output=json', ours]);
    const afterQemu = runStatus('qemu-img', ['check', '--output=json', theirs]);
    expect(after.status).toBe(afterQemu.status);
    if (testCase.mode === 'all') expect(after.status).toBe(0);
    const ourCheck = await checkQcow2Image({ file: MemoryBlockDevice.from(readFileSync(ours)) });
    expect(ourCheck.corruptions).toBe(result.corruptions);
    expect(ourCheck.leaks).toBe(result.leaks);
    expect(runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', expectedRaw, ours]).status).toBe(0);
  });

  it('leaks mode refuses, changing nothing, when only a rebuild helps (as qemu-img fails)', async () => {
    const path = join(dir.path, 'needs-rebuild.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', path, '1M']);
    run('qemu-io', ['-c', 'write 0 64k', path]);
    const patch = new Patch(path);
    patch.setRefcount16(patch.dataCluster(0), 0);
    patch.setRefcount16(3, 2);
    patch.save();
    const qemu = runStatus('qemu-img', ['check', '-r', 'leaks', path]);
    const before = readFileSync(path);
    const file = await FileBlockDevice.open(path);
    try {
      const error = await checkQcow2Image({ file }, { repair: 'leaks' }).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(Qcow2RebuildNeededError);
      expect((error as Qcow2RebuildNeededError).code).toBe('EIO');
      const qemuLines = qemu.stderr
        .split('\n')
        .filter((line) => line !== '' && !line.startsWith('qemu-img:'));
      expect((error as Qcow2RebuildNeededError).messages).toEqual(qemuLines);
    } finally {
      await file.close();
    }
    expect(qemu.status).toBe(1);
    expect(readFileSync(path).equals(before)).toBe(true);
  });

  it('refuses a read-only file', async () => {
    const path = join(dir.path, 'ro.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', path, '1M']);
    const file = await FileBlockDevice.open(path, { readOnly: true });
    try {
      await expect(checkQcow2Image({ file }, { repair: 'leaks' })).rejects.toMatchObject({ code: 'EROFS' });
    } finally {
      await file.close();
    }
  });
});

describe('planRefcountStructure', () => {
  it('places blocks in free clusters and the table after the last used cluster, all counted', () => {
    // 512-byte clusters, 16-bit refcounts: 256 per block. Clusters 0-2 and 600 used, 3-599 free.
    const counts: number[] = [1, 1, 1];
    counts[600] = 2;
    const layout = planRefcountStructure(counts, 512, 256);
    expect([...layout.blocks.entries()]).toEqual([
      [0, 3],
      [2, 4],
    ]);
    expect(layout.tableClusterIndex).toBe(601);
    expect(layout.tableClusters).toBe(1);
    for (const clusterIndex of [3, 4, 601]) expect(layout.counts[clusterIndex]).toBe(1);
  });
});
