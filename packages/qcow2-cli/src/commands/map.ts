/** `qcow2 map`: where the guest's bytes live, as qemu-img map prints it. */
import { appendExtent, type Extent } from '@qcowkit/blockdev';
import type { ImageFormat } from '../engine.js';
import { openImage } from '../engine.js';
import { CliError } from '../errors.js';
import type { CommandContext } from '../io.js';
import { formatMapHumanHeader, formatMapHumanRow, formatMapJsonEntry } from '../output/map.js';
import { pathCombine, resolveAgainst } from '../paths.js';

export interface MapOptions {
  readonly format?: ImageFormat | undefined;
  readonly output: 'human' | 'json';
  readonly startOffset: number;
  readonly maxLength: number | undefined;
  readonly forceShare: boolean;
}

/** Guest bytes asked of the device per blockStatus call (the device may answer with less). */
const STATUS_STEP = 2 ** 30;

export async function mapCommand(
  context: CommandContext,
  file: string,
  options: MapOptions,
): Promise<number> {
  const opened = await openImage(resolveAgainst(context.io.cwd, file), {
    displayName: file,
    format: options.format,
    forceShare: options.forceShare,
  });
  try {
    const device = opened.device;
    const start = Math.min(options.startOffset, device.size);
    const end =
      options.maxLength === undefined ? device.size : Math.min(device.size, start + options.maxLength);
    const names = layerNames(
      file,
      opened.chain.map((layer) => layer.image?.backingFileName),
    );
    const out = context.io.stdout;
    if (options.output === 'human') out.write(formatMapHumanHeader());
    let pending: Extent | undefined;
    let first = true;
    const emit = (extent: Extent) => {
      if (options.output === 'json') {
        out.write(`${first ? '[' : ',\n'}${formatMapJsonEntry(extent)}`);
      } else {
        if (extent.data && extent.hostOffset === undefined) {
          throw new CliError('File contains external, encrypted or compressed clusters.');
        }
        if (extent.data) out.write(formatMapHumanRow(extent, names[extent.depth] ?? file));
      }
      first = false;
    };
    let position = start;
    while (position < end) {
      const extents = await device.blockStatus(position, Math.min(end - position, STATUS_STEP));
      if (extents.length === 0) throw new CliError(`${file}: block status returned nothing at ${position}`);
      for (const extent of extents) {
        const list: Extent[] = pending === undefined ? [] : [pending];
        appendExtent(list, opened.format === 'raw' ? asRawLayer(extent) : withoutCompressedFlag(extent));
        if (list.length === 2) emit(list[0]!);
        pending = list[list.length - 1];
        position = extent.offset + extent.length;
      }
    }
    if (pending !== undefined) emit(pending);
    if (options.output === 'json') out.write(first ? '[]\n' : ']\n');
  } finally {
    await opened.close();
  }
  return 0;
}

/** qemu-img map (QEMU 7.2) has no `compressed` field: compressed runs merge like any data. */
function withoutCompressedFlag(extent: Extent): Extent {
  if (extent.compressed === undefined) return extent;
  const { compressed: _compressed, ...rest } = extent;
  return rest;
}

/** In a raw image every guest byte is held by the file at the same offset, holes included: QEMU
 * reports them present, with an offset. */
function asRawLayer(extent: Extent): Extent {
  return { ...extent, present: true, depth: 0, hostOffset: extent.offset };
}

/** The file name shown for each layer: the top as given, then each backing name combined with
 * the name of the layer above it, as QEMU does. */
function layerNames(top: string, backingNames: readonly (string | undefined)[]): string[] {
  const names = [top];
  for (const backing of backingNames) {
    if (backing === undefined) break;
    names.push(pathCombine(names[names.length - 1]!, backing));
  }
  return names;
}
