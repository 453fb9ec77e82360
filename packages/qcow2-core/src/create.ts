/**
 * The layout of a new, empty qcow2 image, as qemu-img create writes it: the header in cluster 0,
 * the refcount table in cluster 1, one refcount block in cluster 2, the L1 table from cluster 3, and
 * the file ending where the L1 table ends. When the L1 table needs more refcount blocks they follow
 * it, as QEMU allocates them (see emptyLayout). Header extensions come in QEMU's order (backing format, external
 * data file, feature name table); the feature name table is written for v3 images with clusters
 * above 4 KiB, as QEMU does, and v2 images get only the backing format.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { encodeText, writeU64 } from './format/binary.js';
import {
  FEATURE_KIND_NUMBER,
  type FeatureKind,
  knownFeatureName,
  QCOW2_AUTOCLEAR_DATA_FILE_RAW,
  QCOW2_COMPAT_LAZY_REFCOUNTS,
  QCOW2_INCOMPAT_COMPRESSION,
  QCOW2_INCOMPAT_DATA_FILE,
  QCOW2_INCOMPAT_EXTL2,
} from './format/feature-bits.js';
import {
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  MIN_EXTENDED_L2_CLUSTER_BITS,
  QCOW_MAX_L1_SIZE,
  sizeToL1,
} from './format/geometry.js';
import {
  encodeHeader,
  QCOW_CRYPT_NONE,
  QCOW2_COMPRESSION_TYPE_ZLIB,
  QCOW2_COMPRESSION_TYPE_ZSTD,
  QCOW2_MAX_BACKING_FILE_NAME,
  QCOW2_V3_HEADER_LENGTH,
} from './format/header.js';
import {
  FEATURE_NAME_ENTRY_SIZE,
  QCOW2_EXT_MAGIC_BACKING_FORMAT,
  QCOW2_EXT_MAGIC_DATA_FILE,
  QCOW2_EXT_MAGIC_FEATURE_TABLE,
  type Qcow2HeaderExtension,
} from './format/header-extensions.js';
import { encodeRefcount, refcountClusters, refcountsPerBlock } from './format/refcount.js';

/** What `qemu-img create -f qcow2 -o ...` takes. */
export interface Qcow2CreateOptions {
  /** Guest size in bytes (rounded up to a multiple of 512, as qemu-img does). */
  size: number;
  /** Default 65536; a power of two from 512 to 2 MiB. */
  clusterSize?: number;
  /** Default 16; a power of two from 1 to 64 (v2 images: 16 only). */
  refcountBits?: number;
  /** Default false; needs v3 and clusters of at least 16 KiB. */
  extendedL2?: boolean;
  /** Default '1.1' (version 3); '0.10' is version 2. */
  compat?: '0.10' | '1.1';
  /** Default false (v3 only). */
  lazyRefcounts?: boolean;
  /** Default 'zlib'; 'zstd' needs v3. */
  compressionType?: 'zlib' | 'zstd';
  /** Default 'off'; 'metadata' allocates every L2 table and data cluster (the data stays sparse).
   * 'falloc' and 'full' are the node layer's (createImage). */
  preallocation?: 'off' | 'metadata';
  /** Backing file name as stored (relative names resolve against the image's folder). */
  backingFile?: string;
  backingFormat?: string;
  /** External data file name as stored (v3 only). */
  dataFile?: string;
  /** The data file is a valid raw image (guest offset = data file offset). */
  dataFileRaw?: boolean;
}

/** A validated create request with every default filled in. */
export interface Qcow2CreatePlan {
  readonly size: number;
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly refcountOrder: number;
  readonly version: 2 | 3;
  readonly extendedL2: boolean;
  readonly lazyRefcounts: boolean;
  readonly compressionType: 'zlib' | 'zstd';
  readonly preallocation: 'off' | 'metadata';
  readonly backingFile: string | undefined;
  readonly backingFormat: string | undefined;
  readonly dataFile: string | undefined;
  readonly dataFileRaw: boolean;
}

function invalid(message: string): never {
  throw new BlockDeviceError('EINVAL', `qcow2 create: ${message}`);
}

/** Checks options as qemu-img does and fills defaults. */
export function planQcow2Create(options: Qcow2CreateOptions): Qcow2CreatePlan {
  const clusterSize = options.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    invalid(`cluster size ${clusterSize} must be a power of two between 512 and 2M`);
  }
  const version = (options.compat ?? '1.1') === '0.10' ? 2 : 3;
  if (options.compat !== undefined && options.compat !== '0.10' && options.compat !== '1.1') {
    invalid(`compat ${String(options.compat)} is not 0.10 or 1.1`);
  }
  const refcountBits = options.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    invalid(`refcount width ${refcountBits} must be a power of two from 1 to 64`);
  }
  if (version === 2 && refcountBits !== 16) invalid('compat 0.10 images need 16-bit refcounts');
  const extendedL2 = options.extendedL2 ?? false;
  if (extendedL2 && version === 2) invalid('extended L2 entries need compat 1.1');
  if (extendedL2 && clusterBits < MIN_EXTENDED_L2_CLUSTER_BITS) {
    invalid('extended L2 entries need clusters of at least 16 KiB');
  }
  const lazyRefcounts = options.lazyRefcounts ?? false;
  if (lazyRefcounts && version === 2) invalid('lazy refcounts need compat 1.1');
  const compressionType = options.compressionType ?? 'zlib';
  if (compressionType !== 'zlib' && compressionType !== 'zstd')
    invalid(`compression type ${compressionType} is unknown`);
  if (compressionType === 'zstd' && version === 2) invalid('zstd compression needs compat 1.1');
  const preallocation = options.preallocation ?? 'off';
  if (preallocation !== 'off' && preallocation !== 'metadata') {
    invalid(`preallocation ${preallocation} is not off or metadata here (falloc and full: createImage)`);
  }
  if (options.dataFile !== undefined && version === 2) invalid('an external data file needs compat 1.1');
  const dataFileRaw = options.dataFileRaw ?? false;
  if (dataFileRaw && options.dataFile === undefined) invalid('data_file_raw needs a data file');
  if (dataFileRaw && options.backingFile !== undefined)
    invalid('a backing file and data_file_raw exclude each other');
  if (options.backingFormat !== undefined && options.backingFile === undefined) {
    invalid('a backing format needs a backing file');
  }
  if (
    options.backingFile !== undefined &&
    encodeText(options.backingFile).length > QCOW2_MAX_BACKING_FILE_NAME
  ) {
    invalid('backing file name is too long');
  }
  if (!Number.isSafeInteger(options.size) || options.size < 0)
    invalid(`size ${options.size} is not a byte count`);
  const size = Math.ceil(options.size / 512) * 512;
  if (sizeToL1(size, clusterSize, extendedL2) * 8 > QCOW_MAX_L1_SIZE) {
    invalid(`size ${size} is above the largest for ${clusterSize}-byte clusters`);
  }
  return {
    size,
    clusterBits,
    clusterSize,
    refcountOrder,
    version,
    extendedL2,
    lazyRefcounts,
    compressionType,
    preallocation,
    backingFile: options.backingFile,
    backingFormat: options.backingFormat,
    dataFile: options.dataFile,
    dataFileRaw,
  };
}

/** The feature name table QEMU writes: every bit it knows, in kind order. */
function featureNameTable(): Uint8Array {
  const entries: [FeatureKind, number][] = [
    ['incompatible', 0],
    ['incompatible', 1],
    ['incompatible', 2],
    ['incompatible', 3],
    ['incompatible', 4],
    ['compatible', 0],
    ['autoclear', 0],
    ['autoclear', 1],
  ];
  const out = new Uint8Array(entries.length * FEATURE_NAME_ENTRY_SIZE);
  for (const [index, [kind, bit]] of entries.entries()) {
    const at = index * FEATURE_NAME_ENTRY_SIZE;
    out[at] = FEATURE_KIND_NUMBER[kind];
    out[at + 1] = bit;
    out.set(encodeText(knownFeatureName(kind, bit)!), at + 2);
  }
  return out;
}

/** Where a new, empty image's refcount table, blocks and L1 table lie (cluster indexes). */
interface EmptyLayout {
  readonly tableClusters: number;
  /** The cluster of each refcount block, in table order. */
  readonly blocks: number[];
  readonly l1Cluster: number;
  /** Clusters in use (the file's clusters). */
  readonly usedClusters: number;
}

/**
 * QEMU's layout: header, refcount table and first refcount block in clusters 0-2, the L1 table
 * from cluster 3; a refcount block the L1 table needs comes after it (after the blocks made before
 * it), and one that does not cover itself gets its own refcount from the next block made. Where
 * one table cluster cannot name every block (512-byte clusters, large guests), the table clusters
 * and every block come before the L1 table instead.
 */
function emptyLayout(clusterSize: number, refcountOrder: number, l1Clusters: number): EmptyLayout {
  const perBlock = refcountsPerBlock(clusterSize, refcountOrder);
  const blockAt = new Map<number, number>([[0, 2]]);
  let next = 3 + l1Clusters;
  const cover = (cluster: number): void => {
    const index = Math.floor(cluster / perBlock);
    if (blockAt.has(index)) return;
    const block = next++;
    blockAt.set(index, block);
    cover(block);
  };
  for (let cluster = 0; cluster < next; cluster++) cover(cluster);
  if (Math.max(...blockAt.keys()) < clusterSize / 8) {
    const blocks = [...blockAt].sort(([a], [b]) => a - b).map(([, block]) => block);
    return { tableClusters: 1, blocks, l1Cluster: 3, usedClusters: next };
  }
  const { reftableClusters: tableClusters, refblockCount: count } = refcountClusters(
    clusterSize,
    refcountOrder,
    l1Clusters,
  );
  const blocks = Array.from({ length: count }, (_, index) => 1 + tableClusters + index);
  return {
    tableClusters,
    blocks,
    l1Cluster: 1 + tableClusters + count,
    usedClusters: 1 + tableClusters + count + l1Clusters,
  };
}

/** Writes a new, empty image's metadata into `file` (resized to fit). */
export async function writeQcow2Layout(file: BlockDevice, plan: Qcow2CreatePlan): Promise<void> {
  const { clusterSize, clusterBits, refcountOrder } = plan;
  const l1Size = sizeToL1(plan.size, clusterSize, plan.extendedL2);
  // A guest of size 0 has no L1 table (offset 0), as QEMU leaves it.
  const l1Clusters = Math.ceil((l1Size * 8) / clusterSize);
  const perBlock = refcountsPerBlock(clusterSize, refcountOrder);
  const layout = emptyLayout(clusterSize, refcountOrder, l1Clusters);
  const { tableClusters, usedClusters } = layout;
  const tableOffset = clusterSize;
  const l1Offset = l1Size === 0 ? 0 : layout.l1Cluster * clusterSize;

  const extensions: Qcow2HeaderExtension[] = [];
  if (plan.backingFormat !== undefined) {
    extensions.push({ type: QCOW2_EXT_MAGIC_BACKING_FORMAT, data: encodeText(plan.backingFormat) });
  }
  if (plan.dataFile !== undefined) {
    extensions.push({ type: QCOW2_EXT_MAGIC_DATA_FILE, data: encodeText(plan.dataFile) });
  }
  if (plan.version === 3 && clusterSize > 4096) {
    extensions.push({ type: QCOW2_EXT_MAGIC_FEATURE_TABLE, data: featureNameTable() });
  }
  let incompatible = 0;
  if (plan.dataFile !== undefined) incompatible |= QCOW2_INCOMPAT_DATA_FILE;
  if (plan.compressionType === 'zstd') incompatible |= QCOW2_INCOMPAT_COMPRESSION;
  if (plan.extendedL2) incompatible |= QCOW2_INCOMPAT_EXTL2;
  const header = encodeHeader({
    version: plan.version,
    clusterBits,
    size: plan.size,
    cryptMethod: QCOW_CRYPT_NONE,
    l1Size,
    l1TableOffset: l1Offset,
    refcountTableOffset: tableOffset,
    refcountTableClusters: tableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: { high: 0, low: incompatible },
    compatibleFeatures: { high: 0, low: plan.lazyRefcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0 },
    autoclearFeatures: { high: 0, low: plan.dataFileRaw ? QCOW2_AUTOCLEAR_DATA_FILE_RAW : 0 },
    refcountOrder,
    headerLength: QCOW2_V3_HEADER_LENGTH,
    compressionType:
      plan.compressionType === 'zstd' ? QCOW2_COMPRESSION_TYPE_ZSTD : QCOW2_COMPRESSION_TYPE_ZLIB,
    backingFileName: plan.backingFile,
    extensions,
  });

  const table = new Uint8Array(tableClusters * clusterSize);
  const tableView = new DataView(table.buffer);
  const blockBytes = layout.blocks.map(() => new Uint8Array(clusterSize));
  for (const [index, block] of layout.blocks.entries()) writeU64(tableView, index * 8, block * clusterSize);
  for (let cluster = 0; cluster < usedClusters; cluster++) {
    const blockIndex = Math.floor(cluster / perBlock);
    encodeRefcount(blockBytes[blockIndex]!, cluster - blockIndex * perBlock, refcountOrder, 1);
  }
  // The file ends where the L1 table ends, or after the last refcount block.
  const lastBlockEnd = (Math.max(...layout.blocks) + 1) * clusterSize;
  const fileSize = Math.max(l1Offset + l1Size * 8, lastBlockEnd);
  if (file.size > 0) await file.resize(0);
  await file.resize(fileSize);
  await file.write(tableOffset, table);
  for (const [index, block] of layout.blocks.entries())
    await file.write(block * clusterSize, blockBytes[index]!);
  // The L1 table is all zeros, which the file already reads as after the resize above: it is left
  // unwritten (sparse). qemu-img writes it (16 MiB of zeros for 1 PiB at 64 KiB clusters); the
  // bytes are the same, only the allocation differs.
  await file.flush();
  await file.write(0, header.subarray(0, Math.min(header.length, fileSize)));
  await file.flush();
}
