/**
 * Image options (qemu-img's `-o` for qcow2) and their validation into a {@link ImageGeometry}.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import {
  l2EntriesPerTable,
  planQcow2Create,
  type Qcow2CreatePlan,
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

/** Validated options (qcow2-core's create plan) with everything derived from them. */
export interface ImageGeometry extends Qcow2CreatePlan {
  /** Entries in one L2 table. */
  readonly l2Entries: number;
  readonly l2EntrySize: 8 | 16;
  readonly l1Size: number;
  readonly guestClusters: number;
}

function invalid(message: string): never {
  throw new BlockDeviceError('EINVAL', `qcow2 options: ${message}`);
}

/**
 * Validates `options` the way qemu-img does (the rules are qcow2-core's {@link planQcow2Create},
 * shared with `createQcow2`) and derives the geometry.
 */
export function resolveGeometry(options: Qcow2ImageOptions, size: number): ImageGeometry {
  const version = options.version ?? 3;
  if (version !== 2 && version !== 3) invalid(`version ${String(version)} is not 2 or 3`);
  const plan = planQcow2Create({
    size,
    compat: version === 2 ? '0.10' : '1.1',
    clusterSize: options.clusterSize,
    refcountBits: options.refcountBits,
    extendedL2: options.extendedL2,
    lazyRefcounts: options.lazyRefcounts,
    compressionType: options.compressionType,
    preallocation: options.preallocation,
    backingFile: options.backingFile,
    backingFormat: options.backingFormat,
    dataFile: options.dataFile,
    dataFileRaw: options.dataFileRaw,
  });
  return {
    ...plan,
    version,
    l2Entries: l2EntriesPerTable(plan.clusterSize, plan.extendedL2),
    l2EntrySize: plan.extendedL2 ? 16 : 8,
    l1Size: sizeToL1(plan.size, plan.clusterSize, plan.extendedL2),
    guestClusters: sizeToClusters(plan.size, plan.clusterSize),
  };
}
