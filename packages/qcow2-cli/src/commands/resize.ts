/** `qcow2 resize [--shrink] [-f FMT] FILE [+|-]SIZE`: qemu-img resize's rules and messages. */
import type { FileBlockDevice } from '@qcowkit/blockdev/node';
import { resizeImage } from '@qcowkit/qcow2-core';
import type { ImageFormat } from '../engine.js';
import { CliError, describeError, UsageError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { resolveAgainst } from '../paths.js';
import { parseSize } from '../size.js';
import { withImageFileForWrite } from './image-file.js';

export interface ResizeCommandOptions {
  readonly format?: ImageFormat | undefined;
  readonly shrink: boolean;
  readonly quiet: boolean;
}

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
  const path = resolveAgainst(context.io.cwd, file);
  await withImageFileForWrite(path, file, options.format, async (device, format) => {
    if (format === 'qcow') throw new CliError('This image does not support resize', { code: 'EUNSUPPORTED' });
    const current = format === 'qcow2' ? await qcow2Size(device) : device.size;
    const newSize = relative === 0 ? bytes : current + relative * bytes;
    if (newSize < 0) throw new UsageError('New image size must be positive');
    if (newSize < current && !options.shrink) {
      throw new UsageError('Use the --shrink option to perform a shrink operation.');
    }
    try {
      if (format === 'qcow2') await resizeImage(device, newSize, { shrink: options.shrink });
      else await device.resize(newSize);
    } catch (error) {
      throw new CliError(`Error resizing image: ${describeError(error)}`, { cause: error });
    }
  });
  if (!options.quiet) context.io.stdout.write('Image resized.\n');
  return 0;
}

/** The guest size from the header (bytes 24-31), read without opening the image. */
async function qcow2Size(device: FileBlockDevice): Promise<number> {
  const header = await device.read(24, 8);
  const view = new DataView(header.buffer, header.byteOffset, 8);
  const size = view.getUint32(0) * 2 ** 32 + view.getUint32(4);
  if (!Number.isSafeInteger(size))
    throw new CliError(`qcow2 header: size too large (at 0x18)`, { code: 'ECORRUPT' });
  return size;
}
