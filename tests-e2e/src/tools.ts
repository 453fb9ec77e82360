/**
 * Which external tools the end-to-end tests can use. In CI (CI=true) a missing tool is a failure;
 * locally the tests that need it are skipped with a visible message.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const found = new Map<string, boolean>();

export function hasTool(name: string): boolean {
  let ok = found.get(name);
  if (ok === undefined) {
    ok = spawnSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' }).status === 0;
    found.set(name, ok);
  }
  return ok;
}

/**
 * True when every tool is there. In CI a missing tool throws (so the run fails loudly); outside CI
 * it prints which tool is missing and returns false so the caller can `describe.skipIf(!...)`.
 */
export function requireTools(...names: string[]): boolean {
  const missing = names.filter((name) => !hasTool(name));
  if (missing.length === 0) return true;
  const message = `end-to-end tests need ${missing.join(', ')}: install qemu-utils libnbd-bin fio fuse3 (scripts/setup.sh does)`;
  if (process.env.CI) throw new Error(message);
  console.warn(`SKIPPED: ${message}`);
  return false;
}

/** Runs a command, returning stdout; throws with stderr on a non-zero exit. */
export function run(
  command: string,
  args: readonly string[],
  options?: { cwd?: string; input?: Buffer },
): string {
  return execFileSync(command, args, {
    cwd: options?.cwd,
    input: options?.input,
    encoding: 'utf8',
    stdio: ['pipe', 'pipe', 'pipe'],
    maxBuffer: 256 * 1024 * 1024,
  });
}

/** Runs a command and returns its exit status, stdout and stderr without throwing. */
export function runStatus(
  command: string,
  args: readonly string[],
  options?: { cwd?: string; env?: NodeJS.ProcessEnv },
): { status: number; stdout: string; stderr: string } {
  const result = spawnSync(command, args, {
    cwd: options?.cwd,
    env: options?.env ?? process.env,
    encoding: 'utf8',
    maxBuffer: 256 * 1024 * 1024,
  });
  return { status: result.status ?? -1, stdout: result.stdout, stderr: result.stderr };
}

/** A fresh temporary directory and a function that removes it. */
export function tempDir(prefix = 'qcowkit-e2e-'): { path: string; remove: () => void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

/** What `qemu-img check --output=json` says of an image: its exit status and counts (0 where the
 * report leaves a count out, or where qemu-img could not check and printed no report). */
export interface QemuCheckVerdict {
  readonly status: number;
  readonly corruptions: number;
  readonly leaks: number;
  readonly checkErrors: number;
}

export function qemuCheckVerdict(file: string, options?: { cwd?: string }): QemuCheckVerdict {
  const result = runStatus('qemu-img', ['check', '--output=json', file], options);
  const json = (result.stdout.trim() === '' ? {} : JSON.parse(result.stdout)) as Record<
    string,
    number | undefined
  >;
  return {
    status: result.status,
    corruptions: json.corruptions ?? 0,
    leaks: json.leaks ?? 0,
    checkErrors: json['check-errors'] ?? 0,
  };
}
