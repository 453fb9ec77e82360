/** `qcow2 compare`: qemu-img compare's verdicts, messages and exit codes. */
import { compareDevices } from '../compare/compare-devices.js';
import { IMAGE_FORMATS, type ImageFormat, type OpenedImage, openImage } from '../engine.js';
import { CliError, describeError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { progressReporter } from '../output/progress.js';
import { resolveAgainst } from '../paths.js';

export interface CompareCommandOptions {
  /** `-f` and `-F`, unchecked: an unknown name is an open error (exit 2), as in qemu-img. */
  readonly format?: string | undefined;
  readonly secondFormat?: string | undefined;
  readonly strict: boolean;
  readonly progress: boolean;
  readonly quiet: boolean;
  readonly forceShare: boolean;
}

/** qemu-img compare's exit codes. */
export const COMPARE_IDENTICAL = 0;
export const COMPARE_DIFFERENT = 1;
export const COMPARE_OPEN_FAILED = 2;
export const COMPARE_STATUS_FAILED = 3;
export const COMPARE_READ_FAILED = 4;

async function openSide(
  context: CommandContext,
  file: string,
  format: string | undefined,
  forceShare: boolean,
): Promise<OpenedImage> {
  if (format !== undefined && !(IMAGE_FORMATS as readonly string[]).includes(format)) {
    throw new CliError(`Could not open '${file}': Unknown driver '${format}'`, {
      exitCode: COMPARE_OPEN_FAILED,
      code: 'EINVAL',
    });
  }
  try {
    return await openImage(resolveAgainst(context.io.cwd, file), {
      displayName: file,
      format: format as ImageFormat | undefined,
      forceShare,
    });
  } catch (error) {
    if (error instanceof CliError) {
      throw new CliError(error.message, { exitCode: COMPARE_OPEN_FAILED, cause: error.cause ?? error });
    }
    throw error;
  }
}

export async function compareCommand(
  context: CommandContext,
  firstFile: string,
  secondFile: string,
  options: CompareCommandOptions,
): Promise<number> {
  const say = (line: string) => {
    if (!options.quiet) context.io.stdout.write(`${line}\n`);
  };
  const first = await openSide(context, firstFile, options.format, options.forceShare);
  try {
    const second = await openSide(context, secondFile, options.secondFormat, options.forceShare);
    try {
      const names = [firstFile, secondFile] as const;
      const progress = progressReporter(context.io, options.progress && !options.quiet);
      progress?.update(0, 1);
      const result = await compareDevices(first.device, second.device, {
        strict: options.strict,
        onProgress: progress === undefined ? undefined : (done, total) => progress.update(done, total),
        onStatusError: (side, error) => {
          throw new CliError(`Sector allocation test failed for ${names[side]}`, {
            exitCode: COMPARE_STATUS_FAILED,
            cause: error,
          });
        },
        onReadError: (side, offset, error) => {
          throw new CliError(
            `Error while reading offset ${offset} of ${names[side]}: ${describeError(error)}`,
            {
              exitCode: COMPARE_READ_FAILED,
              cause: error,
            },
          );
        },
      });
      if (progress !== undefined && result.kind === 'identical') progress.finish();
      switch (result.kind) {
        case 'strict-size-mismatch':
          say('Strict mode: Image size mismatch!');
          return COMPARE_DIFFERENT;
        case 'strict-status-mismatch':
          say(`Strict mode: Offset ${result.offset} block status mismatch!`);
          return COMPARE_DIFFERENT;
        case 'content-mismatch':
          // Past the shorter image's end, qemu-img has already warned about the sizes.
          if (result.offset >= Math.min(first.device.size, second.device.size)) {
            say('Warning: Image size mismatch!');
          }
          say(`Content mismatch at offset ${result.offset}!`);
          return COMPARE_DIFFERENT;
        case 'identical':
          if (result.sizeMismatch) say('Warning: Image size mismatch!');
          say('Images are identical.');
          return COMPARE_IDENTICAL;
      }
    } finally {
      await second.close();
    }
  } finally {
    await first.close();
  }
}
