/**
 * `qcow2 convert -O qcow2 -S SIZE` beside `qemu-img convert -O qcow2 -S SIZE`: for raw and qcow2
 * sources (holes, written zero runs of many lengths and alignments, runs across the 2 MiB pieces
 * qemu-img reads in, unallocated and zero clusters, a backing chain) and sizes from 0 to 16 MiB,
 * our image passes `qemu-img check`, `qemu-img compare` finds it identical to qemu-img's, and
 * `qemu-img map --output=json` gives the same allocation (host offsets aside).
 *
 * Known differences, left out of the exact comparison (cluster allocation is the same, what
 * differs is older than -S): with `-o extended_l2=on` qemu-img allocates subclusters where we
 * allocate whole clusters; with `-o preallocation=metadata` it leaves the unwritten parts of
 * data clusters as holes in the file (map says zero there); with `-B`, sizes other than 0 keep
 * our comparison with the backing file; with `-n`, sizes other than 0 keep our default.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { QCOW2_BIN, qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');
const KiB = 1024;
const MiB = 1024 * KiB;

/** qemu-img map's extents without host offsets: start, length, depth, present, zero, data, and
 * whether an offset is given at all (not for compressed clusters). */
function allocation(image: string, cwd: string): string[] {
  const extents = JSON.parse(run('qemu-img', ['map', '--output=json', image], { cwd })) as {
    start: number;
    length: number;
    depth: number;
    present: boolean;
    zero: boolean;
    data: boolean;
    offset?: number;
  }[];
  return extents.map(
    (e) =>
      `${e.start}+${e.length} depth=${e.depth} present=${e.present} zero=${e.zero} data=${e.data} offset=${e.offset !== undefined}`,
  );
}

describe.skipIf(!haveTools)('qcow2 convert -O qcow2 -S: allocation as qemu-img', () => {
  let dir: { path: string; remove: () => void };
  const at = (name: string) => join(dir.path, name);
  const qemuIo = (image: string, ...commands: string[]) =>
    run('qemu-io', ['-f', 'qcow2', ...commands.flatMap((command) => ['-c', command]), at(image)]);

  beforeAll(() => {
    dir = tempDir('qcowkit-writer-sparse-');
    // 12 MiB + 1.5 KiB raw. First 6 MiB written (one data extent): 1500-byte marks followed by zero
    // runs from 512 B to 700 KiB, marks around 2 MiB and around 4 MiB (a run across the pieces).
    // A hole to 8 MiB, then a written extent of 2 MiB + 300 KiB with a mark every 150 KiB, a hole,
    // and 700 bytes of data ending at the unaligned end.
    const head = Buffer.alloc(6 * MiB);
    let offset = 0;
    for (const zeros of [
      512,
      1024,
      4 * KiB,
      8 * KiB,
      60 * KiB,
      64 * KiB,
      65 * KiB,
      100 * KiB,
      127 * KiB,
      128 * KiB,
      129 * KiB,
      192 * KiB,
      200 * KiB,
      256 * KiB,
      300 * KiB,
      512 * KiB + 512,
      700 * KiB,
    ]) {
      head.fill(2, offset + 3000, offset + 4500);
      offset += 4500 + zeros;
    }
    head.fill(3, 2 * MiB - 1024, 2 * MiB + 1024);
    head.fill(4, 4 * MiB - 100 * KiB, 4 * MiB - 100 * KiB + 10);
    head.fill(4, 4 * MiB + 50 * KiB, 4 * MiB + 50 * KiB + 10);
    const second = Buffer.alloc(2 * MiB + 300 * KiB);
    for (let mark = 0; mark < second.length; mark += 150 * KiB) second.fill(5, mark, mark + 700);
    const size = 12 * MiB + 1536;
    const fd = openSync(at('src.raw'), 'w');
    ftruncateSync(fd, size);
    writeSync(fd, head, 0, head.length, 0);
    writeSync(fd, second, 0, second.length, 8 * MiB);
    writeSync(fd, Buffer.alloc(700, 7), 0, 700, size - 700);
    closeSync(fd);

    // qcow2: the same guest, then zero clusters (kept and unmapped), a discard, new data.
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', at('src.raw'), at('src.qcow2')]);
    qemuIo(
      'src.qcow2',
      'write -z 64k 128k',
      'write -z 1M 64k',
      'write -P 9 5M 4k',
      'write -z -u 8M 192k',
      'discard 9M 128k',
    );
    // A fully allocated qcow2 with zero clusters in it.
    run('qemu-img', ['convert', '-S', '0', '-f', 'raw', '-O', 'qcow2', at('src.raw'), at('full.qcow2')]);
    qemuIo('full.qcow2', 'write -z 64k 256k', 'write -z -u 2M 1M');
    // A backing chain: zeros written as data in both layers, zero clusters, a partial cluster.
    run('qemu-img', ['create', '-q', '-f', 'qcow2', at('base.qcow2'), '13M']);
    qemuIo('base.qcow2', 'write -P 1 0 3M', 'write -z 1M 200k', 'write -P 0 2M 300k');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', at('top.qcow2')]);
    qemuIo('top.qcow2', 'write -P 2 2560k 4k', 'write -z 0 64k', 'write -P 0 6M 1M', 'write -P 3 7M 512');
    // Other source cluster sizes (qemu-img ends block-status runs on them), a compressed source,
    // and a chain whose 2 MiB-cluster backing file is shorter than the 4 KiB-cluster overlay.
    run('qemu-img', [
      'convert',
      '-f',
      'raw',
      '-O',
      'qcow2',
      '-o',
      'cluster_size=4k',
      at('src.raw'),
      at('s4k.qcow2'),
    ]);
    run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', at('src.raw'), at('compressed.qcow2')]);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', at('short.qcow2'), '5000000']);
    qemuIo('short.qcow2', 'write -P 1 0 1M', 'write -P 2 4500000 4096');
    run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-b',
      'short.qcow2',
      '-F',
      'qcow2',
      '-o',
      'cluster_size=4k',
      at('long.qcow2'),
      '12M',
    ]);
    qemuIo('long.qcow2', 'write -P 3 6M 1k');
  });
  afterAll(() => dir.remove());

  let serial = 0;
  /** Converts with both tools (ours through `cat` when `pipe`), checks ours, compares both ways. */
  function convertBoth(source: string, args: string[], options: { pipe?: boolean; exact?: boolean } = {}) {
    const name = `t${serial++}`;
    const theirs = `${name}-qemu.qcow2`;
    const ours = `${name}-ours.qcow2`;
    run('qemu-img', ['convert', ...args, '-O', 'qcow2', source, theirs], { cwd: dir.path });
    if (options.pipe === true) {
      const line = `"${process.execPath}" "${QCOW2_BIN}" convert ${args.join(' ')} -O qcow2 ${source} - | cat > ${ours}`;
      const result = spawnSync('sh', ['-c', line], { cwd: dir.path, encoding: 'utf8' });
      expect(result.stderr).toBe('');
      expect(result.status).toBe(0);
    } else {
      const result = qcow2(['convert', ...args, '-O', 'qcow2', source, ours], { cwd: dir.path });
      expect(result.stderr).toBe('');
      expect(result.status).toBe(0);
    }
    const check = runStatus('qemu-img', ['check', ours], { cwd: dir.path });
    expect(check.stdout).toContain('No errors were found');
    expect(check.status).toBe(0);
    expect(runStatus('qemu-img', ['compare', theirs, ours], { cwd: dir.path }).status).toBe(0);
    if (options.exact !== false) expect(allocation(ours, dir.path)).toEqual(allocation(theirs, dir.path));
    return { theirs, ours };
  }

  const SIZES = ['0', '512', '4k', '64k', '128k', '1M', '100k', '16M'];
  for (const source of ['src.raw', 'src.qcow2', 'full.qcow2', 'top.qcow2']) {
    for (const size of SIZES) {
      test(`${source} -S ${size}`, () => {
        convertBoth(source, ['-S', size]);
      });
    }
  }

  for (const source of ['s4k.qcow2', 'compressed.qcow2', 'long.qcow2']) {
    for (const size of ['0', '8k', '100k', '1M', '16M']) {
      test(`${source} -S ${size}`, () => {
        convertBoth(source, ['-S', size]);
      });
    }
  }

  test('-S sizes above the cluster size change the allocation (the matrix is not trivial)', () => {
    const data = (image: string) =>
      allocation(image, dir.path)
        .filter((line) => line.includes('data=true'))
        .map((line) => Number(/\+(\d+)/.exec(line)![1]))
        .reduce((sum, length) => sum + length, 0);
    const sizes = ['4k', '128k', '100k', '1M', '16M'].map((size) =>
      data(convertBoth('src.raw', ['-S', size]).ours),
    );
    // 4k stores only clusters with data; each larger size stores more of the zeros between.
    for (let index = 1; index < sizes.length; index++) expect(sizes[index]).not.toBe(sizes[0]);
    expect(sizes[3]! > sizes[1]! && sizes[4]! > sizes[3]!).toBe(true);
  });

  for (const clusterSize of ['512', '2k', '2M']) {
    for (const size of ['4k', '8k', '1M']) {
      test(`cluster_size=${clusterSize} -S ${size}`, () => {
        convertBoth('src.raw', ['-f', 'raw', '-o', `cluster_size=${clusterSize}`, '-S', size]);
      });
    }
  }

  for (const clusterSize of ['512', '1k', '2k']) {
    test(`cluster_size=${clusterSize} without -S: qemu-img's default -S 4k`, () => {
      convertBoth('src.raw', ['-f', 'raw', '-o', `cluster_size=${clusterSize}`]);
      convertBoth('src.qcow2', ['-o', `cluster_size=${clusterSize}`]);
    });
  }

  for (const size of ['0', '4k', '1M']) {
    test(`-c -S ${size}: zero clusters tested whole, -S 0 compresses every cluster`, () => {
      convertBoth('src.qcow2', ['-c', '-S', size]);
    });
    test(`compat=0.10 -S ${size} (no zero clusters)`, () => {
      convertBoth('top.qcow2', ['-o', 'compat=0.10', '-S', size]);
    });
    test(`target - through a pipe, -S ${size}`, () => {
      convertBoth('src.raw', ['-f', 'raw', '-S', size], { pipe: true });
    });
  }

  test('-S 0 with extended_l2 and with preallocation=metadata: every cluster data', () => {
    convertBoth('src.raw', ['-f', 'raw', '-o', 'extended_l2=on', '-S', '0']);
    convertBoth('src.raw', ['-f', 'raw', '-o', 'preallocation=metadata', '-S', '0']);
  });

  test('-S 1M with extended_l2 and preallocation=metadata: same content (allocation differs, see above)', () => {
    convertBoth('src.raw', ['-f', 'raw', '-o', 'extended_l2=on', '-S', '1M'], { exact: false });
    convertBoth('src.raw', ['-f', 'raw', '-o', 'preallocation=metadata', '-S', '1M'], { exact: false });
  });

  test('-B -S 0: what the source layer holds is stored, the rest left to the backing file', () => {
    convertBoth('top.qcow2', ['-B', 'base.qcow2', '-F', 'qcow2', '-S', '0']);
    convertBoth('src.raw', ['-f', 'raw', '-B', 'base.qcow2', '-F', 'qcow2', '-S', '0']);
    convertBoth('top.qcow2', ['-c', '-B', 'base.qcow2', '-F', 'qcow2', '-S', '0']);
  });

  test('-n -S 0: the existing image ends fully allocated', () => {
    for (const tool of ['qemu', 'ours']) {
      run('qemu-img', ['create', '-q', '-f', 'qcow2', at(`n-${tool}.qcow2`), String(12 * MiB + 1536)]);
      qemuIo(`n-${tool}.qcow2`, 'write -P 8 0 3M');
    }
    run('qemu-img', ['convert', '-n', '-S', '0', '-O', 'qcow2', at('src.qcow2'), at('n-qemu.qcow2')]);
    const result = qcow2(['convert', '-n', '-S', '0', '-O', 'qcow2', 'src.qcow2', 'n-ours.qcow2'], {
      cwd: dir.path,
    });
    expect(result.stderr).toBe('');
    expect(result.status).toBe(0);
    expect(run('qemu-img', ['check', at('n-ours.qcow2')])).toContain('No errors were found');
    expect(runStatus('qemu-img', ['compare', at('n-qemu.qcow2'), at('n-ours.qcow2')]).status).toBe(0);
    expect(allocation('n-ours.qcow2', dir.path)).toEqual(allocation('n-qemu.qcow2', dir.path));
  });
});
