/**
 * Every image of the read corpus, read by the `qcow2` bin and by QEMU's tools: converted bytes,
 * info, map and check must agree with qemu-img's.
 */
import { closeSync, fstatSync, fsyncSync, mkdirSync, openSync, rmSync, type Stats } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { buildCorpus, CORPUS, type CorpusImage } from '../src/corpus.js';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

function syncedStat(path: string): Stats {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
    return fstatSync(fd);
  } finally {
    closeSync(fd);
  }
}

describe.skipIf(!haveTools)('read corpus against qemu-img', () => {
  let root: { path: string; remove: () => void };
  let corpus: string;
  let out: string;

  beforeAll(() => {
    root = tempDir('qcowkit-corpus-');
    corpus = join(root.path, 'corpus');
    out = join(root.path, 'out');
    mkdirSync(corpus);
    mkdirSync(out);
    buildCorpus(corpus);
  });
  afterAll(() => root?.remove());

  const qemuImg = (args: readonly string[]) => runStatus('qemu-img', args, { cwd: corpus });
  const ours = (args: readonly string[]) => qcow2(args, { cwd: corpus });

  /** Converts with both tools and checks the results are equal and ours is as sparse. */
  function expectSameConversion(image: CorpusImage, extra: readonly string[], label: string): void {
    const oursFile = join(out, `${label}.ours.raw`);
    const qemuFile = join(out, `${label}.qemu.raw`);
    try {
      const mine = ours(['convert', '-f', image.format, ...extra, '-O', 'raw', image.file, oursFile]);
      expect(mine.stderr).toBe('');
      expect(mine.status).toBe(0);
      const theirs = qemuImg(['convert', '-f', image.format, ...extra, '-O', 'raw', image.file, qemuFile]);
      expect(theirs.status, theirs.stderr).toBe(0);
      const compare = runStatus('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', qemuFile, oursFile]);
      expect(compare.status, `${compare.stdout}${compare.stderr}`).toBe(0);
      // Settle delayed allocation first: st_blocks may count reservations until written back.
      const oursStat = syncedStat(oursFile);
      const qemuStat = syncedStat(qemuFile);
      expect(oursStat.size).toBe(qemuStat.size);
      // Holes where the guest reads zeros: never more allocated than qemu-img's own output.
      expect(oursStat.blocks * 512).toBeLessThanOrEqual(qemuStat.blocks * 512);
    } finally {
      rmSync(oursFile, { force: true });
      rmSync(qemuFile, { force: true });
    }
  }

  test('map --start-offset/--max-length (with size suffixes) equals qemu-img map', () => {
    for (const file of ['chain/top.qcow2', 'huge-8t.qcow2']) {
      const args = ['map', '--output=json', '--start-offset=1000000', '--max-length=2M', file];
      const theirs = qemuImg(args);
      const mine = ours(args);
      expect(mine.status, mine.stderr).toBe(theirs.status);
      expect(mine.stdout).toBe(theirs.stdout);
    }
  });

  describe.each(CORPUS)('$file: $about', (image) => {
    test('convert -O raw gives the bytes qemu-img convert gives, as sparse', () => {
      expectSameConversion(image, [], image.file.replaceAll('/', '_'));
      if (image.snapshot !== undefined) {
        expectSameConversion(image, ['-l', `snapshot.name=${image.snapshot}`], `${image.file}.snap`);
      }
    });

    test('info --output=json equals qemu-img info, field for field and byte for byte', () => {
      const args = ['info', '-f', image.format, '--output=json', image.file];
      const theirs = qemuImg(args);
      const mine = ours(args);
      expect(mine.stderr).toBe('');
      expect(mine.status).toBe(theirs.status);
      // actual-size is the same file's st_blocks on both sides, so it is compared too.
      expect(JSON.parse(mine.stdout)).toEqual(JSON.parse(theirs.stdout));
      expect(mine.stdout).toBe(theirs.stdout);
    });

    test('info (human), and --backing-chain for backed images, read like qemu-img info', () => {
      const variants = [['info', '-f', image.format, image.file]];
      if (image.backed === true) {
        variants.push(
          ['info', '--backing-chain', '--output=json', image.file],
          ['info', '--backing-chain', image.file],
        );
      }
      for (const args of variants) {
        const theirs = qemuImg(args);
        const mine = ours(args);
        expect(mine.status, mine.stderr).toBe(theirs.status);
        expect(mine.stdout).toBe(theirs.stdout);
      }
    });

    test('map --output=json equals qemu-img map', () => {
      const args = ['map', '-f', image.format, '--output=json', image.file];
      const theirs = qemuImg(args);
      const mine = ours(args);
      expect(mine.stderr).toBe('');
      expect(mine.status).toBe(theirs.status);
      expect(mine.stdout).toBe(theirs.stdout);
      expect(JSON.parse(mine.stdout)).toEqual(JSON.parse(theirs.stdout));
    });

    test('map (human) lays out like qemu-img map', () => {
      const args = ['map', '-f', image.format, image.file];
      const theirs = qemuImg(args);
      const mine = ours(args);
      expect(mine.status).toBe(theirs.status);
      expect(mine.stdout).toBe(theirs.stdout);
    });

    test('check: same exit code and JSON as qemu-img check', () => {
      const args = ['check', '-f', image.format, '--output=json', image.file];
      const theirs = qemuImg(args);
      const mine = ours(args);
      expect(mine.status, mine.stderr).toBe(theirs.status);
      if (theirs.status === 63) {
        expect(mine.stderr).toBe(theirs.stderr.replace(/^qemu-img: /, 'qcow2: '));
      } else {
        expect(JSON.parse(mine.stdout)).toEqual(JSON.parse(theirs.stdout));
      }
      const human = ours(['check', '-f', image.format, image.file]);
      const humanTheirs = qemuImg(['check', '-f', image.format, image.file]);
      expect(human.status).toBe(humanTheirs.status);
      expect(human.stdout).toBe(humanTheirs.stdout);
    });
  });
});
