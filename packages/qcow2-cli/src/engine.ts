/**
 * How the CLI opens images: the one place that talks to `@qcowkit/qcow2-core/node`.
 *
 * The interfaces below name only the members of the engine's objects the commands read (every
 * qcow2-only member optional, so a qcow v1 image or a raw file fits too); the engine's own
 * `OpenedImage` is checked against them at compile time.
 */
import type { BlockDevice } from '@qcowkit/blockdev';
import type { FileOpenOptions } from '@qcowkit/blockdev/node';
import type {
  Qcow2BitmapEntry,
  Qcow2CheckOptions,
  Qcow2CheckResult,
  Qcow2Header,
  Qcow2SnapshotInfo,
  QcowV1Header,
} from '@qcowkit/qcow2-core';
// The node entry only: the main entry also loads the checker and every codec, which no command
// but check needs (start-up time).
// detectFormat from the main entry, where it is part of the documented API (the node entry's
// re-export of it is not guaranteed).
import { detectFormat as coreDetectFormat } from '@qcowkit/qcow2-core';
import { openImage as coreOpenImage } from '@qcowkit/qcow2-core/node';
import { CliError, openError } from './errors.js';
import type { ImageFormat } from './image-formats.js';

export { IMAGE_FORMATS, type ImageFormat } from './image-formats.js';

/** A snapshot as the engine lists it, and the result of its consistency check. */
export type SnapshotInfo = Qcow2SnapshotInfo;
export type CheckResult = Qcow2CheckResult;

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
  /** The decoded header, and the bitmap directory an open qcow2 image holds. */
  readonly header?: Qcow2Header | QcowV1Header;
  readonly bitmapDirectory?: readonly Qcow2BitmapEntry[];
  check?(options?: Qcow2CheckOptions): Promise<CheckResult>;
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
  /** The top file's requests up to this many bytes run inline (`'memory-backed'`: the bound on
   * tmpfs or ramfs, 0 elsewhere; default 0). */
  readonly syncIoMaxBytes?: FileOpenOptions['syncIoMaxBytes'];
}

/** Opens `path` read-only with the engine; errors become `Could not open 'NAME': why`. */
export async function openImage(path: string, options: OpenImageOptions = {}): Promise<OpenedImage> {
  const { displayName, snapshot, ...rest } = options;
  try {
    const opened: OpenedImage = await coreOpenImage(path, {
      ...rest,
      ...(snapshot === undefined ? {} : { snapshot }),
      readOnly: true,
    });
    return opened;
  } catch (error) {
    if (error instanceof CliError) throw error;
    throw openError(displayName ?? path, error, path);
  }
}

/** The format of an image from its first bytes, as qemu-img probes it. */
export function detectFormat(firstBytes: Uint8Array): ImageFormat {
  return coreDetectFormat(firstBytes);
}
