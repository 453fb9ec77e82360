/**
 * `qcow2 resize [--shrink] [--preallocation=MODE] [-f FMT] [-q] FILE [+|-]SIZE`: qemu-img resize's
 * rules and messages. `--preallocation` applies to the grown range: for raw files `falloc`
 * allocates it in place and `full` writes zeros; for qcow2 images both give the grown range data
 * clusters holding zeros (written through the engine), as qemu-img leaves them. An image with an
 * external data file is resized through the engine, which truncates the data file to the new size
 * as QEMU does (and maps a raw data file's grown range).
 */
import type { FileBlockDevice } from '@qcowkit/blockdev/node';
import { QCOW2_INCOMPAT_DATA_FILE, Qcow2Image, refuseDamagedImage, resizeImage } from '@qcowkit/qcow2-core';
import type { ImageFormat } from '../engine.js';
import { CliError, describeImageError, UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { resolveAgainst } from '../paths.js';
import { parseSize } from '../size.js';
import { writeZeros } from './create.js';
import { withImageFileForWrite } from './image-file.js';
import { openWritable } from './writable-image.js';

export interface ResizeCommandOptions {
  readonly format?: ImageFormat | undefined;
  readonly shrink: boolean;
  readonly quiet: boolean;
  /** `--preallocation`: off (default), metadata, falloc or full. */
  readonly preallocation?: string | undefined;
}

const PREALLOCATION_MODES: readonly string[] = ['off', 'metadata', 'falloc', 'full'];

/** `+SIZE` / `-SIZE` are relative to the current size; anything else is the new size. */
export function parseResizeSize(text: string): { readonly relative: -1 | 0 | 1; readonly bytes: number } {
  const relative = text.startsWith('+') ? 1 : text.startsWith('-') ? -1 : 0;
  const body = relative === 0 ? text : text.slice(1);
  try {
    return { relative, bytes: parseSize(body, 'size') };
  } catch {
    throw new UsageError(
      "Parameter 'size' expects a non-negative number below 2^64 (optional suffix k, M, G, T, P or E)",
    );
  }
}

export async function resizeCommand(
  context: CommandContext,
  file: string,
  sizeText: string,
  options: ResizeCommandOptions,
): Promise<number> {
  const { relative, bytes } = parseResizeSize(sizeText);
  const preallocation = options.preallocation ?? 'off';
  if (!PREALLOCATION_MODES.includes(preallocation)) {
    throw new UsageError(`Invalid preallocation mode '${preallocation}'`);
  }
  const path = resolveAgainst(context.io.cwd, file);
  const { format, current, newSize, viaEngine } = await withImageFileForWrite(
    path,
    file,
    options.format,
    async (device, format) => {
      if (format === 'qcow')
        throw new CliError('This image does not support resize', { code: 'EUNSUPPORTED' });
      const current = format === 'qcow2' ? await qcow2Size(device) : device.size;
      // The data file changes with the metadata: the engine does both (file closed first).
      const viaEngine = format === 'qcow2' && (await hasDataFile(device));
      const newSize = relative === 0 ? bytes : current + relative * bytes;
      if (newSize <= 0) throw new UsageError('New image size must be positive');
      if (newSize < current && !options.shrink) {
        throw new UsageError('Use the --shrink option to perform a shrink operation.');
      }
      if (preallocation !== 'off' && newSize < current) {
        throw new UsageError('Preallocation can only be used for growing images');
      }
      if (preallocation === 'metadata' && format === 'raw') {
        throw new CliError('Unsupported preallocation mode: metadata', { code: 'EUNSUPPORTED' });
      }
      try {
        if (viaEngine) {
          // Checked here, as resizeImage checks: the engine would write before finding damage.
          await refuseDamagedImage(device);
          return { format, current, newSize, viaEngine };
        }
        if (format === 'qcow2') await resizeImage(device, newSize, { shrink: options.shrink });
        else await device.resize(newSize);
        if (format === 'raw' && newSize > current) {
          if (preallocation === 'falloc') await device.writeZeroes(current, newSize - current);
          if (preallocation === 'full') await writeZeros(device, current, newSize);
        }
      } catch (error) {
        throw new CliError(`Error resizing image: ${describeImageError(error, file)}`, { cause: error });
      }
      return { format, current, newSize, viaEngine };
    },
  );
  if (viaEngine) {
    const image = await openWritable(path, file, { format });
    try {
      await image.device.resize(newSize);
    } catch (error) {
      throw new CliError(`Error resizing image: ${describeImageError(error, file)}`, { cause: error });
    } finally {
      await image.close();
    }
  }
  if (format === 'qcow2' && newSize > current && preallocation !== 'off') {
    // The grown range as data clusters holding zeros: written through the engine (file closed above).
    const image = await openWritable(path, file, { format });
    try {
      if (preallocation === 'metadata' && image.device instanceof Qcow2Image) {
        // The grown range's L2 tables and clusters allocated, reading as zeros (as qemu-img).
        await image.device.preallocateMetadata(current);
      } else {
        await writeZeros(image.device, current, newSize);
      }
      await image.device.flush();
    } catch (error) {
      throw new CliError(`Error resizing image: ${describeImageError(error, file)}`, { cause: error });
    } finally {
      await image.close();
    }
  }
  if (!options.quiet) context.io.stdout.write('Image resized.\n');
  return 0;
}

/** Whether the header (v3) sets the external data file bit (incompatible feature bit 2). */
export async function hasDataFile(device: FileBlockDevice): Promise<boolean> {
  if (device.size < 80) return false;
  const header = await device.read(4, 76);
  const view = new DataView(header.buffer, header.byteOffset, header.byteLength);
  return view.getUint32(0) >= 3 && (view.getUint32(72) & QCOW2_INCOMPAT_DATA_FILE) !== 0;
}

/** The guest size from the header (bytes 24-31), read without opening the image. */
export async function qcow2Size(device: FileBlockDevice): Promise<number> {
  const header = await device.read(24, 8);
  const view = new DataView(header.buffer, header.byteOffset, 8);
  const size = view.getUint32(0) * 2 ** 32 + view.getUint32(4);
  if (!Number.isSafeInteger(size))
    throw new CliError(`qcow2 header: size too large (at 0x18)`, { code: 'ECORRUPT' });
  return size;
}
