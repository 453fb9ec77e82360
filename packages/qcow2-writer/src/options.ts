/**
 * Image options (qemu-img's `-o` for qcow2) and their validation into a {@link ImageGeometry}.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import {
  l2EntriesPerTable,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  MIN_EXTENDED_L2_CLUSTER_BITS,
  QCOW_MAX_L1_SIZE,
  sizeToClusters,
  sizeToL1,
} from '@qcowkit/qcow2-core/format';

/** What the new image looks like (qemu-img create -f qcow2 -o ...). */
export interface Qcow2ImageOptions {
  /** Guest size in bytes, rounded up to a multiple of 512 as qemu-img does. */
  readonly size?: number;
  /** 3 (compat=1.1, the default) or 2 (compat=0.10). */
  readonly version?: 2 | 3;
  /** 512 B .. 2 MiB, a power of two; 64 KiB by default. */
  readonly clusterSize?: number;
  /** Refcount width in bits: 1, 2, 4, 8, 16 (default), 32 or 64 (version 2: 16 only). */
  readonly refcountBits?: number;
  /** 128-bit L2 entries with 32 subclusters (clusters of at least 16 KiB). */
  readonly extendedL2?: boolean;
  readonly lazyRefcounts?: boolean;
  /** Compression type recorded in the header (and used by `compress`). */
  readonly compressionType?: 'zlib' | 'zstd';
  /** 'metadata': every L2 table and data cluster allocated (data reads as zeros). */
  readonly preallocation?: 'off' | 'metadata';
  /** Backing file name recorded in the header (resolved by readers against the image's folder). */
  readonly backingFile?: string;
  /** Backing file format recorded in the backing format extension. */
  readonly backingFormat?: string;
  /** External data file name (empty images only). */
  readonly dataFile?: string;
  /** The external data file is valid as a raw image (autoclear bit 1). */
  readonly dataFileRaw?: boolean;
}

/** Validated options with everything derived from them. */
export interface ImageGeometry {
  readonly version: 2 | 3;
  readonly size: number;
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly refcountOrder: number;
  readonly extendedL2: boolean;
  readonly lazyRefcounts: boolean;
  readonly compressionType: 'zlib' | 'zstd';
  readonly preallocation: 'off' | 'metadata';
  readonly backingFile: string | undefined;
  readonly backingFormat: string | undefined;
  readonly dataFile: string | undefined;
  readonly dataFileRaw: boolean;
  /** Entries in one L2 table. */
  readonly l2Entries: number;
  readonly l2EntrySize: 8 | 16;
  readonly l1Size: number;
  readonly guestClusters: number;
}

function invalid(message: string): never {
  throw new BlockDeviceError('EINVAL', `qcow2 options: ${message}`);
}

function log2Exact(value: number): number | undefined {
  if (!Number.isSafeInteger(value) || value <= 0) return undefined;
  const bits = Math.log2(value);
  return Number.isInteger(bits) ? bits : undefined;
}

/** Validates `options` the way qemu-img does and derives the geometry. */
export function resolveGeometry(options: Qcow2ImageOptions, size: number): ImageGeometry {
  if (!Number.isSafeInteger(size) || size < 0) invalid(`size ${size} is not a non-negative integer`);
  const roundedSize = Math.ceil(size / 512) * 512;
  const version = options.version ?? 3;
  if (version !== 2 && version !== 3) invalid(`version ${String(version)} is not 2 or 3`);
  const clusterSize = options.clusterSize ?? 65536;
  const clusterBits = log2Exact(clusterSize);
  if (clusterBits === undefined || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    invalid(`cluster size ${clusterSize} must be a power of two between 512 B and 2 MiB`);
  }
  const refcountBits = options.refcountBits ?? 16;
  const refcountOrder = log2Exact(refcountBits);
  if (refcountOrder === undefined || refcountOrder > 6) {
    invalid(`refcount width ${refcountBits} must be a power of two between 1 and 64`);
  }
  const extendedL2 = options.extendedL2 ?? false;
  const lazyRefcounts = options.lazyRefcounts ?? false;
  const compressionType = options.compressionType ?? 'zlib';
  if (compressionType !== 'zlib' && compressionType !== 'zstd') {
    invalid(`compression type ${String(compressionType)} is not zlib or zstd`);
  }
  const preallocation = options.preallocation ?? 'off';
  if (preallocation !== 'off' && preallocation !== 'metadata') {
    invalid(`preallocation ${String(preallocation)} is not off or metadata`);
  }
  if (version === 2) {
    if (refcountOrder !== 4) invalid('version 2 images need 16-bit refcounts');
    if (extendedL2) invalid('extended L2 entries need version 3');
    if (lazyRefcounts) invalid('lazy refcounts need version 3');
    if (compressionType !== 'zlib') invalid('a compression type other than zlib needs version 3');
    if (options.dataFile !== undefined) invalid('an external data file needs version 3');
  }
  if (extendedL2 && clusterBits < MIN_EXTENDED_L2_CLUSTER_BITS) {
    invalid('extended L2 entries need clusters of at least 16 KiB');
  }
  if (options.backingFormat !== undefined && options.backingFile === undefined) {
    invalid('a backing format needs a backing file');
  }
  if (options.dataFileRaw && options.dataFile === undefined) invalid('data_file_raw needs a data file');
  if (options.dataFileRaw && options.backingFile !== undefined) {
    invalid('data_file_raw cannot be combined with a backing file');
  }
  const l1Size = sizeToL1(roundedSize, clusterSize, extendedL2);
  if (l1Size * 8 > QCOW_MAX_L1_SIZE) {
    invalid(`size ${roundedSize} needs an L1 table of ${l1Size * 8} bytes, above the 32 MiB limit`);
  }
  return {
    version,
    size: roundedSize,
    clusterBits,
    clusterSize,
    refcountOrder,
    extendedL2,
    lazyRefcounts,
    compressionType,
    preallocation,
    backingFile: options.backingFile,
    backingFormat: options.backingFormat,
    dataFile: options.dataFile,
    dataFileRaw: options.dataFileRaw ?? false,
    l2Entries: l2EntriesPerTable(clusterSize, extendedL2),
    l2EntrySize: extendedL2 ? 16 : 8,
    l1Size,
    guestClusters: sizeToClusters(roundedSize, clusterSize),
  };
}
