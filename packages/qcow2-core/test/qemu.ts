/**
 * QEMU tools for the qcow2-core tests (images are made at test time). The tool check and temporary
 * directories come from tests-e2e/src/tools.ts; `run` here takes a cwd and names the command in
 * its error.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { afterAll, beforeAll } from 'vitest';
import { tempDir as sharedTempDir } from '../../../tests-e2e/src/tools.js';

/** The e2e tool check, shared: in CI a missing tool throws, locally it warns and returns false. */
export { requireTools } from '../../../tests-e2e/src/tools.js';

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

/** A fresh temporary directory (prefix `qcowkit-core-`) and a function that removes it. */
export function tempDir(prefix = 'qcowkit-core-'): { path: string; remove: () => void } {
  return sharedTempDir(prefix);
}

/**
 * A temporary directory for the enclosing `describe` block: made before its first test, removed
 * after its last. Its `path` is there only while the block's tests run.
 */
export function suiteTempDir(prefix?: string): { readonly path: string } {
  let dir: { path: string; remove: () => void } | undefined;
  beforeAll(() => {
    dir = tempDir(prefix);
  });
  afterAll(() => dir?.remove());
  return {
    get path() {
      if (dir === undefined) throw new Error('suiteTempDir: used outside its describe block');
      return dir.path;
    },
  };
}

/** qemu-io whose exit status is ignored (e.g. ending with `abort` to leave an image dirty). */
export function qemuIoUnchecked(cwd: string, image: string, commands: readonly string[]): void {
  spawnSync('qemu-io', [...commands.flatMap((command) => ['-c', command]), image], { cwd, stdio: 'ignore' });
}
