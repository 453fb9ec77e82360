/** `qcow2 amend -o OPTIONS [-f FMT] FILE`: qemu-img amend's options for qcow2 (compat,
 * lazy_refcounts, refcount_bits, data_file, data_file_raw, size) through qcow2-core's
 * `amendImage` / `resizeImage`. */

import { type AmendOptions, amendImage, refuseDamagedImage, resizeImage } from '@qcowkit/qcow2-core';
import type { ImageFormat } from '../engine.js';
import { CliError, describeError, describeImageError, UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { progressReporter } from '../output/progress.js';
import { resolveAgainst } from '../paths.js';
import { parseSize } from '../size.js';
import { parseCreateOptions } from './create.js';
import { probeImageFormat, withImageFileForWrite } from './image-file.js';
import { amendOptionHelp } from './option-help.js';
import { hasDataFile, qcow2Size } from './resize.js';
import { openWritable } from './writable-image.js';

export interface AmendCommandOptions {
  readonly format?: ImageFormat | undefined;
  readonly options: readonly string[];
  /** `-p`: qemu-img's progress line (0% before the change, 100% after it); `-q` silences it. */
  readonly progress?: boolean;
  readonly quiet?: boolean;
}

const AMENDABLE = new Set([
  'compat',
  'lazy_refcounts',
  'refcount_bits',
  'data_file',
  'data_file_raw',
  'size',
]);

/** The `-o` list as amend options; creation-only keys are refused as qemu-img does. */
export function parseAmendOptions(file: string, list: readonly string[]): AmendOptions & { size?: number } {
  if (list.length === 0) throw new UsageError('Must specify options (-o)');
  const values = parseCreateOptions(file, 'qcow2', list, '');
  const out: {
    compat?: '0.10' | '1.1';
    lazyRefcounts?: boolean;
    refcountBits?: number;
    dataFile?: string;
    dataFileRaw?: boolean;
    size?: number;
  } = {};
  for (const [key, value] of values) {
    if (!AMENDABLE.has(key)) {
      throw new UsageError(`Invalid parameter '${key}': this option is only supported for image creation`);
    }
    if (key === 'compat') {
      const compat = value === 'v2' ? '0.10' : value === 'v3' ? '1.1' : value;
      if (compat !== '0.10' && compat !== '1.1')
        throw new UsageError(`Invalid compatibility level: '${value}'`);
      out.compat = compat;
    } else if (key === 'lazy_refcounts' || key === 'data_file_raw') {
      if (value !== 'on' && value !== 'off') throw new UsageError(`Parameter '${key}' expects 'on' or 'off'`);
      if (key === 'lazy_refcounts') out.lazyRefcounts = value === 'on';
      else out.dataFileRaw = value === 'on';
    } else if (key === 'data_file') {
      out.dataFile = value;
    } else if (key === 'refcount_bits') {
      const bits = Number(value);
      if (![1, 2, 4, 8, 16, 32, 64].includes(bits)) {
        throw new UsageError('Refcount width must be a power of two and may not exceed 64 bits');
      }
      out.refcountBits = bits;
    } else {
      out.size = parseSize(value, 'size');
    }
  }
  if (out.compat === '0.10' && (out.refcountBits ?? 16) !== 16 && out.refcountBits !== undefined) {
    throw new UsageError('compat=0.10 requires refcount_bits=16');
  }
  return out;
}

/**
 * `amend -o help`: the options amend changes, for a qcow2 image (`-f qcow2`, or a file probed as
 * one, opened read-only and closed again); any other format cannot be amended.
 */
export async function amendHelp(
  context: CommandContext,
  file: string | undefined,
  format: ImageFormat | undefined,
): Promise<string> {
  const detected =
    file === undefined ? format : await probeImageFormat(resolveAgainst(context.io.cwd, file), file, format);
  if (detected !== 'qcow2') {
    throw new CliError(`Format driver '${detected}' does not support option amendment`, {
      code: 'EUNSUPPORTED',
    });
  }
  return amendOptionHelp(AMENDABLE);
}

export async function amendCommand(
  context: CommandContext,
  file: string,
  options: AmendCommandOptions,
): Promise<number> {
  const { size, ...amend } = parseAmendOptions(file, options.options);
  const path = resolveAgainst(context.io.cwd, file);
  const progress = progressReporter(context.io, options.progress === true && options.quiet !== true);
  const growViaEngine = await withImageFileForWrite(path, file, options.format, async (device, format) => {
    if (format !== 'qcow2') {
      throw new CliError(`Format driver '${format}' does not support option amendment`, {
        code: 'EUNSUPPORTED',
      });
    }
    progress?.update(0, 1);
    try {
      if (
        amend.compat !== undefined ||
        amend.lazyRefcounts !== undefined ||
        amend.refcountBits !== undefined ||
        amend.dataFile !== undefined ||
        amend.dataFileRaw !== undefined
      ) {
        await amendImage(device, amend);
      }
      if (size === undefined) return false;
      // An external data file follows a grown size: the engine resizes both (file closed first),
      // as `resize` does.
      if (size >= (await qcow2Size(device)) && (await hasDataFile(device))) {
        // Checked here, as resizeImage checks: the engine would write before finding damage.
        await refuseDamagedImage(device);
        return true;
      }
      // As qemu-img amend: a smaller size shrinks the image (no separate shrink flag exists here).
      await resizeImage(device, size, { shrink: true });
      return false;
    } catch (error) {
      // The engine names the file by its path (`qcow2: file:/abs/path: ...`): the line names it as
      // given instead, once.
      const reason = describeImageError(error, file).replace(/^qcow2 amend: /, '');
      throw new CliError(reason, { cause: error });
    }
  });
  if (growViaEngine && size !== undefined) {
    const image = await openWritable(path, file, { format: 'qcow2' });
    try {
      await image.device.resize(size);
    } catch (error) {
      throw new CliError(describeError(error), { cause: error });
    } finally {
      await image.close();
    }
  }
  progress?.finish();
  return 0;
}
