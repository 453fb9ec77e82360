/** Runs the built `qcow2` bin as a child process, as a user would. */
import { fileURLToPath } from 'node:url';
import { runStatus } from './tools.js';

/** The built bin: `pnpm build` must have run. */
export const QCOW2_BIN = fileURLToPath(
  new URL('../../packages/qcow2-cli/dist/bin/qcow2.js', import.meta.url),
);

export function qcow2(
  args: readonly string[],
  options?: { cwd?: string; env?: NodeJS.ProcessEnv },
): { status: number; stdout: string; stderr: string } {
  return runStatus(process.execPath, [QCOW2_BIN, ...args], options);
}
