/**
 * Writing images with an external data file (data_file, data_file_raw) beside QEMU: images made
 * by qemu-img and written by qemu-io get random writes, zeroes and discards through the library;
 * `qemu-img check` finds them clean, `qemu-img compare` equal to a raw file that got the same
 * writes (a raw data file is that raw file itself), qemu-io reads our bytes and we read qemu-io's.
 * The CLI's writing commands (create, bench -w, resize, commit, snapshot, check -r) beside
 * qemu-img on such images.
 */
import { mkdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { openImage } from '@qcowkit/qcow2-core/node';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');
const KiB = 1024;
const MiB = 1024 * KiB;

/** A small deterministic generator (the same sequence on every run, different per seed). */
function generator(seed: number): (limit: number) => number {
  let state = seed >>> 0 || 1;
  return (limit) => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) % limit;
  };
}

function pattern(seed: number, length: number): Uint8Array {
  const next = generator(seed);
  const out = new Uint8Array(length);
  for (let at = 0; at < length; at++) out[at] = next(256);
  return out;
}

describe.skipIf(!haveTools)('images with an external data file, written beside QEMU', () => {
  let dir: { path: string; remove: () => void };
  const at = (name: string) => join(dir.path, name);
  const qemuImg = (args: readonly string[]) => runStatus('qemu-img', args, { cwd: dir.path });
  const qemuIo = (image: string, commands: readonly string[], format = 'qcow2') =>
    run('qemu-io', ['-f', format, ...commands.flatMap((command) => ['-c', command]), image], {
      cwd: dir.path,
    });
  const cli = (args: readonly string[]) => qcow2(args, { cwd: dir.path });
  /** `qemu-img create -q -f qcow2 ...args` in the test directory. */
  const qemuCreate = (args: readonly string[]) =>
    run('qemu-img', ['create', '-q', '-f', 'qcow2', ...args], { cwd: dir.path });
  const removeFiles = (...names: string[]) => {
    for (const name of names) rmSync(at(name), { force: true });
  };
  const expectClean = (image: string) => {
    const result = qemuImg(['check', image]);
    expect(result.status, result.stdout + result.stderr).toBe(0);
  };
  const expectSame = (image: string, raw: string) => {
    const result = qemuImg(['compare', '-F', 'raw', image, raw]);
    expect(result.stdout + result.stderr).toBe('Images are identical.\n');
  };

  beforeAll(() => {
    dir = tempDir('qcowkit-data-file-');
  });
  afterAll(() => dir?.remove());

  test.each([
    ['not raw', 'data_file_raw=off', false, 64 * KiB],
    ['raw', 'data_file_raw=on', false, 64 * KiB],
    ['not raw, over a backing file', 'data_file_raw=off', true, 64 * KiB],
    ['not raw, extended L2', 'data_file_raw=off,cluster_size=16k,extended_l2=on', false, 16 * KiB],
  ])(
    '%s: random writes, zeroes and discards through the library',
    async (name, options, backed, clusterSize) => {
      const size = 6 * MiB;
      const tag = name.replaceAll(/[^a-z0-9]/g, '');
      const image = `${tag}.qcow2`;
      const data = at(`${tag}.data`);
      const reference = `${tag}.ref.raw`;
      run('qemu-img', ['create', '-q', '-f', 'raw', reference, String(size)], { cwd: dir.path });
      const create = ['create', '-q', '-f', 'qcow2', '-o', `data_file=${data},${options}`];
      if (backed) {
        run('qemu-img', ['create', '-q', '-f', 'raw', `${tag}.base.raw`, String(size)], { cwd: dir.path });
        for (const target of [`${tag}.base.raw`, reference]) {
          qemuIo(target, ['write -P 0x3c 0 6M'], 'raw');
        }
        create.push('-b', `${tag}.base.raw`, '-F', 'raw');
      }
      run('qemu-img', [...create, image, String(size)], { cwd: dir.path });
      // QEMU's own writes first, so ours overwrite, zero and discard clusters it allocated.
      const qemuWrites = ['write -P 0x11 0 1M', 'write -P 0x22 3M 700k', 'write -z 1200k 64k'];
      qemuIo(image, qemuWrites);
      qemuIo(reference, qemuWrites, 'raw');

      const opened = await openImage(at(image), { readOnly: false });
      const referenceFile = await FileBlockDevice.open(at(reference), { readOnly: false });
      const next = generator(tag.length * 7919 + size);
      for (let step = 0; step < 60; step++) {
        const offset = next(size - 1);
        const length = 1 + next(Math.min(300 * KiB, size - offset));
        const kind = next(10);
        if (kind < 6) {
          const bytes = pattern(step + 1, length);
          await opened.device.write(offset, bytes);
          await referenceFile.write(offset, bytes);
        } else if (kind < 8) {
          await opened.device.writeZeroes(offset, length);
          await referenceFile.write(offset, new Uint8Array(length));
        } else {
          await opened.device.discard(offset, length);
          // Whole clusters read as zeros (v3, as QEMU); over a backing file the partial clusters at
          // the ends are left as they were (discard is advisory), elsewhere they read as zeros.
          const from = backed ? Math.ceil(offset / clusterSize) * clusterSize : offset;
          const to = backed ? Math.floor((offset + length) / clusterSize) * clusterSize : offset + length;
          if (to > from) await referenceFile.write(from, new Uint8Array(to - from));
        }
        if (step % 17 === 16) await opened.device.flush();
      }
      // A run qemu-io checks by pattern.
      await opened.device.write(2 * MiB + 333, new Uint8Array(100 * KiB).fill(0x7e));
      await referenceFile.write(2 * MiB + 333, new Uint8Array(100 * KiB).fill(0x7e));
      await opened.close();
      await referenceFile.close();

      expectClean(image);
      expectSame(image, reference);
      if (options.includes('data_file_raw=on')) {
        // The data file is a valid raw image of the guest.
        expect(readFileSync(data).equals(readFileSync(at(reference)))).toBe(true);
      }
      // qemu-io reads our bytes, then writes; we read its writes.
      expect(qemuIo(image, [`read -P 0x7e ${2 * MiB + 333} ${100 * KiB}`])).not.toContain(
        'verification failed',
      );
      const theirs = [
        'write -P 0x5e 100k 200k',
        'write -z 4M 128k',
        'discard 5M 64k',
        'write -P 0x6f 5M 10k',
      ];
      qemuIo(image, theirs);
      qemuIo(
        reference,
        theirs.map((command) => command.replace('discard 5M 64k', 'write -z 5M 64k')),
        'raw',
      );
      expectClean(image);
      const again = await openImage(at(image));
      const expected = readFileSync(at(reference));
      const actual = await again.device.read(0, size);
      expect(Buffer.from(actual).equals(expected)).toBe(true);
      await again.close();
    },
  );

  test('bench -w writes what qemu-img bench -w writes; the image stays clean', () => {
    for (const raw of ['off', 'on']) {
      const args = ['bench', '-w', '-c', '3000', '-d', '8', '-s', '4k', '-S', '37k', '--pattern=97'];
      for (const who of ['theirs', 'ours']) {
        qemuCreate([
          '-o',
          `data_file=${who}-b${raw}.data,data_file_raw=${raw}`,
          `${who}-b${raw}.qcow2`,
          '32M',
        ]);
      }
      expect(qemuImg([...args, `theirs-b${raw}.qcow2`]).status).toBe(0);
      const result = cli([...args, `ours-b${raw}.qcow2`]);
      expect(result.status, result.stderr).toBe(0);
      expectClean(`ours-b${raw}.qcow2`);
      expect(qemuImg(['compare', `theirs-b${raw}.qcow2`, `ours-b${raw}.qcow2`]).stdout).toBe(
        'Images are identical.\n',
      );
      if (raw === 'on') {
        expect(readFileSync(at(`ours-b${raw}.data`)).equals(readFileSync(at(`theirs-b${raw}.data`)))).toBe(
          true,
        );
      }
    }
  });

  test('create -o data_file[,data_file_raw=on][,preallocation=...] makes what qemu-img makes', () => {
    for (const options of [
      'data_file=d.data',
      'data_file=d.data,data_file_raw=on',
      'data_file=d.data,preallocation=metadata',
      'data_file=d.data,preallocation=full,cluster_size=4k',
      'data_file=d.data,data_file_raw=on,preallocation=falloc',
    ]) {
      for (const who of ['theirs', 'ours']) {
        mkdirSync(at(who), { recursive: true });
        removeFiles(`${who}/i.qcow2`, `${who}/d.data`);
      }
      const args = ['create', '-f', 'qcow2', '-o', options, 'i.qcow2', '3M'];
      const expected = runStatus('qemu-img', args, { cwd: at('theirs') });
      const actual = qcow2(args, { cwd: at('ours') });
      expect(actual.status, actual.stderr).toBe(expected.status);
      expect(actual.stdout).toBe(expected.stdout);
      expect(readFileSync(at('ours/i.qcow2')).equals(readFileSync(at('theirs/i.qcow2'))), options).toBe(true);
      expect(statSync(at('ours/d.data')).size).toBe(statSync(at('theirs/d.data')).size);
      const map = (who: string) =>
        runStatus('qemu-img', ['map', '--output=json', 'i.qcow2'], { cwd: at(who) }).stdout;
      expect(map('ours')).toBe(map('theirs'));
    }
  });

  test.each([
    ['grow', ['resize', 'FILE', '+5M']],
    ['shrink', ['resize', '--shrink', 'FILE', '1536k']],
    ['grow with metadata preallocation', ['resize', '--preallocation=metadata', 'FILE', '9M']],
  ])('resize %s truncates the data file as qemu-img does', (_name, args) => {
    for (const raw of ['off', 'on']) {
      for (const who of ['theirs', 'ours']) {
        removeFiles(`r-${who}.qcow2`, `r-${who}.data`);
        qemuCreate(['-o', `data_file=r-${who}.data,data_file_raw=${raw}`, `r-${who}.qcow2`, '4M']);
        qemuIo(`r-${who}.qcow2`, ['write -P 0x42 0 4M']);
      }
      const expected = qemuImg(args.map((arg) => arg.replace('FILE', 'r-theirs.qcow2')));
      const actual = cli(args.map((arg) => arg.replace('FILE', 'r-ours.qcow2')));
      expect(actual.status, actual.stderr).toBe(expected.status);
      expect(actual.stdout).toBe(expected.stdout);
      expectClean('r-ours.qcow2');
      expect(statSync(at('r-ours.data')).size).toBe(statSync(at('r-theirs.data')).size);
      expect(qemuImg(['compare', 'r-theirs.qcow2', 'r-ours.qcow2']).stdout).toBe('Images are identical.\n');
      const map = (file: string) =>
        qemuImg(['map', '--output=json', file]).stdout.replaceAll(/"offset": \d+/g, 'OFFSET');
      expect(map('r-ours.qcow2')).toBe(map('r-theirs.qcow2'));
    }
  });

  test('amend -o data_file=...,data_file_raw=off as qemu-img (and its refusals)', () => {
    for (const who of ['theirs', 'ours']) {
      removeFiles(`a-${who}.qcow2`);
      qemuCreate(['-o', 'data_file=a.data,data_file_raw=on', `a-${who}.qcow2`, '4M']);
    }
    qemuCreate(['a-plain.qcow2', '4M']);
    for (const options of ['data_file_raw=on', 'data_file_raw=off', 'data_file_raw=on', 'data_file=b.data']) {
      const expected = qemuImg(['amend', '-o', options, 'a-theirs.qcow2']);
      const actual = cli(['amend', '-o', options, 'a-ours.qcow2']);
      expect(actual.status, options).toBe(expected.status);
      expect(actual.stderr.replace(/^qcow2:/, 'qemu-img:')).toBe(expected.stderr);
    }
    expect(readFileSync(at('a-ours.qcow2')).equals(readFileSync(at('a-theirs.qcow2')))).toBe(true);
    const refused = cli(['amend', '-o', 'data_file=c.data', 'a-plain.qcow2']);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toBe(
      'qcow2: data-file can only be set for images that use an external data file\n',
    );
  });

  test('amend -o size=... grows the data file with the image, as qemu-img (raw: the grown range mapped)', () => {
    for (const raw of ['on', 'off']) {
      for (const who of ['theirs', 'ours']) {
        removeFiles(`s-${who}.qcow2`, `s-${who}.data`);
        qemuCreate(['-o', `data_file=s-${who}.data,data_file_raw=${raw}`, `s-${who}.qcow2`, '1M']);
        qemuIo(`s-${who}.qcow2`, ['write -P 0x33 0 1M']);
      }
      const expected = qemuImg(['amend', '-o', 'size=3M', 's-theirs.qcow2']);
      const actual = cli(['amend', '-o', 'size=3M', 's-ours.qcow2']);
      expect(actual.status, actual.stderr).toBe(expected.status);
      expectClean('s-ours.qcow2');
      expect(statSync(at('s-ours.data')).size, raw).toBe(statSync(at('s-theirs.data')).size);
      expect(qemuImg(['compare', 's-theirs.qcow2', 's-ours.qcow2']).stdout).toBe('Images are identical.\n');
      const map = (file: string) => qemuImg(['map', '--output=json', file]).stdout;
      expect(map('s-ours.qcow2'), raw).toBe(map('s-theirs.qcow2'));
    }
  });

  test('commit of an overlay with a data file empties it and releases the data file, as qemu-img', () => {
    for (const who of ['theirs', 'ours']) {
      qemuCreate([`o-${who}.base.qcow2`, '4M']);
      qemuIo(`o-${who}.base.qcow2`, ['write -P 1 0 4M']);
      qemuCreate([
        '-o',
        `data_file=o-${who}.data`,
        '-b',
        `o-${who}.base.qcow2`,
        '-F',
        'qcow2',
        `o-${who}.qcow2`,
      ]);
      qemuIo(`o-${who}.qcow2`, ['write -P 2 1M 1M', 'write -z 3M 64k']);
    }
    expect(qemuImg(['commit', 'o-theirs.qcow2']).status).toBe(0);
    const committed = cli(['commit', 'o-ours.qcow2']);
    expect(committed.status, committed.stderr).toBe(0);
    expectClean('o-ours.qcow2');
    expectClean('o-ours.base.qcow2');
    expect(qemuImg(['compare', 'o-theirs.base.qcow2', 'o-ours.base.qcow2']).stdout).toBe(
      'Images are identical.\n',
    );
    expect(qemuImg(['compare', 'o-theirs.qcow2', 'o-ours.qcow2']).stdout).toBe('Images are identical.\n');
    const map = (file: string) => qemuImg(['map', '--output=json', file]).stdout;
    expect(map('o-ours.qcow2')).toBe(map('o-theirs.qcow2'));
    // The written megabyte's storage is released (QEMU's data file keeps at most its first block).
    expect(statSync(at('o-ours.data')).blocks).toBeLessThanOrEqual(statSync(at('o-theirs.data')).blocks + 8);
  });

  test('commit into a base with a data file, snapshots refused, check -r all: as qemu-img', () => {
    for (const who of ['theirs', 'ours']) {
      qemuCreate(['-o', `data_file=c-${who}.data`, `c-${who}.qcow2`, '4M']);
      qemuIo(`c-${who}.qcow2`, ['write -P 1 0 2M']);
      qemuCreate(['-b', `c-${who}.qcow2`, '-F', 'qcow2', `t-${who}.qcow2`]);
      qemuIo(`t-${who}.qcow2`, ['write -P 2 1M 2M', 'write -z 512k 64k']);
    }
    expect(qemuImg(['commit', 't-theirs.qcow2']).status).toBe(0);
    const committed = cli(['commit', 't-ours.qcow2']);
    expect(committed.status, committed.stderr).toBe(0);
    expect(committed.stdout).toBe('Image committed.\n');
    expectClean('c-ours.qcow2');
    expect(qemuImg(['compare', 'c-theirs.qcow2', 'c-ours.qcow2']).stdout).toBe('Images are identical.\n');
    expect(cli(['snapshot', '-c', 's1', 'c-ours.qcow2']).status).toBe(
      qemuImg(['snapshot', '-c', 's1', 'c-theirs.qcow2']).status,
    );
    const checked = cli(['check', '-r', 'all', 'c-ours.qcow2']);
    expect(checked.status).toBe(0);
    expect(checked.stdout).toBe(
      qemuImg(['check', '-r', 'all', 'c-theirs.qcow2']).stdout.replaceAll('theirs', 'ours'),
    );
  });
});
