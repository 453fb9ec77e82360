/**
 * `qcow2 convert -t CACHE` / `-T SRC_CACHE` against qemu-img convert: every cache mode qemu-img
 * takes converts to the same image (raw and qcow2, new and `-n`), and a bad mode fails with
 * qemu-img's words. When the target is flushed is counted in the unit tests
 * (packages/qcow2-cli/test/convert-cache.test.ts).
 */
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { qcow2 } from '../src/qcow2-cli.js';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io');

const MODES = ['unsafe', 'writeback', 'none', 'off', 'writethrough', 'directsync'];

describe.skipIf(!haveTools)('qcow2 convert -t / -T', () => {
  let dir: { path: string; remove: () => void };
  const at = (name: string) => join(dir.path, name);
  beforeAll(() => {
    dir = tempDir('qcowkit-convert-cache-');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', at('src.qcow2'), '8M']);
    run('qemu-io', [
      '-f',
      'qcow2',
      ...['write -P 0x11 0 1M', 'write -P 0x22 3M 64k', 'write -z 5M 1M', 'write -P 0x33 7M 4k'].flatMap(
        (command) => ['-c', command],
      ),
      at('src.qcow2'),
    ]);
    // -n targets: an image of each format holding other data, for every run to write into.
    run('qemu-img', ['create', '-q', '-f', 'raw', at('base.raw'), '8M']);
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 8M', at('base.raw')]);
    run('qemu-img', ['convert', '-O', 'qcow2', at('base.raw'), at('base.qcow2')]);
  });
  afterAll(() => dir?.remove());

  const identical = (format: string, a: string, b: string) =>
    runStatus('qemu-img', ['compare', '-f', format, '-F', format, at(a), at(b)]);

  describe.each(['raw', 'qcow2'])('-O %s', (format) => {
    test.each(MODES)('-t %s: the image qemu-img makes with it', (mode) => {
      const theirs = runStatus('qemu-img', [
        'convert',
        ...['-t', mode, '-T', mode, '-O', format],
        at('src.qcow2'),
        at(`qemu-${mode}.${format}`),
      ]);
      expect(theirs.status, theirs.stderr).toBe(0);
      const ours = qcow2(
        ['convert', '-t', mode, '-T', mode, '-O', format, 'src.qcow2', `ours-${mode}.${format}`],
        {
          cwd: dir.path,
        },
      );
      expect(ours.status, ours.stderr).toBe(0);
      expect(ours.stderr).toBe('');
      const compared = identical(format, `qemu-${mode}.${format}`, `ours-${mode}.${format}`);
      expect(compared.status, compared.stdout + compared.stderr).toBe(0);
      if (format === 'qcow2') {
        const check = runStatus('qemu-img', ['check', at(`ours-${mode}.${format}`)]);
        expect(check.status, check.stdout).toBe(0);
      }
    });

    test.each(['unsafe', 'writeback', 'writethrough'])(
      '-n -t %s: written into the existing image as qemu-img writes',
      (mode) => {
        for (const who of ['qemu', 'ours'])
          copyFileSync(at(`base.${format}`), at(`${who}-n-${mode}.${format}`));
        const theirs = runStatus('qemu-img', [
          'convert',
          ...['-n', '-t', mode, '-O', format],
          at('src.qcow2'),
          at(`qemu-n-${mode}.${format}`),
        ]);
        expect(theirs.status, theirs.stderr).toBe(0);
        const ours = qcow2(
          ['convert', '-n', '-t', mode, '-O', format, 'src.qcow2', `ours-n-${mode}.${format}`],
          {
            cwd: dir.path,
          },
        );
        expect(ours.status, ours.stderr).toBe(0);
        const compared = identical(format, `qemu-n-${mode}.${format}`, `ours-n-${mode}.${format}`);
        expect(compared.status, compared.stdout + compared.stderr).toBe(0);
        if (format === 'qcow2') {
          const check = runStatus('qemu-img', ['check', at(`ours-n-${mode}.${format}`)]);
          expect(check.status, check.stdout).toBe(0);
        }
      },
    );
  });

  test.each([
    [['-t', 'bogus'], 'Invalid cache option: bogus'],
    [['-T', 'bogus'], 'Invalid source cache option: bogus'],
    [['-t', 'None'], 'Invalid cache option: None'],
  ])('%j fails with qemu-img words', (flags, words) => {
    for (const format of ['raw', 'qcow2']) {
      const args = ['convert', ...flags, '-O', format, 'src.qcow2', `bad.${format}`];
      const theirs = runStatus('qemu-img', args, { cwd: dir.path });
      const ours = qcow2(args, { cwd: dir.path });
      expect(theirs.status).toBe(1);
      expect(theirs.stderr).toBe(`qemu-img: ${words}\n`);
      expect(ours.status).toBe(1);
      expect(ours.stderr).toBe(`qcow2: ${words}\n`);
    }
  });
});
