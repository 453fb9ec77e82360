/** `qcow2 map`: where the guest's bytes live, as qemu-img map prints it. */
import { appendExtent, type Extent } from '@qcowkit/blockdev';
import type { ChainLayer, ImageFormat } from '../engine.js';
import { openImage } from '../engine.js';
import { CliError } from '../errors.js';
import { walkExtents } from '../extents.js';
import type { CommandContext } from '../io.js';
import { formatMapHumanHeader, formatMapHumanRow, formatMapJsonEntry } from '../output/map.js';
import { pathCombine, resolveAgainst } from '../paths.js';
import { type MapLayer, qemuMapView } from '../qemu-map-view.js';

export interface MapOptions {
  readonly format?: ImageFormat | undefined;
  readonly output: 'human' | 'json';
  readonly startOffset: number;
  readonly maxLength: number | undefined;
  readonly forceShare: boolean;
}

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
    const names = layerNames(file, opened.chain);
    const layers: MapLayer[] = opened.chain.map((layer) => ({
      format: layer.format,
      size: layer.device.size,
    }));
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
        // The table lists stored data only: runs that read as zeros are left out, as qemu-img does.
        if (extent.data && !extent.zero) out.write(formatMapHumanRow(extent, names[extent.depth] ?? file));
      }
      first = false;
    };
    for await (const extent of walkExtents(device, start, end)) {
      for (const piece of qemuMapView(extent, layers)) {
        const list: Extent[] = pending === undefined ? [] : [pending];
        appendExtent(list, piece);
        if (list.length === 2) emit(list[0]!);
        pending = list[list.length - 1];
      }
    }
    if (pending !== undefined) emit(pending);
    // An empty range (at or past the end, a zero length, an empty image): qemu-img still lists
    // one entry, of length 0 where the range starts.
    if (first && options.output === 'json') {
      emit({ offset: options.startOffset, length: 0, depth: 0, present: false, zero: false, data: false });
    }
    if (options.output === 'json') out.write(']\n');
  } finally {
    await opened.close();
  }
  return 0;
}

/** The file name shown for each layer's data: the top as given, then each backing name combined
 * with the name of the layer above it, as QEMU does; a layer with an external data file shows the
 * data file's name (QEMU opens it relative to the working folder). */
function layerNames(top: string, chain: readonly ChainLayer[]): string[] {
  const names: string[] = [];
  let name = top;
  for (const layer of chain) {
    names.push(layer.image?.dataFileName ?? name);
    const backing = layer.image?.backingFileName;
    if (backing === undefined) break;
    name = pathCombine(name, backing);
  }
  return names;
}
