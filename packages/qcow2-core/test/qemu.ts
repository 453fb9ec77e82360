/**
 * QEMU tools for the qcow2-core tests: in CI (CI=true) a missing tool is a failure; locally the
 * tests that need it are skipped with a visible message. Images are made at test time.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const found = new Map<string, boolean>();

function hasTool(name: string): boolean {
  let ok = found.get(name);
  if (ok === undefined) {
    ok = spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
    found.set(name, ok);
  }
  return ok;
}

/** True when every tool is there; in CI a missing tool throws, locally it warns and returns false. */
export function requireTools(...names: string[]): boolean {
  const missing = names.filter((name) => !hasTool(name));
  if (missing.length === 0) return true;
  const message = `qcow2-core tests need ${missing.join(', ')}: install qemu-utils`;
  if (process.env.CI) throw new Error(message);
  console.warn(`SKIPPED: ${message}`);
  return false;
}

/** Runs a command in `cwd`, returning stdout; throws with stderr on failure. */
export function run(command: string, args: readonly string[], cwd?: string): string {
  try {
    return execFileSync(command, args, {
      cwd,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      maxBuffer: 64 << 20,
    });
  } catch (error) {
    const stderr = (error as { stderr?: string }).stderr ?? '';
    throw new Error(`${command} ${args.join(' ')} failed: ${stderr}`);
  }
}

export function qemuImg(cwd: string, ...args: string[]): string {
  return run('qemu-img', args, cwd);
}

/** qemu-io on an image with one -c per command. */
export function qemuIo(
  cwd: string,
  image: string,
  commands: readonly string[],
  extra: readonly string[] = [],
): string {
  return run('qemu-io', [...extra, ...commands.flatMap((command) => ['-c', command]), image], cwd);
}

export function tempDir(prefix = 'qcowkit-core-'): { path: string; remove: () => void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

/** qemu-io whose exit status is ignored (e.g. ending with `abort` to leave an image dirty). */
export function qemuIoUnchecked(cwd: string, image: string, commands: readonly string[]): void {
  spawnSync('qemu-io', [...commands.flatMap((command) => ['-c', command]), image], { cwd, stdio: 'ignore' });
}
