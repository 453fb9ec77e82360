/**
 * The host layout of a new image, computed in full before the first byte is written:
 *
 *   cluster 0            header (and extensions, backing file name)
 *   cluster 1..          refcount table
 *   then                 refcount blocks
 *   then                 L1 table
 *   uncompressed:        per L1 entry in use: its L2 table, then its data clusters in guest order
 *   compressed:          every L2 table, then the compressed clusters packed in guest order
 *
 * For an empty image this is exactly what qemu-img create writes (one refcount table cluster, one
 * refcount block); with preallocation=metadata it is qemu-img's interleaving of L2 tables and data.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { maxRefcount, QCOW_MAX_REFTABLE_SIZE, refcountClusters } from '@qcowkit/qcow2-core/format';
import type { ClusterMap } from './cluster-map.js';
import { CompressedPacker } from './compressed-packing.js';
import type { ImageGeometry } from './options.js';

export interface Qcow2Layout {
  readonly geometry: ImageGeometry;
  readonly map: ClusterMap;
  readonly reftableOffset: number;
  readonly reftableClusters: number;
  readonly refblockOffset: number;
  readonly refblockCount: number;
  readonly l1Offset: number;
  readonly l1Bytes: number;
  /** L1 indexes with an L2 table, ascending, and where each table goes. */
  readonly groupL1Index: readonly number[];
  readonly groupL2Offset: readonly number[];
  /** Host clusters following each group's L2 table (uncompressed layout). */
  readonly groupHostClusters: readonly number[];
  /** Compressed layout: where the packed area starts, its refcounts per host cluster. */
  readonly compressed:
    | { readonly areaOffset: number; readonly lengths: Uint32Array; readonly areaRefcounts: Uint32Array }
    | undefined;
  /** Host clusters in use: [0, totalClusters). */
  readonly totalClusters: number;
  /** Exact length of the image file. */
  readonly fileSize: number;
}

/** Refcount of host cluster `clusterIndex` in `layout`. */
export function layoutRefcount(layout: Qcow2Layout, clusterIndex: number): number {
  if (clusterIndex >= layout.totalClusters) return 0;
  const compressed = layout.compressed;
  if (compressed !== undefined) {
    const areaCluster = clusterIndex - compressed.areaOffset / layout.geometry.clusterSize;
    if (areaCluster >= 0) return compressed.areaRefcounts[areaCluster]!;
  }
  return 1;
}

function groupsOf(
  geometry: ImageGeometry,
  map: ClusterMap,
  hostInGroups: boolean,
): { l1Index: number[]; hostClusters: number[] } {
  const l1Index: number[] = [];
  const hostClusters: number[] = [];
  const perTable = geometry.l2Entries;
  for (let run = 0; run < map.runCount; run++) {
    const kind = map.kinds[run]!;
    let cluster = map.starts[run]!;
    const end = cluster + map.counts[run]!;
    while (cluster < end) {
      const table = Math.floor(cluster / perTable);
      const pieceEnd = Math.min(end, (table + 1) * perTable);
      if (l1Index[l1Index.length - 1] !== table) {
        l1Index.push(table);
        hostClusters.push(0);
      }
      if (hostInGroups && kind !== 'zero') hostClusters[hostClusters.length - 1]! += pieceEnd - cluster;
      cluster = pieceEnd;
    }
  }
  return { l1Index, hostClusters };
}

/**
 * Plans the image. `compressedLengths` (one per data cluster, guest order) selects the compressed
 * layout; a length of `clusterSize` or more means stored uncompressed.
 */
export function planLayout(
  geometry: ImageGeometry,
  map: ClusterMap,
  compressedLengths?: Uint32Array,
): Qcow2Layout {
  const clusterSize = geometry.clusterSize;
  const externalData = geometry.dataFile !== undefined;
  const hostInGroups = compressedLengths === undefined && !externalData;
  const groups = groupsOf(geometry, map, hostInGroups);

  let areaClusters = 0;
  let areaRefcounts = new Uint32Array(0);
  let packedBytes = 0;
  if (compressedLengths !== undefined) {
    if (map.hostClusters !== map.dataClusters) {
      throw new BlockDeviceError('EINVAL', 'qcow2 writer: compression cannot be combined with preallocation');
    }
    const counts: number[] = [];
    const packer = new CompressedPacker(clusterSize, maxRefcount(geometry.refcountOrder), (cluster) => {
      counts[cluster] = (counts[cluster] ?? 0) + 1;
    });
    for (let index = 0; index < map.dataClusters; index++) packer.place(compressedLengths[index]!);
    packedBytes = packer.end;
    areaClusters = Math.ceil(packedBytes / clusterSize);
    areaRefcounts = Uint32Array.from(counts, (count) => count ?? 0);
  }

  const hostData = hostInGroups ? groups.hostClusters.reduce((sum, count) => sum + count, 0) : 0;
  const l1Bytes = geometry.l1Size * 8;
  const l1Clusters = Math.ceil(l1Bytes / clusterSize);
  const { reftableClusters, refblockCount } = refcountClusters(
    clusterSize,
    geometry.refcountOrder,
    l1Clusters + groups.l1Index.length + hostData + areaClusters,
  );
  if (reftableClusters * clusterSize > QCOW_MAX_REFTABLE_SIZE) {
    throw new BlockDeviceError(
      'EINVAL',
      `qcow2 writer: the image needs a refcount table of ${reftableClusters * clusterSize} bytes, above 8 MiB (use wider refcounts or larger clusters)`,
    );
  }
  const reftableOffset = clusterSize;
  const refblockOffset = (1 + reftableClusters) * clusterSize;
  const l1Offset = refblockOffset + refblockCount * clusterSize;
  let cursor = l1Offset / clusterSize + l1Clusters;
  const groupL2Offset: number[] = [];
  for (let group = 0; group < groups.l1Index.length; group++) {
    groupL2Offset.push(cursor * clusterSize);
    cursor += 1 + groups.hostClusters[group]!;
  }
  const areaOffset = cursor * clusterSize;
  cursor += areaClusters;
  const totalClusters = cursor;
  let fileSize: number;
  if (packedBytes > 0) fileSize = areaOffset + packedBytes;
  else if (groups.l1Index.length > 0) fileSize = totalClusters * clusterSize;
  else fileSize = l1Bytes > 0 ? l1Offset + l1Bytes : l1Offset;
  return {
    geometry,
    map,
    reftableOffset,
    reftableClusters,
    refblockOffset,
    refblockCount,
    l1Offset,
    l1Bytes,
    groupL1Index: groups.l1Index,
    groupL2Offset,
    groupHostClusters: groups.hostClusters,
    compressed:
      compressedLengths !== undefined ? { areaOffset, lengths: compressedLengths, areaRefcounts } : undefined,
    totalClusters,
    fileSize,
  };
}
