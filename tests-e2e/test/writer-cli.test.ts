/**
 * `qcow2 convert -O qcow2` beside qemu-img: zstd compression, external data files (data_file,
 * data_file_raw), `-n` into an existing image, `-` to stdout through `cat`, and `-p` on stderr.
 * Every image passes `qemu-img check` and `qemu-img compare` finds it identical to the source.
 */
import { spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { QCOW2_BIN, qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');
const MiB = 1024 * 1024;

describe.skipIf(!haveTools)('qcow2 convert -O qcow2: zstd, data files, -n, stdout, -p', () => {
  let dir: { path: string; remove: () => void };
  const at = (name: string) => join(dir.path, name);
  const ours = (args: string[]) => qcow2(args, { cwd: dir.path });
  const checkClean = (image: string) =>
    expect(runStatus('qemu-img', ['check', image], { cwd: dir.path }).stdout).toContain(
      'No errors were found',
    );
  const compareSame = (raw: string, image: string) =>
    expect(runStatus('qemu-img', ['compare', '-f', 'raw', raw, image], { cwd: dir.path }).status).toBe(0);

  beforeAll(() => {
    dir = tempDir('qcowkit-writer-cli-');
    // 6 MiB: random bytes, text, explicit zeros, a hole, an unaligned tail.
    const fd = openSync(at('src.raw'), 'w');
    ftruncateSync(fd, 6 * MiB + 512);
    writeSync(fd, randomFillSync(Buffer.alloc(700_000)), 0, 700_000, 4096);
    writeSync(fd, Buffer.from('qcowkit zstd '.repeat(80_000)), 0, 1_000_000, 2 * MiB + 100);
    writeSync(fd, Buffer.alloc(MiB), 0, MiB, 4 * MiB);
    writeSync(fd, Buffer.from('tail'), 0, 4, 6 * MiB + 508);
    closeSync(fd);
  });
  afterAll(() => dir.remove());

  test('zstd compression: header says zstd, clusters are zstd frames, QEMU reads them', () => {
    const result = ours([
      'convert',
      '-c',
      '-O',
      'qcow2',
      '-o',
      'compression_type=zstd',
      'src.raw',
      'z.qcow2',
    ]);
    expect(result.stderr).toBe('');
    expect(result.status).toBe(0);
    checkClean('z.qcow2');
    compareSame('src.raw', 'z.qcow2');
    const info = JSON.parse(run('qemu-img', ['info', '--output=json', at('z.qcow2')])) as {
      'format-specific': { data: { 'compression-type': string } };
    };
    expect(info['format-specific'].data['compression-type']).toBe('zstd');
    expect(run('qemu-img', ['check', at('z.qcow2')])).not.toContain(' 0.00% compressed clusters');
    expect(readFileSync(at('z.qcow2')).includes(Buffer.from([0x28, 0xb5, 0x2f, 0xfd]))).toBe(true);
    // Smaller than the uncompressed image (the text compresses).
    run('qemu-img', ['convert', '-O', 'qcow2', at('src.raw'), at('plain.qcow2')]);
    expect(statSync(at('z.qcow2')).size).toBeLessThan(statSync(at('plain.qcow2')).size);
  });

  for (const raw of [false, true]) {
    test(`data_file${raw ? ', data_file_raw=on' : ''}: metadata in the image, data at guest offsets`, () => {
      const image = raw ? 'dr.qcow2' : 'd.qcow2';
      const data = raw ? 'dr.data' : 'd.data';
      const options = `data_file=${data}${raw ? ',data_file_raw=on' : ''}`;
      const result = ours(['convert', '-O', 'qcow2', '-o', options, 'src.raw', image]);
      expect(result.stderr).toBe('');
      expect(result.status).toBe(0);
      checkClean(image);
      compareSame('src.raw', image);
      // As qemu-img: the data file has the guest's size, the image holds metadata only.
      const theirs = raw ? 'qr.qcow2' : 'q.qcow2';
      run(
        'qemu-img',
        [
          'convert',
          '-O',
          'qcow2',
          '-o',
          `data_file=q-${data},${raw ? 'data_file_raw=on' : 'data_file_raw=off'}`,
          'src.raw',
          theirs,
        ],
        {
          cwd: dir.path,
        },
      );
      expect(statSync(at(data)).size).toBe(statSync(at(`q-${data}`)).size);
      const mapOf = (file: string) =>
        JSON.parse(run('qemu-img', ['map', '--output=json', file], { cwd: dir.path })) as {
          start: number;
          length: number;
          data: boolean;
        }[];
      const mapped = (file: string) =>
        mapOf(file)
          .filter((extent) => extent.data)
          .reduce((sum, extent) => sum + extent.length, 0);
      if (raw) {
        // Every cluster mapped, and the data file alone is the raw guest.
        expect(mapped(image)).toBe(mapped(theirs));
        compareSame('src.raw', data);
      }
      expect(statSync(at(image)).size).toBeLessThan(MiB);
    });
  }

  test('-n writes into an existing image: old data replaced, zeros unmapped, check clean', () => {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', at('n.qcow2'), '8M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x55 0 8M', at('n.qcow2')]);
    const result = ours(['convert', '-n', '-O', 'qcow2', 'src.raw', 'n.qcow2']);
    expect(result.stderr).toBe('');
    expect(result.status).toBe(0);
    checkClean('n.qcow2');
    // The first 6 MiB + 512 equal the source; the rest keeps the old pattern.
    run('qemu-img', ['convert', '-O', 'raw', at('n.qcow2'), at('n.raw')]);
    const bytes = readFileSync(at('n.raw'));
    const source = readFileSync(at('src.raw'));
    expect(bytes.subarray(0, source.length).equals(source)).toBe(true);
    expect(bytes.subarray(source.length).every((byte) => byte === 0x55)).toBe(true);
    // Zeros in the source no longer hold data (qemu-img map shows no data at 5 MiB).
    const map = JSON.parse(run('qemu-img', ['map', '--output=json', at('n.qcow2')])) as {
      start: number;
      length: number;
      data: boolean;
    }[];
    expect(
      map.some((extent) => extent.data && extent.start <= 5 * MiB && extent.start + extent.length > 5 * MiB),
    ).toBe(false);
    // As qemu-img: too small a target, and -o, are refused with one line.
    run('qemu-img', ['create', '-q', '-f', 'qcow2', at('small.qcow2'), '1M']);
    const small = ours(['convert', '-n', '-O', 'qcow2', 'src.raw', 'small.qcow2']);
    expect(small.status).toBe(1);
    expect(small.stderr.trim().split('\n')).toEqual(['qcow2: output file is smaller than input file']);
    const withOptions = ours(['convert', '-n', '-O', 'qcow2', '-o', 'cluster_size=4k', 'src.raw', 'n.qcow2']);
    expect(withOptions.status).toBe(1);
    expect(withOptions.stderr).toContain('-o has no effect when skipping image creation');
  });

  test('-n -c writes compressed clusters into the existing image', () => {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', at('nc.qcow2'), '7M']);
    const result = ours(['convert', '-n', '-c', '-O', 'qcow2', 'src.raw', 'nc.qcow2']);
    expect(result.status).toBe(0);
    checkClean('nc.qcow2');
    run('qemu-img', ['convert', '-O', 'raw', at('nc.qcow2'), at('nc.raw')]);
    const source = readFileSync(at('src.raw'));
    expect(readFileSync(at('nc.raw')).subarray(0, source.length).equals(source)).toBe(true);
    expect(run('qemu-img', ['check', at('nc.qcow2')])).not.toContain(' 0.00% compressed clusters');
  });

  for (const compress of [false, true]) {
    test(`target '-'${compress ? ' with -c' : ''} piped through cat, -p on stderr only`, () => {
      const out = compress ? 'stdout-c.qcow2' : 'stdout.qcow2';
      const piped = spawnSync(
        'sh',
        [
          '-c',
          `"${process.execPath}" "${QCOW2_BIN}" convert -p ${compress ? '-c ' : ''}-O qcow2 src.raw - 2>progress.txt | cat > ${out}`,
        ],
        { cwd: dir.path, encoding: 'utf8' },
      );
      expect(piped.status).toBe(0);
      checkClean(out);
      compareSame('src.raw', out);
      const progress = readFileSync(at('progress.txt'), 'utf8');
      expect(progress).toContain('(100.00/100%)');
      expect(readFileSync(at(out)).includes(Buffer.from('(100.00/100%)'))).toBe(false);
    });
  }

  test('-p to a file reports progress on stderr as qemu-img does', () => {
    const result = ours(['convert', '-p', '-O', 'qcow2', 'src.raw', 'p.qcow2']);
    expect(result.status).toBe(0);
    expect(result.stdout).toBe('');
    expect(result.stderr).toMatch(/^ {4}\(0\.00\/100%\)\r.*\(100\.00\/100%\)\r\n$/s);
    checkClean('p.qcow2');
  });

  test('refuses with one line what cannot work', () => {
    const compressed = ours(['convert', '-c', '-O', 'qcow2', '-o', 'data_file=c.data', 'src.raw', 'c.qcow2']);
    expect(compressed.status).toBe(1);
    expect(compressed.stderr.trim().split('\n')).toHaveLength(1);
    expect(compressed.stderr).toContain('compression is not supported with an external data file');
    const intoSource = ours(['convert', '-O', 'qcow2', '-o', 'data_file=src.raw', 'src.raw', 'x.qcow2']);
    expect(intoSource.status).toBe(1);
    expect(intoSource.stderr).toContain("Could not create 'src.raw'");
    const dashN = ours(['convert', '-n', '-O', 'qcow2', 'src.raw', '-']);
    expect(dashN.status).toBe(1);
    expect(dashN.stderr.trim().split('\n')).toHaveLength(1);
  });
});
