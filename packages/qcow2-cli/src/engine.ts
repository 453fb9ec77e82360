/**
 * How the CLI opens images: the one place that talks to `@qcowkit/qcow2-core/node`.
 *
 * The types here restate the shared qcow2-core contract (only the members the CLI reads), so the
 * commands compile against the contract while the engine lands piece by piece. At run time the
 * engine's `openImage` is used when the installed core exports it; until then raw files open
 * through `FileBlockDevice` (or a minimal read-only fallback) and qcow2/qcow images are refused
 * with a clear message.
 */
import type { BlockDevice, Extent } from '@qcowkit/blockdev';
import { CliError, openError } from './errors.js';
import { openRawFallback } from './raw-fallback.js';

export type ImageFormat = 'qcow2' | 'qcow' | 'raw';
export const IMAGE_FORMATS: readonly ImageFormat[] = ['qcow2', 'qcow', 'raw'];

export interface SnapshotInfo {
  readonly id: string;
  readonly name: string;
  readonly vmStateSize: number;
  readonly dateSec: number;
  readonly dateNsec: number;
  readonly vmClockNsec: number;
  readonly icount: number | undefined;
  readonly diskSize: number;
}

export interface CheckResult {
  readonly totalClusters: number;
  readonly allocatedClusters: number;
  readonly fragmentedClusters: number;
  readonly compressedClusters: number;
  readonly imageEndOffset: number;
  readonly corruptions: number;
  readonly leaks: number;
  readonly checkErrors: number;
  readonly corruptionsFixed: number;
  readonly leaksFixed: number;
  readonly messages: readonly string[];
}

export interface CheckOptions {
  readonly signal?: AbortSignal;
  readonly onProgress?: (done: number, total: number) => void;
}

/** What the CLI reads of a `Qcow2Image` or `QcowImage` (every member optional for qcow v1). */
export interface FormatImage extends BlockDevice {
  readonly version?: number;
  readonly clusterSize?: number;
  readonly refcountBits?: number;
  readonly dirty?: boolean;
  readonly corrupt?: boolean;
  readonly lazyRefcounts?: boolean;
  readonly extendedL2?: boolean;
  readonly compressionType?: 'zlib' | 'zstd';
  readonly backingFileName?: string | undefined;
  readonly backingFormat?: string | undefined;
  readonly dataFileName?: string | undefined;
  readonly dataFileRaw?: boolean;
  readonly encrypted?: boolean;
  readonly snapshots?: readonly SnapshotInfo[];
  readonly bitmaps?: readonly { name: string; granularity: number; flags: readonly string[] }[];
  check?(options?: CheckOptions): Promise<CheckResult>;
}

/** The image file itself: a `FileBlockDevice`. */
export interface FileDevice extends BlockDevice {
  readonly path?: string;
  allocatedBytes?(): Promise<number>;
}

export interface ChainLayer {
  readonly path: string;
  readonly filename: string;
  readonly format: ImageFormat;
  readonly device: BlockDevice;
  readonly image: FormatImage | undefined;
  readonly file: FileDevice;
}

export interface OpenedImage {
  readonly device: BlockDevice;
  readonly format: ImageFormat;
  readonly path: string;
  readonly image: FormatImage | undefined;
  readonly chain: readonly ChainLayer[];
  close(): Promise<void>;
}

export interface OpenImageOptions {
  readonly format?: ImageFormat | undefined;
  readonly forceShare?: boolean;
  readonly snapshot?: { id?: string; name?: string } | undefined;
  readonly openBacking?: boolean;
  /** The name the user typed, for error messages (default: `path`). */
  readonly displayName?: string;
}

interface CoreNodeApi {
  openImage(
    path: string,
    options?: OpenImageOptions & { readOnly?: boolean },
  ): Promise<OpenedImage & AsyncDisposable>;
}

let coreNode: Partial<CoreNodeApi> | undefined;

async function loadCore(): Promise<Partial<CoreNodeApi>> {
  if (coreNode === undefined) {
    try {
      coreNode = (await import('@qcowkit/qcow2-core/node')) as unknown as Partial<CoreNodeApi>;
    } catch {
      coreNode = {};
    }
  }
  return coreNode;
}

/** Opens `path` read-only as the engine would; errors become `Could not open 'PATH': why`. */
export async function openImage(path: string, options: OpenImageOptions = {}): Promise<OpenedImage> {
  const core = await loadCore();
  try {
    if (typeof core.openImage === 'function') {
      const { displayName: _name, ...engineOptions } = options;
      return await core.openImage(path, { ...engineOptions, readOnly: true });
    }
    return await openWithoutEngine(path, options);
  } catch (error) {
    if (error instanceof CliError) throw error;
    throw openError(options.displayName ?? path, error);
  }
}

async function openWithoutEngine(path: string, options: OpenImageOptions): Promise<OpenedImage> {
  const name = options.displayName ?? path;
  const file = await openRawFallback(path, options.forceShare ?? false);
  try {
    const head = await file.read(0, Math.min(file.size, 512));
    const format = options.format ?? detectFormat(head);
    if (format !== 'raw') {
      throw new CliError(`Could not open '${name}': the ${format} engine is not available in this build`);
    }
    if (options.snapshot !== undefined) {
      throw new CliError(`Could not open '${name}': a raw image has no snapshots`);
    }
  } catch (error) {
    await file.close();
    throw error;
  }
  const layer: ChainLayer = { path, filename: path, format: 'raw', device: file, image: undefined, file };
  return { device: file, format: 'raw', path, image: undefined, chain: [layer], close: () => file.close() };
}

/** The format of an image from its first bytes, as qemu-img probes it. */
export function detectFormat(firstBytes: Uint8Array): ImageFormat {
  if (firstBytes.length >= 8 && firstBytes[0] === 0x51 && firstBytes[1] === 0x46 && firstBytes[2] === 0x49) {
    if (firstBytes[3] === 0xfb) {
      const version = new DataView(firstBytes.buffer, firstBytes.byteOffset, 8).getUint32(4);
      if (version === 1) return 'qcow';
      if (version === 2 || version === 3) return 'qcow2';
    }
  }
  return 'raw';
}

export type { Extent };
