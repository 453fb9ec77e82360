/**
 * `qcow2 commit [-f FMT] [-b BASE] [-d] [-p] [-q] [-r RATE] [-t CACHE] FILE`: writes what the
 * image holds itself into its backing file, then (unless `-d`) empties the image, as qemu-img
 * commit does; prints `Image committed.`.
 *
 * `-b BASE` commits into a deeper image of the chain: everything the layers above BASE hold goes
 * into BASE, and (as in qemu-img, where `-b` implies `-d`) no image is emptied. BASE is found as
 * qemu-img finds it: the name as a layer above stored it, or the same file once resolved against
 * the folder of the image above it.
 */
import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { commitToBacking, emptyImage } from '@qcowkit/qcow2-core';
import { type ChainLayer, type ImageFormat, openImage } from '../engine.js';
import { CliError, describeError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { progressReporter } from '../output/progress.js';
import { pathCombine, resolveAgainst } from '../paths.js';
import { openWritable } from './writable-image.js';

export interface CommitCommandOptions {
  readonly format?: ImageFormat | undefined;
  /** `-b`: the image of the chain to commit into (default: the backing file). */
  readonly base?: string | undefined;
  /** `-d`: keep the data in the image after committing it. */
  readonly keep: boolean;
  readonly progress: boolean;
  readonly quiet: boolean;
  /** `-r`: bytes a second at most (0 or absent: unlimited). */
  readonly rateLimit?: number | undefined;
}

async function samePath(a: string, b: string): Promise<boolean> {
  const [left, right] = await Promise.all([realpath(a).catch(() => a), realpath(b).catch(() => b)]);
  return left === right;
}

/** The depth of `name` in `chain` (1 the backing file, ...), as qemu-img's `-b` finds it. */
export async function findBaseDepth(chain: readonly ChainLayer[], name: string): Promise<number | undefined> {
  for (let depth = 1; depth < chain.length; depth++) {
    const layer = chain[depth]!;
    const above = chain[depth - 1]!;
    if (layer.filename === name) return depth;
    if (await samePath(pathCombine(above.path, name), layer.path)) return depth;
  }
  return undefined;
}

export async function commitCommand(
  context: CommandContext,
  file: string,
  options: CommitCommandOptions,
): Promise<number> {
  const path = resolveAgainst(context.io.cwd, file);
  // The guest view over the whole chain, read-only; the base layer of it is the target.
  // Its small reads (L2 slices) inline on a memory-backed file, as the base's (see writable-image.ts).
  const overlay = await openImage(path, {
    displayName: file,
    format: options.format,
    forceShare: true,
    syncIoMaxBytes: 'memory-backed',
  });
  const progress = progressReporter(context.io, options.progress && !options.quiet);
  try {
    if (overlay.chain.length < 2) throw new CliError('Image does not have a backing file');
    let baseDepth = 1;
    if (options.base !== undefined) {
      const found = await findBaseDepth(overlay.chain, options.base);
      if (found === undefined) {
        throw new CliError(`Did not find '${options.base}' in the backing chain of '${file}'`);
      }
      baseDepth = found;
    }
    const baseLayer = overlay.chain[baseDepth]!;
    progress?.update(0, 1);
    const base = await openWritable(baseLayer.path, baseLayer.filename, { format: baseLayer.format });
    try {
      await commitToBacking({
        overlay: overlay.device,
        backing: base.device,
        baseDepth,
        ...(options.rateLimit === undefined ? {} : { rateLimit: options.rateLimit }),
        onProgress: progress === undefined ? undefined : (done, total) => progress.update(done, total),
      });
    } catch (error) {
      throw new CliError(`Block job failed: ${describeError(error)}`, { cause: error });
    } finally {
      await base.close();
    }
  } finally {
    await overlay.close();
  }
  // qemu-img: -b implies -d (the images between the top and the base stay as they are).
  if (!options.keep && options.base === undefined && overlay.format === 'qcow2') {
    const overlayFile = await FileBlockDevice.open(path, {
      readOnly: false,
      syncIoMaxBytes: 'memory-backed',
    });
    try {
      await emptyImage(overlayFile);
    } finally {
      await overlayFile.close();
    }
    // The emptied image's external data file holds nothing it reads: its storage is released, as
    // QEMU discards it (a raw data file cannot sit over a backing file).
    const dataFileName = overlay.image?.dataFileName;
    if (dataFileName !== undefined && overlay.image?.dataFileRaw !== true) {
      const dataFile = await FileBlockDevice.open(resolve(dataFileName), { readOnly: false });
      try {
        if (dataFile.capabilities.discard) await dataFile.discard(0, dataFile.size);
      } finally {
        await dataFile.close();
      }
    }
  }
  progress?.finish();
  if (!options.quiet) context.io.stdout.write('Image committed.\n');
  return 0;
}
