/** `qcow2 info`: what qemu-img info tells about an image (and its backing chain). */
import { SYNC_IO_MAX_BYTES } from '@qcowkit/blockdev/node';
import type { ChainLayer, FormatImage, ImageFormat, OpenedImage } from '../engine.js';
import { openImage } from '../engine.js';
import type { CommandContext } from '../io.js';
import { formatInfoHuman, type ImageInfo, infoToJson } from '../output/info.js';
import { toQemuJson } from '../output/qemu-json.js';
import { pathCombine, resolveAgainst } from '../paths.js';
import { type BitmapInfo, bitmapList } from '../qcow2-bitmaps.js';

export interface InfoOptions {
  readonly format?: ImageFormat | undefined;
  readonly output: 'human' | 'json';
  readonly backingChain: boolean;
  readonly forceShare: boolean;
}

export async function infoCommand(
  context: CommandContext,
  file: string,
  options: InfoOptions,
): Promise<number> {
  const opened = await openImage(resolveAgainst(context.io.cwd, file), {
    displayName: file,
    format: options.format,
    forceShare: options.forceShare,
    openBacking: options.backingChain,
    // A few small reads, one after another, with nothing beside them: read on this thread (no
    // thread-pool round trip each), whatever the file system.
    syncIoMaxBytes: SYNC_IO_MAX_BYTES,
  });
  try {
    const infos = await collectInfo(opened, file, options.backingChain);
    if (options.output === 'json') {
      const json = options.backingChain ? infos.map(infoToJson) : infoToJson(infos[0]!);
      context.io.stdout.write(`${toQemuJson(json)}\n`);
    } else {
      context.io.stdout.write(infos.map(formatInfoHuman).join('\n'));
    }
  } finally {
    await opened.close();
  }
  return 0;
}

/** The info of the top image, and of every backing layer when `wholeChain`. */
export async function collectInfo(
  opened: OpenedImage,
  displayName: string,
  wholeChain: boolean,
): Promise<ImageInfo[]> {
  const layers = wholeChain ? opened.chain : opened.chain.slice(0, 1);
  const infos: ImageInfo[] = [];
  let name = displayName;
  for (const layer of layers) {
    const info = await layerInfo(layer, name);
    infos.push(info);
    if (info.fullBackingFilename === undefined) break;
    name = info.fullBackingFilename;
  }
  return infos;
}

function bitmapsOf(image: FormatImage): BitmapInfo[] {
  const header = image.header;
  if (header === undefined || image.bitmapDirectory === undefined || !('extensions' in header)) return [];
  return bitmapList(image.bitmapDirectory, header);
}

async function layerInfo(layer: ChainLayer, displayName: string): Promise<ImageInfo> {
  const image = layer.image;
  const actualSize =
    typeof layer.file.allocatedBytes === 'function' ? await layer.file.allocatedBytes() : undefined;
  const backingFilename = image?.backingFileName;
  return {
    filename: displayName,
    format: layer.format,
    virtualSize: layer.device.size,
    actualSize,
    clusterSize: layer.format === 'raw' ? undefined : image?.clusterSize,
    dirty: image?.dirty ?? false,
    encrypted: image?.encrypted ?? false,
    backingFilename,
    fullBackingFilename:
      backingFilename === undefined ? undefined : pathCombine(displayName, backingFilename),
    backingFormat: image?.backingFormat,
    snapshots: image?.snapshots ?? [],
    qcow2:
      layer.format === 'qcow2' && image !== undefined
        ? {
            version: image.version === 2 ? 2 : 3,
            compressionType: image.compressionType ?? 'zlib',
            lazyRefcounts: image.lazyRefcounts ?? false,
            refcountBits: image.refcountBits ?? 16,
            corrupt: image.corrupt ?? false,
            extendedL2: image.extendedL2 ?? false,
            dataFile: image.dataFileName,
            dataFileRaw: image.dataFileRaw ?? false,
            bitmaps: bitmapsOf(image),
          }
        : undefined,
  };
}
