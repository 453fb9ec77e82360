/** `qcow2 check` (read-only): qemu-img check's verdict, layout and exit codes. */

import type { CheckResult, ImageFormat } from '../engine.js';
import { openImage } from '../engine.js';
import { CliError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { checkToJson, formatCheckHuman } from '../output/check.js';
import { toQemuJson } from '../output/qemu-json.js';
import { resolveAgainst } from '../paths.js';

export interface CheckCommandOptions {
  readonly format?: ImageFormat | undefined;
  readonly output: 'human' | 'json';
  readonly forceShare: boolean;
  /** `-q`: no report on stdout (findings and errors still go to stderr). */
  readonly quiet?: boolean;
}

/** qemu-img check's exit code when the format cannot be checked at all (raw). */
export const EXIT_CHECK_UNSUPPORTED = 63;

export async function checkCommand(
  context: CommandContext,
  file: string,
  options: CheckCommandOptions,
): Promise<number> {
  const opened = await openImage(resolveAgainst(context.io.cwd, file), {
    displayName: file,
    format: options.format,
    forceShare: options.forceShare,
    openBacking: false,
  });
  let result: CheckResult;
  try {
    const image = opened.image;
    if (image === undefined || typeof image.check !== 'function') {
      throw new CliError('This image format does not support checks', {
        exitCode: EXIT_CHECK_UNSUPPORTED,
        code: 'EUNSUPPORTED',
      });
    }
    try {
      result = await image.check();
    } catch (error) {
      throw new CliError(`Check failed: ${error instanceof Error ? error.message : String(error)}`, {
        cause: error,
      });
    }
  } finally {
    await opened.close();
  }
  for (const message of result.messages) context.io.stderr.write(`${message}\n`);
  if (options.quiet !== true) {
    context.io.stdout.write(
      options.output === 'json'
        ? `${toQemuJson(checkToJson(result, file, opened.format))}\n`
        : formatCheckHuman(result),
    );
  }
  return checkExitCode(result);
}

/** 1 when the check itself failed, 2 for corruptions, 3 for leaks only, 0 when clean. */
export function checkExitCode(result: CheckResult): number {
  if (result.checkErrors > 0) return 1;
  if (result.corruptions > 0) return 2;
  if (result.leaks > 0) return 3;
  return 0;
}
