/**
 * @qcowkit/qcow2-writer conversions checked by QEMU: for every option set and several source
 * shapes the output passes `qemu-img check`, `qemu-img compare` finds it identical to the source,
 * and core's reader reads the same bytes. Also: output through a pipe (`cat`), over a backing
 * file, a sparse 1 TiB source, and `measure` against `qemu-img measure`.
 */
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import {
  closeSync,
  existsSync,
  ftruncateSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { FileBlockDevice, isMemoryBacked } from '@qcowkit/blockdev/node';
import { openImage } from '@qcowkit/qcow2-core/node';
import { type ConvertOptions, convertToQcow2, measure } from '@qcowkit/qcow2-writer/node';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');
const MiB = 1024 * 1024;

const OPTION_SETS: Record<string, ConvertOptions> = {
  default: {},
  'compat 0.10': { version: 2 },
  '512 B clusters, 1-bit refcounts': { clusterSize: 512, refcountBits: 1 },
  '4 KiB clusters, 64-bit refcounts': { clusterSize: 4096, refcountBits: 64 },
  '2 MiB clusters': { clusterSize: 2 * MiB },
  'extended L2': { extendedL2: true },
  'lazy refcounts': { lazyRefcounts: true },
  'compressed (zlib)': { compress: true },
  'compressed (zstd)': { compress: true, compressionType: 'zstd' },
  'compressed, 4 KiB clusters, 8-bit refcounts': { compress: true, clusterSize: 4096, refcountBits: 8 },
  'preallocation metadata': { preallocation: 'metadata' },
};

/** Writes a raw file: random runs, text, explicit zeros, holes, an unaligned tail. */
function makeRaw(path: string, size: number, seed: number): void {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  const random = randomFillSync(Buffer.alloc(300_000));
  const text = Buffer.from(`qcowkit writer ${seed} `.repeat(20_000));
  writeSync(fd, random, 0, random.length, 1000 + seed);
  writeSync(fd, text, 0, 200_000, 3 * MiB + 7);
  writeSync(fd, Buffer.alloc(256 * 1024), 0, 256 * 1024, 5 * MiB);
  writeSync(fd, random, 0, 70_000, 7 * MiB - 1000);
  writeSync(fd, Buffer.from('end'), 0, 3, size - 3);
  closeSync(fd);
}

async function readAll(path: string): Promise<Buffer> {
  const opened = await openImage(path);
  try {
    return Buffer.from(await opened.device.read(0, opened.device.size));
  } finally {
    await opened.close();
  }
}

describe.skipIf(!haveTools)('qcow2-writer conversions', () => {
  let dir: { path: string; remove: () => void };
  const at = (name: string) => join(dir.path, name);
  beforeAll(() => {
    dir = tempDir('qcowkit-writer-convert-');
    makeRaw(at('mixed.raw'), 9 * MiB + 512, 1);
    // A qcow2 source with a backing chain (flattened by the conversion).
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'chain-base.qcow2', '12M'], { cwd: dir.path });
    run(
      'qemu-io',
      ['-f', 'qcow2', '-c', 'write -P 0x41 0 3M', '-c', 'write -P 0x42 8M 64k', 'chain-base.qcow2'],
      {
        cwd: dir.path,
      },
    );
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'chain-base.qcow2', '-F', 'qcow2', 'chain.qcow2'], {
      cwd: dir.path,
    });
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x43 1M 100k', '-c', 'write -z 2M 512k', 'chain.qcow2'], {
      cwd: dir.path,
    });
    run('qemu-img', ['convert', '-O', 'raw', 'chain.qcow2', 'chain.raw'], { cwd: dir.path });
  });
  afterAll(() => dir.remove());

  const sources = [
    { name: 'mixed raw', path: 'mixed.raw', raw: 'mixed.raw' },
    { name: 'qcow2 with a backing chain', path: 'chain.qcow2', raw: 'chain.raw' },
  ];

  for (const [name, options] of Object.entries(OPTION_SETS)) {
    for (const source of sources) {
      test(`${name}, ${source.name}: check clean, compare identical, our reader identical`, async () => {
        const out = at('out.qcow2');
        const opened = await openImage(at(source.path), { readOnly: true });
        let written: number;
        try {
          written = await convertToQcow2(opened.device, out, options);
        } finally {
          await opened.close();
        }
        expect(statSync(out).size).toBe(written);
        expect(runStatus('qemu-img', ['check', out]).stdout).toContain('No errors were found');
        expect(
          runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', at(source.raw), out]).status,
        ).toBe(0);
        expect(Buffer.compare(await readAll(out), readFileSync(at(source.raw)))).toBe(0);
      });
    }
  }

  test('into a memory-backed folder (writes inline), plain and compressed: check clean, compare identical', async () => {
    // /dev/shm where the machine has one (Linux): the file sink writes on the calling thread there.
    const shm = existsSync('/dev/shm') && (await isMemoryBacked('/dev/shm'));
    const folder = shm ? mkdtempSync(join('/dev/shm', 'qcowkit-writer-inline-')) : dir.path;
    try {
      for (const options of [{}, { compress: true }] as ConvertOptions[]) {
        const out = join(folder, 'inline.qcow2');
        const source = await FileBlockDevice.open(at('mixed.raw'), { readOnly: true });
        let written: number;
        try {
          written = await convertToQcow2(source, out, options);
        } finally {
          await source.close();
        }
        expect(statSync(out).size).toBe(written);
        expect(runStatus('qemu-img', ['check', out]).stdout).toContain('No errors were found');
        expect(
          runStatus('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', at('mixed.raw'), out]).status,
        ).toBe(0);
      }
    } finally {
      if (shm) rmSync(folder, { recursive: true, force: true });
    }
  });

  test('output through a pipe (cat) is as valid as output to a file', async () => {
    const out = at('piped.qcow2');
    const source = await FileBlockDevice.open(at('mixed.raw'), { readOnly: true });
    const cat = spawn('sh', ['-c', 'cat > "$0"', out], { stdio: ['pipe', 'ignore', 'inherit'] });
    const exited = new Promise<number | null>((resolve) => cat.on('close', resolve));
    try {
      await convertToQcow2(source, cat.stdin, { compress: true });
    } finally {
      await source.close();
    }
    expect(await exited).toBe(0);
    expect(runStatus('qemu-img', ['check', out]).stdout).toContain('No errors were found');
    expect(runStatus('qemu-img', ['compare', '-f', 'raw', at('mixed.raw'), out]).status).toBe(0);
  });

  test('a raw stream (read once) through a pipe', async () => {
    const out = at('stream.qcow2');
    const { createReadStream } = await import('node:fs');
    const cat = spawn('sh', ['-c', 'cat > "$0"', out], { stdio: ['pipe', 'ignore', 'inherit'] });
    const exited = new Promise<number | null>((resolve) => cat.on('close', resolve));
    await convertToQcow2(
      { size: statSync(at('mixed.raw')).size, stream: createReadStream(at('mixed.raw')) },
      cat.stdin,
    );
    expect(await exited).toBe(0);
    expect(runStatus('qemu-img', ['check', out]).stdout).toContain('No errors were found');
    expect(runStatus('qemu-img', ['compare', '-f', 'raw', at('mixed.raw'), out]).status).toBe(0);
  });

  for (const version of [2, 3] as const) {
    test(`v${version} over a backing file: only differing clusters stored, reads as the source`, async () => {
      const base = at(`base${version}.qcow2`);
      const overlay = at(`overlay${version}.qcow2`);
      run('qemu-img', ['convert', '-O', 'qcow2', at('chain.raw'), base]);
      run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);
      run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 4M 64k', '-c', 'write -z 0 64k', overlay]);
      run('qemu-img', ['convert', '-O', 'raw', overlay, at('overlay.raw')]);
      const target = at(`diff${version}.qcow2`);
      const source = await openImage(overlay, { readOnly: true });
      const backing = await openImage(base, { readOnly: true });
      try {
        await convertToQcow2(source.device, target, {
          version,
          backing: backing.device,
          backingFile: base,
          backingFormat: 'qcow2',
        });
      } finally {
        await source.close();
        await backing.close();
      }
      expect(runStatus('qemu-img', ['check', target]).stdout).toContain('No errors were found');
      expect(runStatus('qemu-img', ['compare', '-f', 'raw', at('overlay.raw'), target]).status).toBe(0);
      const map = JSON.parse(run('qemu-img', ['map', '--output=json', target])) as {
        start: number;
        length: number;
        depth: number;
        data: boolean;
      }[];
      const ownData = map.filter((extent) => extent.depth === 0 && extent.data);
      expect(ownData.reduce((sum, extent) => sum + extent.length, 0)).toBe(
        version === 3 ? 64 * 1024 : 128 * 1024,
      );
    });
  }

  test('a sparse 1 TiB source holding little data makes a small, valid image', async () => {
    const raw = at('sparse.raw');
    const fd = openSync(raw, 'w');
    ftruncateSync(fd, 2 ** 40);
    writeSync(fd, Buffer.from('middle'), 0, 6, 2 ** 39 + 12345);
    writeSync(fd, randomFillSync(Buffer.alloc(MiB)), 0, MiB, 2 ** 40 - MiB);
    closeSync(fd);
    const out = at('sparse.qcow2');
    const source = await FileBlockDevice.open(raw, { readOnly: true });
    try {
      await convertToQcow2(source, out);
    } finally {
      await source.close();
    }
    expect(statSync(out).size).toBeLessThan(3 * MiB);
    expect(runStatus('qemu-img', ['check', out]).stdout).toContain('No errors were found');
    expect(runStatus('qemu-img', ['compare', '-f', 'raw', raw, out]).status).toBe(0);
  });

  test('measure agrees with qemu-img measure', async () => {
    const cases: [Record<string, unknown>, string[]][] = [
      [{}, []],
      [{ clusterSize: 512, refcountBits: 1 }, ['-o', 'cluster_size=512,refcount_bits=1']],
      [{ clusterSize: 4096, refcountBits: 64 }, ['-o', 'cluster_size=4096,refcount_bits=64']],
      [{ extendedL2: true }, ['-o', 'extended_l2=on']],
      [{ clusterSize: 2 * MiB }, ['-o', 'cluster_size=2M']],
    ];
    const mismatches: string[] = [];
    for (const [options, qemu] of cases) {
      for (const size of [1024, 1_000_000, 2 ** 30, 2 ** 40 + 512]) {
        const result = runStatus('qemu-img', [
          'measure',
          '--output=json',
          '-O',
          'qcow2',
          ...qemu,
          '--size',
          String(size),
        ]);
        if (result.status !== 0) continue; // too large for the cluster size
        const theirs = JSON.parse(result.stdout) as { required: number; 'fully-allocated': number };
        const ours = await measure(size, options);
        if (ours.required !== theirs.required || ours.fullyAllocated !== theirs['fully-allocated']) {
          mismatches.push(`${size} ${qemu.join(' ')}: ours ${JSON.stringify(ours)}, qemu ${result.stdout}`);
        }
      }
      for (const path of ['mixed.raw', 'chain.qcow2']) {
        const theirs = JSON.parse(
          run('qemu-img', ['measure', '--output=json', '-O', 'qcow2', ...qemu, at(path)]),
        ) as {
          required: number;
          'fully-allocated': number;
        };
        const opened = await openImage(at(path), { readOnly: true });
        const ours = await measure(opened.device, options).finally(() => opened.close());
        if (ours.required !== theirs.required || ours.fullyAllocated !== theirs['fully-allocated']) {
          mismatches.push(
            `${path} ${qemu.join(' ')}: ours ${JSON.stringify(ours)}, qemu ${JSON.stringify(theirs)}`,
          );
        }
      }
    }
    expect(mismatches).toEqual([]);
  });
});
