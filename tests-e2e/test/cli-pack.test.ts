/**
 * The packages as a user installs them: `pnpm pack` of every package, `npm install -g` of the
 * tarballs into a temporary prefix, then the installed `qcow2` and `qcow2-nbd` commands run.
 * Needs the built packages (`pnpm build`) and npm's registry (or its cache) for third-party
 * dependencies.
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { requireTools, run, runStatus, tempDir } from '../src/tools.js';

const haveTools = requireTools('qemu-img', 'npm', 'pnpm');
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

  test('qcow2 --version and qcow2-nbd --help', () => {
    expect(runStatus(join(bin, 'qcow2'), ['--version']).stdout).toMatch(/^\d+\.\d+\.\d+\n$/);
    const help = runStatus(join(bin, 'qcow2-nbd'), ['--help']);
    expect(help.status).toBe(0);
    expect(help.stdout).toContain('Usage: qcow2-nbd');
  });
});
