/**
 * openImage: opens an image file and its whole backing chain from the file system, read-only.
 *
 * - The top image's format is the one given, else probed (as qemu-img does).
 * - A backing file's format is the one the image declares (backing format extension). When it
 *   declares none, the backing file is probed, but a probed qcow2/qcow backing image may not name
 *   files of its own (backing file, data file): it fails with EUNSUPPORTED telling to declare the
 *   format. So a raw disk whose guest wrote a qcow2 header cannot pull in a file of its choosing.
 * - Relative backing names resolve against the folder of the image naming them; relative external
 *   data file names against the current working directory (as QEMU does).
 * - A chain is at most 64 layers deep; a loop (a file already in the chain, by real path) is an
 *   error instead of a hang.
 */
import { realpath } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { FileBlockDevice, type FileOpenOptions } from '@qcowkit/blockdev/node';
import type { Qcow2Codecs } from '../codecs.js';
import { DETECT_BYTES, detectFormat, type ImageFormat } from '../detect.js';
import { Qcow2Image } from '../image.js';
import { MAX_CHAIN_DEPTH, type Qcow2OpenOptions } from '../options.js';
import { QcowImage } from '../qcow-image.js';
import { RawImage } from '../raw-image.js';
import { nodeCodecs } from './node-codecs.js';

export interface OpenImageOptions {
  /** The top image's format; default: probed from its first bytes. */
  format?: ImageFormat;
  /** Default true. False opens the top layer read-write (qcow2 or raw; backing layers stay
   * read-only) and takes the file's write lock (and its external data file's, read-write too). */
  readOnly?: boolean;
  /** Ignore other processes' locks (qemu-img -U). */
  forceShare?: boolean;
  /** Open an internal snapshot of the top image (qcow2): by id, name, or id-or-name (qemu-img -s). */
  snapshot?: { id?: string; name?: string; idOrName?: string };
  /** Guest size of an opened snapshot; see {@link Qcow2OpenOptions.snapshotSize} (default 'current'). */
  snapshotSize?: 'current' | 'snapshot';
  /** Default true; false: backing files are not opened (unallocated reads as zeros). */
  openBacking?: boolean;
  /** L2 cache bytes per qcow2 layer. */
  l2CacheBytes?: number;
  codecs?: Qcow2Codecs;
  /** The top layer's file: requests up to this many bytes run synchronously (FileBlockDevice's
   * `syncIoMaxBytes`, `'memory-backed'` to choose by its file system; backing files, which may
   * live elsewhere, always use the thread pool; default 0). */
  syncIoMaxBytes?: FileOpenOptions['syncIoMaxBytes'];
}

export interface ChainLayer {
  /** The resolved path of the layer's file. */
  path: string;
  /** The name as the layer above named it (the path given, for the top). */
  filename: string;
  format: ImageFormat;
  /** What reads this layer with everything below it. */
  device: BlockDevice;
  image: Qcow2Image | QcowImage | undefined;
  file: FileBlockDevice;
}

export interface OpenedImage extends AsyncDisposable {
  /** What to read: the qcow2/qcow image, or for raw a {@link RawImage} over the file. */
  device: BlockDevice;
  format: ImageFormat;
  path: string;
  image: Qcow2Image | QcowImage | undefined;
  /** [top, backing, backing's backing, ...]. */
  chain: ChainLayer[];
  /** Closes every layer. */
  close(): Promise<void>;
}

const KNOWN_FORMATS: readonly string[] = ['qcow2', 'qcow', 'raw'];

export async function openImage(path: string, options: OpenImageOptions = {}): Promise<OpenedImage> {
  if (options.readOnly === false && options.snapshot !== undefined) {
    throw new BlockDeviceError('EINVAL', `${path}: a snapshot opens read-only`);
  }
  const chain: ChainLayer[] = [];
  const seen = new Set<string>();
  const closeAll = async (): Promise<void> => {
    for (const layer of chain) await layer.device.close().catch(() => {});
    for (const layer of chain) await layer.file.close().catch(() => {});
  };
  try {
    const top = await openLayer({
      path,
      filename: path,
      declaredFormat: options.format,
      depth: 0,
      probed: false,
      chain,
      seen,
      options,
    });
    let closed = false;
    const close = async (): Promise<void> => {
      if (closed) return;
      closed = true;
      await closeAll();
    };
    return {
      device: top.device,
      format: top.format,
      path: top.path,
      image: top.image,
      chain,
      close,
      [Symbol.asyncDispose]: close,
    };
  } catch (error) {
    await closeAll();
    throw error;
  }
}

interface LayerRequest {
  path: string;
  filename: string;
  declaredFormat: string | undefined;
  depth: number;
  /** This layer's format was probed for a backing file (not declared): no further files allowed. */
  probed: boolean;
  chain: ChainLayer[];
  seen: Set<string>;
  options: OpenImageOptions;
}

async function openLayer(request: LayerRequest): Promise<ChainLayer> {
  const { path, options, chain, seen, depth } = request;
  if (depth >= MAX_CHAIN_DEPTH) {
    throw new BlockDeviceError('EINVAL', `${path}: backing chain longer than ${MAX_CHAIN_DEPTH} layers`);
  }
  if (request.declaredFormat !== undefined && !KNOWN_FORMATS.includes(request.declaredFormat)) {
    throw new BlockDeviceError(
      'EUNSUPPORTED',
      `${path}: image format '${request.declaredFormat}' is not supported`,
    );
  }
  const real = await realpath(path).catch(() => resolve(path));
  if (seen.has(real)) {
    throw new BlockDeviceError('EINVAL', `${path}: backing chain loop: this file is already in the chain`);
  }
  seen.add(real);
  const writable = depth === 0 && options.readOnly === false;
  const file = await FileBlockDevice.open(path, {
    readOnly: !writable,
    ...(options.forceShare !== undefined && !writable ? { forceShare: options.forceShare } : {}),
    ...(options.syncIoMaxBytes !== undefined ? { syncIoMaxBytes: options.syncIoMaxBytes } : {}),
  });
  const layerIndex = chain.length;
  const format = (request.declaredFormat as ImageFormat | undefined) ?? (await probe(file));
  const layer: ChainLayer = {
    path,
    filename: request.filename,
    format,
    device: file,
    image: undefined,
    file,
  };
  chain.push(layer);
  if (depth === 0 && options.snapshot !== undefined && format !== 'qcow2') {
    throw new BlockDeviceError('EUNSUPPORTED', `${path}: a ${format} image has no internal snapshots`);
  }
  if (format === 'raw') {
    layer.device = new RawImage(file);
    return layer;
  }
  const codecs = options.codecs ?? nodeCodecs;
  const common = {
    readOnly: true,
    chainDepth: depth,
    allowExternalFiles: !request.probed,
    codecs,
    ...(options.openBacking !== undefined ? { openBacking: options.openBacking } : {}),
    ...(options.l2CacheBytes !== undefined ? { l2CacheBytes: options.l2CacheBytes } : {}),
    resolveBacking: async (backing: { name: string; format: string | undefined; depth: number }) => {
      const backingPath = isAbsolute(backing.name) ? backing.name : resolve(dirname(path), backing.name);
      const below = await openLayer({
        path: backingPath,
        filename: backing.name,
        declaredFormat: backing.format,
        depth: backing.depth,
        probed: backing.format === undefined,
        chain,
        seen,
        options,
      });
      return below.device;
    },
  };
  if (format === 'qcow' && writable) {
    throw new BlockDeviceError('EUNSUPPORTED', `${path}: writing qcow (version 1) images is not supported`);
  }
  if (format === 'qcow') {
    const image = await QcowImage.open(file, common);
    layer.device = image;
    layer.image = image;
    return chain[layerIndex]!;
  }
  const image = await Qcow2Image.open(file, {
    ...common,
    readOnly: !writable,
    ...(depth === 0 && options.snapshot !== undefined ? { snapshot: options.snapshot } : {}),
    ...(options.snapshotSize !== undefined ? { snapshotSize: options.snapshotSize } : {}),
    resolveDataFile: async (name) => {
      // QEMU resolves a relative data file name against the current working directory. The top
      // image opened read-write writes its data file too (under its write lock).
      return FileBlockDevice.open(resolve(name), {
        readOnly: !writable,
        ...(options.forceShare !== undefined && !writable ? { forceShare: options.forceShare } : {}),
      });
    },
  });
  layer.device = image;
  layer.image = image;
  return layer;
}

async function probe(file: BlockDevice): Promise<ImageFormat> {
  const head = await file.read(0, Math.min(file.size, DETECT_BYTES));
  return detectFormat(head);
}
