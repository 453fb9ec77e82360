/**
 * `qcow2 rebase [-f FMT] [-F FMT] [-u] [-p] [-q] -b BACKING FILE`: qemu-img rebase. Safe mode
 * copies into the image every range where the old and new backing files differ and the image
 * holds nothing itself, then rewrites the backing file name; `-u` only rewrites the name.
 * `-b ''` removes the backing file (the image then holds everything it showed).
 */
import type { BlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { copyBackingDifferences, setBackingFile } from '@qcowkit/qcow2-core';
import { type ImageFormat, type OpenedImage, openImage } from '../engine.js';
import { CliError, describeError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { progressReporter } from '../output/progress.js';
import { pathCombine, resolveAgainst } from '../paths.js';
import { probeImageFormat } from './image-file.js';
import { openWritable } from './writable-image.js';

export interface RebaseCommandOptions {
  readonly format?: ImageFormat | undefined;
  readonly backingFile: string;
  readonly backingFormat?: ImageFormat | undefined;
  readonly unsafe: boolean;
  readonly progress: boolean;
  readonly quiet: boolean;
}

export async function rebaseCommand(
  context: CommandContext,
  file: string,
  options: RebaseCommandOptions,
): Promise<number> {
  const path = resolveAgainst(context.io.cwd, file);
  const newName = options.backingFile === '' ? undefined : options.backingFile;
  // As qemu-img: the new backing file's format is recorded, never left to probing later. Refused
  // before anything is read or written.
  if (newName !== undefined && options.backingFormat === undefined) {
    throw new CliError(
      `Could not change the backing file to '${newName}': backing format must be specified`,
      {
        code: 'EINVAL',
      },
    );
  }
  const format = await probeImageFormat(path, file, options.format);
  if (format !== 'qcow2')
    throw new CliError(
      `Could not change the backing file to '${options.backingFile}': Operation not supported`,
      { code: 'EUNSUPPORTED' },
    );
  if (!options.unsafe) {
    const current = await openImage(path, { displayName: file, format, forceShare: true });
    let newBacking: OpenedImage | undefined;
    try {
      if (newName !== undefined) {
        newBacking = await openImage(pathCombine(path, newName), {
          displayName: newName,
          format: options.backingFormat,
          forceShare: true,
        }).catch((error: unknown) => {
          throw new CliError(`Could not open new backing file '${newName}': ${describeError(error)}`, {
            cause: error,
          });
        });
      }
      const oldBacking: BlockDevice | undefined = current.chain[1]?.device;
      const progress = progressReporter(context.io, options.progress && !options.quiet);
      progress?.update(0, 1);
      // The image over its old backing, writable, sharing the layers already open.
      const overlay = await openWritable(path, file, { format, backing: oldBacking });
      try {
        await copyBackingDifferences({
          overlay: overlay.device,
          oldBacking,
          newBacking: newBacking?.device,
          onProgress: progress === undefined ? undefined : (done, total) => progress.update(done, total),
        });
      } finally {
        await overlay.close();
      }
      progress?.finish();
    } finally {
      await newBacking?.close();
      await current.close();
    }
  }
  const device = await FileBlockDevice.open(path, { readOnly: false });
  try {
    await setBackingFile(device, {
      backingFile: newName,
      ...(newName !== undefined && options.backingFormat !== undefined
        ? { backingFormat: options.backingFormat }
        : {}),
    });
  } catch (error) {
    throw new CliError(
      `Could not change the backing file to '${options.backingFile}': ${describeError(error)}`,
      {
        cause: error,
      },
    );
  } finally {
    await device.close();
  }
  return 0;
}
