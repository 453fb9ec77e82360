/**
 * The packages as a user installs them: `pnpm pack` of every package, `npm install -g` of the
 * tarballs into a temporary prefix, then the installed `qcow2` and `qcow2-nbd` commands run. The
 * commands are bundles (packages/qcow2-cli/scripts/bundle-bin.mjs): these tests see that their
 * chunks, the compression worker next to them and koffi all load from the installed package.
 * Needs the built packages (`pnpm build`) and npm's registry (or its cache) for third-party
 * dependencies.
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'qemu-io', 'npm', 'pnpm');
const PACKAGES = fileURLToPath(new URL('../../packages/', import.meta.url));

describe.skipIf(!haveTools)('packed tarballs install and run', () => {
  let dir: { path: string; remove: () => void };
  let bin: string;
  beforeAll(() => {
    dir = tempDir('qcowkit-pack-');
    const tarballs = join(dir.path, 'tarballs');
    for (const name of readdirSync(PACKAGES)) {
      run('pnpm', ['pack', '--pack-destination', tarballs], { cwd: join(PACKAGES, name) });
    }
    const files = readdirSync(tarballs).map((file) => join(tarballs, file));
    expect(files.length).toBe(readdirSync(PACKAGES).length);
    const prefix = join(dir.path, 'prefix');
    run('npm', [
      'install',
      '-g',
      '--prefix',
      prefix,
      '--prefer-offline',
      '--no-audit',
      '--no-fund',
      ...files,
    ]);
    bin = join(prefix, 'bin');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'disk.qcow2', '64M'], { cwd: dir.path });
  }, 180_000);
  afterAll(() => dir?.remove());

  test('qcow2 info prints what qemu-img info prints', () => {
    const ours = runStatus(join(bin, 'qcow2'), ['info', '--output=json', 'disk.qcow2'], { cwd: dir.path });
    expect(ours.stderr).toBe('');
    expect(ours.status).toBe(0);
    const theirs = run('qemu-img', ['info', '--output=json', 'disk.qcow2'], { cwd: dir.path });
    expect(ours.stdout).toBe(theirs);
  });

  test('qcow2 --version, qcow2-nbd --version and --help', () => {
    expect(runStatus(join(bin, 'qcow2'), ['--version']).stdout).toMatch(/^\d+\.\d+\.\d+\n$/);
    const version = runStatus(join(bin, 'qcow2-nbd'), ['--version']);
    expect(version.stderr).toBe('');
    expect(version.stdout).toMatch(/\d+\.\d+\.\d+/);
    const help = runStatus(join(bin, 'qcow2-nbd'), ['--help']);
    expect(help.status).toBe(0);
    expect(help.stdout).toContain('Usage: qcow2-nbd');
  });

  test('qcow2 convert -c -O qcow2 (the compression worker) -O raw and map (SEEK_DATA through koffi)', () => {
    run(
      'qemu-io',
      ['-f', 'qcow2', '-c', 'write -P 0x3c 1M 3M', '-c', 'write -P 0x11 40M 64k', 'disk.qcow2'],
      {
        cwd: dir.path,
      },
    );
    const compressed = runStatus(
      join(bin, 'qcow2'),
      ['convert', '-c', '-O', 'qcow2', 'disk.qcow2', 'c.qcow2'],
      {
        cwd: dir.path,
      },
    );
    expect(compressed.stderr).toBe('');
    expect(compressed.status).toBe(0);
    expect(run('qemu-img', ['compare', 'disk.qcow2', 'c.qcow2'], { cwd: dir.path })).toContain('identical');
    // Clean, and the data clusters are compressed ones (qemu-img check counts them).
    expect(run('qemu-img', ['check', 'c.qcow2'], { cwd: dir.path })).toMatch(
      /allocated, [\d.]+% fragmented, 100\.00% compressed clusters/,
    );
    const raw = runStatus(join(bin, 'qcow2'), ['convert', '-O', 'raw', 'c.qcow2', 'c.raw'], {
      cwd: dir.path,
    });
    expect(raw.stderr).toBe('');
    expect(run('qemu-img', ['compare', '-F', 'raw', 'disk.qcow2', 'c.raw'], { cwd: dir.path })).toContain(
      'identical',
    );
    // Our map of the raw file finds its holes only with lseek(SEEK_DATA), which comes from koffi.
    const map = runStatus(join(bin, 'qcow2'), ['map', '--output=json', '-f', 'raw', 'c.raw'], {
      cwd: dir.path,
    });
    expect(map.stdout).toContain('"data": false');
    expect(map.stdout).toBe(
      run('qemu-img', ['map', '--output=json', '-f', 'raw', 'c.raw'], { cwd: dir.path }),
    );
  });
});
