/** `qcow2 check` (read-only): qemu-img check's verdict, layout and exit codes. */

import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { checkQcow2Image } from '@qcowkit/qcow2-core';
import type { CheckResult, ImageFormat } from '../engine.js';
import { detectFormat, openImage } from '../engine.js';
import { CliError, describeImageError, openError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { checkToJson, formatCheckHuman } from '../output/check.js';
import { type ProgressReporter, progressReporter } from '../output/progress.js';
import { toQemuJson } from '../output/qemu-json.js';
import { resolveAgainst } from '../paths.js';

export interface CheckCommandOptions {
  readonly format?: ImageFormat | undefined;
  readonly output: 'human' | 'json';
  readonly forceShare: boolean;
  /** `-q`: no report on stdout (findings and errors still go to stderr). */
  readonly quiet?: boolean;
  /** `-r leaks|all`: repair (opens the image file for writing). */
  readonly repair?: 'leaks' | 'all' | undefined;
  /** `-p`: a progress bar on stderr. */
  readonly progress?: boolean;
}

/** qemu-img check's exit code when the format cannot be checked at all (raw). */
export const EXIT_CHECK_UNSUPPORTED = 63;

export async function checkCommand(
  context: CommandContext,
  file: string,
  options: CheckCommandOptions,
): Promise<number> {
  if (options.repair !== undefined) return repairCommand(context, file, options, options.repair);
  const path = resolveAgainst(context.io.cwd, file);
  const opened = await openImage(path, {
    displayName: file,
    format: options.format,
    forceShare: options.forceShare,
    openBacking: false,
    // The check reads every L2 table and refcount block, one small read each where they lie apart
    // (converted images interleave them with data): on tmpfs/ramfs inline, without the thread
    // pool's hand-off per read (a 1 GiB image with 4 KiB clusters: 644 reads); elsewhere a few
    // in flight through the pool, ahead of the check.
    syncIoMaxBytes: 'memory-backed',
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
      const progress = progressFor(context, options);
      result = await image.check(
        progress === undefined ? {} : { onProgress: (d, t) => progress.update(d, t) },
      );
      progress?.finish();
    } catch (error) {
      throw new CliError(`Check failed: ${describeImageError(error, file)}`, { cause: error });
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

function progressFor(context: CommandContext, options: CheckCommandOptions): ProgressReporter | undefined {
  return progressReporter(context.io, options.progress === true && options.quiet !== true);
}

/** `check -r`: repairs in place, then reports the state after the repair as qemu-img does. */
async function repairCommand(
  context: CommandContext,
  file: string,
  options: CheckCommandOptions,
  repair: 'leaks' | 'all',
): Promise<number> {
  const path = resolveAgainst(context.io.cwd, file);
  let device: FileBlockDevice;
  try {
    device = await FileBlockDevice.open(path, {
      readOnly: false,
      syncIoMaxBytes: 'memory-backed',
    });
  } catch (error) {
    throw openError(file, error, path);
  }
  let result: CheckResult;
  let format: string;
  try {
    format = options.format ?? detectFormat(await device.read(0, Math.min(device.size, 512)));
    if (format !== 'qcow2') {
      throw new CliError('This image format does not support checks', {
        exitCode: EXIT_CHECK_UNSUPPORTED,
        code: 'EUNSUPPORTED',
      });
    }
    const progress = progressFor(context, options);
    try {
      result = await checkQcow2Image(
        { file: device },
        {
          repair,
          ...(progress === undefined ? {} : { onProgress: (d: number, t: number) => progress.update(d, t) }),
        },
      );
    } catch (error) {
      throw new CliError(`Check failed: ${describeImageError(error, file)}`, { cause: error });
    }
    progress?.finish();
  } finally {
    await device.close();
  }
  for (const message of result.messages) context.io.stderr.write(`${message}\n`);
  if (options.quiet !== true) {
    if (options.output === 'json') {
      context.io.stdout.write(`${toQemuJson(checkToJson(result, file, format))}\n`);
    } else {
      if (result.leaksFixed > 0 || result.corruptionsFixed > 0) {
        context.io.stdout.write(
          `The following inconsistencies were found and repaired:\n\n    ${result.leaksFixed} leaked clusters\n    ${result.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`,
        );
      }
      context.io.stdout.write(formatCheckHuman(result));
    }
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
