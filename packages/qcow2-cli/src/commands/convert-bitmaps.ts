/**
 * `qcow2 convert --bitmaps [--skip-broken-bitmaps]`: the source's persistent dirty bitmaps (name,
 * granularity, enabled flag and bits) copied into the qcow2 target, as qemu-img convert --bitmaps
 * copies them, with its checks, messages and exit codes:
 *
 * - before anything is created: the source must be a qcow2 v3 image ("Source lacks bitmap
 *   support"), and without --skip-broken-bitmaps no bitmap of it may be inconsistent (in use);
 * - the target must be able to hold bitmaps (qcow2 v3: "Format driver 'F' does not support
 *   bitmaps"); qemu-img finds that out after creating the target, we refuse before;
 * - once the data is written, the bitmaps are added to the target through qcow2-core, each with its
 *   bits merged in one bitmap cluster at a time (memory: the clusters with set bits); a name the
 *   target has already fails that bitmap and stops ("Failed to create bitmap N: ..."), the ones
 *   qemu-img would have copied before it are kept.
 *
 * QEMU walks the bitmaps newest first (its list is in reverse directory order): the first one it
 * complains about, and the order of its warnings, follow that order; the target's directory lists
 * the copies in the source's order, after the target's own bitmaps.
 */
import { Qcow2Image } from '@qcowkit/qcow2-core';
import { CliError, describeError } from '../errors.js';
import type { CommandContext } from '../io.js';
import type { ConvertOptions } from './convert.js';

export interface BitmapCopyOptions {
  /** `--bitmaps`. */
  readonly bitmaps?: boolean;
  /** `--skip-broken-bitmaps`: inconsistent bitmaps are skipped with a warning. */
  readonly skipBrokenBitmaps?: boolean;
}

/** The source image whose bitmaps are copied: its top layer, when it is qcow2 v3. */
export function bitmapSource(image: unknown): Qcow2Image {
  if (!(image instanceof Qcow2Image) || image.version < 3) {
    throw new CliError('Source lacks bitmap support', { code: 'EUNSUPPORTED' });
  }
  return image;
}

/** Refuses an inconsistent bitmap of `source` (unless skipped), as qemu-img does before creating
 * the target. */
export function checkSourceBitmaps(source: Qcow2Image, options: BitmapCopyOptions): void {
  if (options.skipBrokenBitmaps === true) return;
  const broken = [...source.bitmapDirectory].reverse().find((entry) => entry.inUse);
  if (broken !== undefined) {
    throw new CliError(
      `Cannot copy inconsistent bitmap '${broken.name}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it`,
      { code: 'EINVAL' },
    );
  }
}

/** qemu-img's refusal of a target format that cannot hold bitmaps. */
export function noBitmapSupport(format: string): CliError {
  return new CliError(`Format driver '${format}' does not support bitmaps`, { code: 'EUNSUPPORTED' });
}

/**
 * Adds `source`'s bitmaps to `target` (open for writing, its data written) with their bits; they
 * are stored when `target` closes. Throws qemu-img's error for the first bitmap that cannot be
 * copied, after adding the ones qemu-img would have copied before it.
 */
export async function copyBitmaps(
  context: CommandContext,
  source: Qcow2Image,
  target: Qcow2Image,
  options: BitmapCopyOptions,
): Promise<void> {
  const taken = new Set(target.bitmapDirectory.map((entry) => entry.name));
  const copy = new Set<string>();
  let failure: CliError | undefined;
  // QEMU's order (newest first): warnings, and which bitmap fails first.
  for (const entry of [...source.bitmapDirectory].reverse()) {
    if (entry.inUse) {
      if (options.skipBrokenBitmaps === true) {
        context.io.stderr.write(`qcow2: warning: Skipping inconsistent bitmap '${entry.name}'\n`);
        continue;
      }
      failure = new CliError(`Cannot copy inconsistent bitmap '${entry.name}'`, { code: 'EINVAL' });
      break;
    }
    if (taken.has(entry.name)) {
      failure = new CliError(`Failed to create bitmap ${entry.name}: Bitmap already exists: ${entry.name}`, {
        code: 'EINVAL',
      });
      break;
    }
    if (source.size !== target.size) {
      failure = new CliError(
        `Failed to populate bitmap ${entry.name}: Bitmaps are of different sizes (destination size is ${target.size}, source size is ${source.size}) and can't be merged`,
        { code: 'EINVAL' },
      );
      break;
    }
    copy.add(entry.name);
  }
  if (copy.size > 0) {
    const bitmaps = await target.persistentBitmaps();
    // In the source's order, so the target's directory lists them as qemu-img's does.
    for (const entry of source.bitmapDirectory) {
      if (!copy.has(entry.name)) continue;
      try {
        bitmaps.add(entry.name, { granularity: entry.granularity, disabled: !entry.auto });
      } catch (error) {
        throw new CliError(`Failed to create bitmap ${entry.name}: ${describeError(error)}`, {
          cause: error,
        });
      }
      try {
        await bitmaps.mergeStored(entry.name, source, entry.name);
      } catch (error) {
        bitmaps.remove(entry.name);
        throw new CliError(`Failed to populate bitmap ${entry.name}: ${describeError(error)}`, {
          cause: error,
        });
      }
    }
  }
  if (failure !== undefined) throw failure;
}

/**
 * `--bitmaps` with a target format that cannot hold bitmaps (`-O raw`): the source's checks first,
 * then qemu-img's refusal, before anything is created.
 */
export async function refuseBitmapsTo(
  context: CommandContext,
  source: string,
  format: string,
  options: ConvertOptions & BitmapCopyOptions,
): Promise<never> {
  const { openAtSnapshot } = await import('./snapshot-select.js');
  const opened = await openAtSnapshot(context.io.cwd, source, options);
  try {
    checkSourceBitmaps(bitmapSource(opened.image), options);
  } finally {
    await opened.close();
  }
  throw noBitmapSupport(format);
}
