/**
 * `qcow2 commit [-f FMT] [-d] [-p] [-q] FILE`: writes what the image holds itself into its backing
 * file, then (unless `-d`) empties the image, as qemu-img commit does; prints `Image committed.`.
 */
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { commitToBacking, emptyImage } from '@qcowkit/qcow2-core';
import { type ImageFormat, openImage } from '../engine.js';
import { CliError, describeError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { ProgressReporter } from '../output/progress.js';
import { resolveAgainst } from '../paths.js';
import { openWritable } from './writable-image.js';

export interface CommitCommandOptions {
  readonly format?: ImageFormat | undefined;
  /** `-d`: keep the image's data after committing it. */
  readonly keep: boolean;
  readonly progress: boolean;
  readonly quiet: boolean;
}

export async function commitCommand(
  context: CommandContext,
  file: string,
  options: CommitCommandOptions,
): Promise<number> {
  const path = resolveAgainst(context.io.cwd, file);
  // The guest view over the whole chain, read-only; its first backing layer is the target.
  const overlay = await openImage(path, { displayName: file, format: options.format, forceShare: true });
  const progress = options.progress && !options.quiet ? new ProgressReporter(context.io.stderr) : undefined;
  try {
    const backingLayer = overlay.chain[1];
    if (backingLayer === undefined) throw new CliError('Image does not have a backing file');
    progress?.update(0, 1);
    const backing = await openWritable(backingLayer.path, backingLayer.filename, {
      format: backingLayer.format,
    });
    try {
      await commitToBacking({ overlay: overlay.device, backing: backing.device });
    } catch (error) {
      throw new CliError(`Block job failed: ${describeError(error)}`, { cause: error });
    } finally {
      await backing.close();
    }
  } finally {
    await overlay.close();
  }
  if (!options.keep && overlay.format === 'qcow2') {
    const overlayFile = await FileBlockDevice.open(path, { readOnly: false });
    try {
      await emptyImage(overlayFile);
    } finally {
      await overlayFile.close();
    }
  }
  progress?.finish();
  if (!options.quiet) context.io.stdout.write('Image committed.\n');
  return 0;
}
