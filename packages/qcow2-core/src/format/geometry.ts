/**
 * Geometry helpers: the arithmetic between guest offsets, clusters and table indexes.
 * All pure; `clusterBits` is log2 of the cluster size.
 */

/** Smallest and largest cluster_bits QEMU accepts (512 B .. 2 MiB). */
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;

/** Largest L1 table QEMU accepts, in bytes (QCOW_MAX_L1_SIZE). */
export const QCOW_MAX_L1_SIZE = 32 * 1024 * 1024;
/** Largest refcount table QEMU accepts, in bytes (QCOW_MAX_REFTABLE_SIZE). */
export const QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024;
/** Most internal snapshots QEMU accepts (QCOW_MAX_SNAPSHOTS). */
export const QCOW_MAX_SNAPSHOTS = 65536;
/** Largest extra data of one snapshot table entry (QCOW_MAX_SNAPSHOT_EXTRA_DATA). */
export const QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024;
/** Smallest cluster_bits for extended L2 entries (16 KiB clusters). */
export const MIN_EXTENDED_L2_CLUSTER_BITS = 14;
/** Subclusters in a cluster with extended L2 entries. */
export const SUBCLUSTERS_PER_CLUSTER = 32;

/** Byte offset inside its cluster. */
export function offsetIntoCluster(offset: number, clusterSize: number): number {
  return offset % clusterSize;
}

/** Cluster-aligned start of the cluster holding `offset`. */
export function startOfCluster(offset: number, clusterSize: number): number {
  return offset - (offset % clusterSize);
}

/** Number of clusters needed to hold `size` bytes. */
export function sizeToClusters(size: number, clusterSize: number): number {
  return Math.ceil(size / clusterSize);
}

/** Size of one L2 entry in bytes: 8, or 16 with extended L2. */
export function l2EntrySize(extendedL2: boolean): number {
  return extendedL2 ? 16 : 8;
}

/** Number of entries in one L2 table. */
export function l2EntriesPerTable(clusterSize: number, extendedL2: boolean): number {
  return clusterSize / l2EntrySize(extendedL2);
}

/** Guest bytes covered by one L1 entry (one full L2 table). */
export function bytesPerL1Entry(clusterSize: number, extendedL2: boolean): number {
  return clusterSize * l2EntriesPerTable(clusterSize, extendedL2);
}

/** Minimum number of L1 entries for a guest of `size` bytes (QEMU refuses a smaller l1_size). */
export function sizeToL1(size: number, clusterSize: number, extendedL2: boolean): number {
  return Math.ceil(size / bytesPerL1Entry(clusterSize, extendedL2));
}

/** Rounds `value` up to a multiple of `alignment`. */
export function alignUp(value: number, alignment: number): number {
  return Math.ceil(value / alignment) * alignment;
}

export function isAligned(value: number, alignment: number): boolean {
  return value % alignment === 0;
}
