/**
 * Encodes the metadata of a planned layout with core's codecs: the header cluster, the refcount
 * table, refcount blocks, the L1 table and L2 tables, each produced a cluster (or a bounded chunk)
 * at a time so memory stays bounded whatever the image size.
 */
import {
  encodeCompressedDescriptor,
  encodeFeatureNameTable,
  encodeHeader,
  encodeL1Entry,
  encodeL2Entry,
  encodeRefcount,
  encodeText,
  maxRefcount,
  QCOW_CRYPT_NONE,
  QCOW2_AUTOCLEAR_DATA_FILE_RAW,
  QCOW2_COMPAT_LAZY_REFCOUNTS,
  QCOW2_COMPRESSION_TYPE_ZLIB,
  QCOW2_COMPRESSION_TYPE_ZSTD,
  QCOW2_EXT_MAGIC_BACKING_FORMAT,
  QCOW2_EXT_MAGIC_DATA_FILE,
  QCOW2_INCOMPAT_COMPRESSION,
  QCOW2_INCOMPAT_DATA_FILE,
  QCOW2_INCOMPAT_EXTL2,
  QCOW2_V3_HEADER_LENGTH,
  type Qcow2HeaderExtension,
  refcountsPerBlock,
  viewOf,
  writeU64,
} from '@qcowkit/qcow2-core/format';
import { CompressedPacker } from './compressed-packing.js';
import { layoutRefcount, type Qcow2Layout } from './layout.js';

/** qemu-img writes the feature name table only when the cluster is larger than 4 KiB. */
const FEATURE_TABLE_MIN_CLUSTER_SIZE = 8192;

/** The header cluster. */
export function encodeImageHeader(layout: Qcow2Layout): Uint8Array {
  const geometry = layout.geometry;
  const extensions: Qcow2HeaderExtension[] = [];
  if (geometry.backingFormat !== undefined) {
    extensions.push({ type: QCOW2_EXT_MAGIC_BACKING_FORMAT, data: encodeText(geometry.backingFormat) });
  }
  if (geometry.dataFile !== undefined) {
    extensions.push({ type: QCOW2_EXT_MAGIC_DATA_FILE, data: encodeText(geometry.dataFile) });
  }
  if (geometry.version === 3 && geometry.clusterSize >= FEATURE_TABLE_MIN_CLUSTER_SIZE) {
    extensions.push(encodeFeatureNameTable());
  }
  let incompatible = 0;
  if (geometry.dataFile !== undefined) incompatible |= QCOW2_INCOMPAT_DATA_FILE;
  if (geometry.compressionType === 'zstd') incompatible |= QCOW2_INCOMPAT_COMPRESSION;
  if (geometry.extendedL2) incompatible |= QCOW2_INCOMPAT_EXTL2;
  return encodeHeader({
    version: geometry.version,
    clusterBits: geometry.clusterBits,
    size: geometry.size,
    cryptMethod: QCOW_CRYPT_NONE,
    l1Size: geometry.l1Size,
    l1TableOffset: layout.l1Offset,
    refcountTableOffset: layout.reftableOffset,
    refcountTableClusters: layout.reftableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: { high: 0, low: incompatible },
    compatibleFeatures: { high: 0, low: geometry.lazyRefcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0 },
    autoclearFeatures: { high: 0, low: geometry.dataFileRaw ? QCOW2_AUTOCLEAR_DATA_FILE_RAW : 0 },
    refcountOrder: geometry.refcountOrder,
    headerLength: QCOW2_V3_HEADER_LENGTH,
    compressionType:
      geometry.compressionType === 'zstd' ? QCOW2_COMPRESSION_TYPE_ZSTD : QCOW2_COMPRESSION_TYPE_ZLIB,
    backingFileName: geometry.backingFile,
    extensions,
  });
}

/** The refcount table (all its clusters). */
export function encodeRefcountTable(layout: Qcow2Layout): Uint8Array {
  const clusterSize = layout.geometry.clusterSize;
  const table = new Uint8Array(layout.reftableClusters * clusterSize);
  const view = viewOf(table);
  for (let block = 0; block < layout.refblockCount; block++) {
    writeU64(view, block * 8, layout.refblockOffset + block * clusterSize);
  }
  return table;
}

/** Refcount block `blockIndex`. */
export function encodeRefcountBlock(layout: Qcow2Layout, blockIndex: number): Uint8Array {
  const { clusterSize, refcountOrder } = layout.geometry;
  const perBlock = refcountsPerBlock(clusterSize, refcountOrder);
  const block = new Uint8Array(clusterSize);
  const first = blockIndex * perBlock;
  const end = Math.min(first + perBlock, layout.totalClusters);
  const areaStart = layout.compressed !== undefined ? layout.compressed.areaOffset / clusterSize : end;
  const onesEnd = Math.min(end, areaStart);
  if (refcountOrder === 4 && onesEnd > first) {
    // Common case: 16-bit refcounts of 1, big-endian.
    for (let index = 0; index < onesEnd - first; index++) block[index * 2 + 1] = 1;
  } else {
    for (let cluster = first; cluster < onesEnd; cluster++)
      encodeRefcount(block, cluster - first, refcountOrder, 1);
  }
  for (let cluster = Math.max(first, onesEnd); cluster < end; cluster++) {
    encodeRefcount(block, cluster - first, refcountOrder, layoutRefcount(layout, cluster));
  }
  return block;
}

/** Bytes [from, to) of the L1 table. */
export function encodeL1Slice(layout: Qcow2Layout, from: number, to: number): Uint8Array {
  const out = new Uint8Array(to - from);
  const view = viewOf(out);
  const firstEntry = from / 8;
  const endEntry = to / 8;
  // Groups are sorted: binary search the first one at or after firstEntry.
  const indexes = layout.groupL1Index;
  let low = 0;
  let high = indexes.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (indexes[middle]! < firstEntry) low = middle + 1;
    else high = middle;
  }
  for (let group = low; group < indexes.length && indexes[group]! < endEntry; group++) {
    const entry = encodeL1Entry({ l2Offset: layout.groupL2Offset[group]!, copied: true });
    const at = (indexes[group]! - firstEntry) * 8;
    view.setUint32(at, entry.high);
    view.setUint32(at + 4, entry.low);
  }
  return out;
}

/**
 * Builds the L2 tables group after group, walking the cluster map once. Host offsets of data
 * clusters follow the layout (interleaved after each table, packed in the compressed area, or the
 * guest offset itself in an external data file).
 */
export class L2TableBuilder {
  private run = 0;
  private runOffset = 0;
  private dataIndex = 0;
  private readonly packer: CompressedPacker | undefined;

  constructor(private readonly layout: Qcow2Layout) {
    const geometry = layout.geometry;
    this.packer =
      layout.compressed !== undefined
        ? new CompressedPacker(geometry.clusterSize, maxRefcount(geometry.refcountOrder))
        : undefined;
  }

  /** The L2 table of group `group` (call in order). */
  build(group: number): Uint8Array {
    const layout = this.layout;
    const geometry = layout.geometry;
    const { clusterSize, l2Entries, l2EntrySize, extendedL2, clusterBits } = geometry;
    const map = layout.map;
    const table = new Uint8Array(clusterSize);
    const view = viewOf(table);
    const firstCluster = layout.groupL1Index[group]! * l2Entries;
    const endCluster = firstCluster + l2Entries;
    let hostCursor = layout.groupL2Offset[group]! + clusterSize;
    const externalData = geometry.dataFile !== undefined;
    while (this.run < map.runCount) {
      const start = map.starts[this.run]! + this.runOffset;
      if (start >= endCluster) break;
      const runEnd = map.starts[this.run]! + map.counts[this.run]!;
      const pieceEnd = Math.min(runEnd, endCluster);
      const kind = map.kinds[this.run]!;
      for (let cluster = start; cluster < pieceEnd; cluster++) {
        const at = (cluster - firstCluster) * l2EntrySize;
        let high = 0;
        let low = 0;
        let allocBits = 0;
        let zeroBits = 0;
        if (kind === 'zero') {
          if (extendedL2) zeroBits = 0xffffffff;
          else ({ high, low } = encodeL2Entry({ type: 'zero-plain' }));
        } else if (this.packer !== undefined) {
          const length = layout.compressed!.lengths[this.dataIndex++]!;
          const placed = this.packer.place(length);
          const hostOffset = layout.compressed!.areaOffset + placed.offset;
          if (placed.compressed) {
            ({ high, low } = encodeCompressedDescriptor(hostOffset, length, clusterBits));
          } else {
            ({ high, low } = encodeL2Entry({ type: 'normal', hostOffset, copied: true }));
            allocBits = 0xffffffff;
          }
        } else {
          const hostOffset = externalData ? cluster * clusterSize : hostCursor;
          if (!externalData) hostCursor += clusterSize;
          ({ high, low } = encodeL2Entry({ type: 'normal', hostOffset, copied: true }));
          if (kind === 'data') allocBits = 0xffffffff;
        }
        view.setUint32(at, high);
        view.setUint32(at + 4, low);
        if (extendedL2) {
          view.setUint32(at + 8, zeroBits);
          view.setUint32(at + 12, allocBits);
        }
      }
      if (pieceEnd === runEnd) {
        this.run++;
        this.runOffset = 0;
      } else {
        this.runOffset = pieceEnd - map.starts[this.run]!;
      }
    }
    return table;
  }
}
