/**
 * `preallocation=falloc|full` for a new qcow2 image, laid out as `qemu-img create` leaves it.
 *
 * QEMU creates the empty image, then grows it from size 0 with data preallocation
 * (qcow2_co_truncate): the refcount structures for the whole new area are made first (the refcount
 * blocks still missing, then a new, larger refcount table, both right after the last used cluster;
 * the old table is freed), the data clusters follow them in one contiguous run (fallocated or
 * written with zeros), and the L2 tables come last: the first ones fill the hole the old refcount
 * table left, the others follow the data. Entries are plain data entries with COPIED; with
 * extended L2 their subcluster bitmaps stay empty (the subclusters read from the backing file or
 * as zeros until written), as QEMU's preallocated entries have them.
 *
 * {@link preallocateData} does exactly that to an image `writeQcow2Layout` has just written, so
 * `qemu-img map` shows the same host offsets and the file is byte for byte qemu-img's.
 *
 * Order: the refcount blocks and the new table are written and flushed before the header points at
 * the table; the data area is zeros on disk before any L2 entry names it; the L2 tables are
 * durable before the L1 table points at them. A crash leaves at worst leaked clusters.
 */
import { type BlockDevice, BlockDeviceError, type RequestOptions } from '@qcowkit/blockdev';
import { loadHeader } from '../check/check.js';
import { writeU64 } from '../format/binary.js';
import { QCOW2_INCOMPAT_DATA_FILE, QCOW2_INCOMPAT_EXTL2 } from '../format/feature-bits.js';
import { l2EntrySize, sizeToClusters } from '../format/geometry.js';
import { decodeL1Table, encodeL1Entry, l1EntryOffset } from '../format/l1-entry.js';
import { encodeL2Entry } from '../format/l2-entry.js';
import {
  decodeRefcount,
  decodeRefcountTable,
  encodeRefcount,
  refcountsPerBlock,
} from '../format/refcount.js';

export type DataPreallocation = 'falloc' | 'full';

export interface PreallocateOptions {
  readonly signal?: AbortSignal;
  /** Called as the data area is preallocated: bytes done and the total. */
  readonly onProgress?: (done: number, total: number) => void;
}

/** Bytes of zeros written at a time for 'full'. */
const ZERO_CHUNK = 4 * 1024 * 1024;
/** Refcount table entry size (bytes). */
const REFTABLE_ENTRY_SIZE = 8;
/** Header field offsets: refcount_table_offset (u64) then refcount_table_clusters (u32). */
const HEADER_REFCOUNT_TABLE_OFFSET = 48;

/**
 * Refcount blocks needed so that `clusters` clusters plus the refcount blocks and table clusters
 * themselves are covered: the fixed point QEMU computes (qcow2_refcount_metadata_size, exact).
 */
export function refcountBlocksCovering(clusters: number, clusterSize: number, refcountOrder: number): number {
  const blocksPerTableCluster = clusterSize / REFTABLE_ENTRY_SIZE;
  const perBlock = refcountsPerBlock(clusterSize, refcountOrder);
  let table = 0;
  let blocks = 0;
  let total = 0;
  for (;;) {
    const last = total;
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    total = clusters + blocks + table;
    if (total === last) return blocks;
  }
}

/** Where everything of a data-preallocated image goes (cluster indexes). */
export interface PreallocatedLayout {
  /** The refcount table entries (host offsets of the blocks), table-size long. */
  readonly refcountTable: number[];
  /** Refcount blocks made new (cluster indexes, in table order). */
  readonly newBlocks: number[];
  readonly tableCluster: number;
  readonly tableClusters: number;
  /** First data cluster and how many. */
  readonly dataCluster: number;
  readonly dataClusters: number;
  /** The cluster of each L2 table, in L1 order. */
  readonly l2Clusters: number[];
}

/**
 * Plans the layout QEMU gives a new image of `dataClusters` data clusters: `usedClusters` clusters
 * are in use (the last used one is `usedClusters - 1`), the old refcount table lies at
 * `oldTableCluster` (`oldTableClusters` long) and names `oldTable`'s blocks.
 */
export function planPreallocatedLayout(geometry: {
  readonly clusterSize: number;
  readonly refcountOrder: number;
  readonly extendedL2: boolean;
  readonly usedClusters: number;
  readonly oldTable: readonly number[];
  readonly oldTableCluster: number;
  readonly oldTableClusters: number;
  readonly dataClusters: number;
}): PreallocatedLayout {
  const { clusterSize, usedClusters, dataClusters } = geometry;
  const perBlock = refcountsPerBlock(clusterSize, geometry.refcountOrder);
  const entriesPerL2 = clusterSize / l2EntrySize(geometry.extendedL2);
  // One more L2 table than the data needs: QEMU's allowance for an unaligned head or tail.
  const l2Tables = Math.ceil(dataClusters / entriesPerL2);
  const blocks = refcountBlocksCovering(
    usedClusters + dataClusters + l2Tables + 1,
    clusterSize,
    geometry.refcountOrder,
  );
  const entriesPerTableCluster = clusterSize / REFTABLE_ENTRY_SIZE;
  const tableSize = Math.ceil(blocks / entriesPerTableCluster) * entriesPerTableCluster;
  const tableClusters = tableSize / entriesPerTableCluster;
  const refcountTable = new Array<number>(tableSize).fill(0);
  for (let index = 0; index < Math.min(tableSize, geometry.oldTable.length); index++) {
    refcountTable[index] = geometry.oldTable[index]!;
  }
  const newBlocks: number[] = [];
  let next = usedClusters;
  for (let index = Math.floor(usedClusters / perBlock); index < blocks; index++) {
    if (refcountTable[index] !== 0) continue;
    refcountTable[index] = next * clusterSize;
    newBlocks.push(next++);
  }
  const tableCluster = next;
  const dataCluster = tableCluster + tableClusters;
  // L2 tables take the first free clusters: the old table's, then those after the data.
  const l2Clusters: number[] = [];
  for (let index = 0; index < l2Tables; index++) {
    l2Clusters.push(
      index < geometry.oldTableClusters
        ? geometry.oldTableCluster + index
        : dataCluster + dataClusters + index - geometry.oldTableClusters,
    );
  }
  return { refcountTable, newBlocks, tableCluster, tableClusters, dataCluster, dataClusters, l2Clusters };
}

/**
 * Gives a new, empty image (as `writeQcow2Layout` leaves it: no L2 table yet) every data cluster,
 * with its storage allocated in the file: fallocated ('falloc') or written with zeros ('full').
 */
export async function preallocateData(
  file: BlockDevice,
  mode: DataPreallocation,
  options: PreallocateOptions = {},
): Promise<void> {
  if (mode !== 'falloc' && mode !== 'full') {
    throw new BlockDeviceError('EINVAL', `qcow2 preallocate: unknown mode ${String(mode)}`);
  }
  const request: RequestOptions = options.signal === undefined ? {} : { signal: options.signal };
  const header = await loadHeader(file, request);
  const incompatible = header.incompatibleFeatures.low;
  if ((incompatible & QCOW2_INCOMPAT_DATA_FILE) !== 0) {
    throw new BlockDeviceError('EUNSUPPORTED', 'qcow2 preallocate: images with an external data file');
  }
  const extendedL2 = (incompatible & QCOW2_INCOMPAT_EXTL2) !== 0;
  const { clusterSize, refcountOrder } = header;
  const notNew = (why: string, offset: number): never => {
    throw new BlockDeviceError('EINVAL', `qcow2 preallocate: not a new, empty image: ${why}`, { offset });
  };
  if (header.nbSnapshots !== 0) notNew('it has snapshots', 60);
  const l1 = decodeL1Table(await file.read(header.l1TableOffset, header.l1Size * 8, request), header.l1Size);
  for (let index = 0; index < header.l1Size; index++) {
    if (l1EntryOffset(l1.high[index]!, l1.low[index]!) !== 0) {
      notNew('it has L2 tables', header.l1TableOffset + index * 8);
    }
  }
  const dataClusters = sizeToClusters(header.size, clusterSize);

  // The clusters in use: up to the last one with a refcount (QEMU's qcow2_get_last_cluster).
  const tableBytes = await file.read(
    header.refcountTableOffset,
    header.refcountTableClusters * clusterSize,
    request,
  );
  const oldTable = decodeRefcountTable(tableBytes, header.refcountTableOffset).offsets;
  const perBlock = refcountsPerBlock(clusterSize, refcountOrder);
  const blocks = new Map<number, Uint8Array>();
  let usedClusters = 0;
  for (const [index, blockOffset] of oldTable.entries()) {
    if (blockOffset === 0) continue;
    if (blockOffset % clusterSize !== 0 || blockOffset + clusterSize > file.size) {
      throw new BlockDeviceError('ECORRUPT', 'qcow2 preallocate: refcount block out of the file', {
        offset: header.refcountTableOffset + index * 8,
      });
    }
    const block = await file.read(blockOffset, clusterSize, request);
    blocks.set(index, block);
    for (let at = perBlock - 1; at >= 0; at--) {
      if (decodeRefcount(block, at, refcountOrder) !== 0) {
        usedClusters = Math.max(usedClusters, index * perBlock + at + 1);
        break;
      }
    }
  }
  const layout = planPreallocatedLayout({
    clusterSize,
    refcountOrder,
    extendedL2,
    usedClusters,
    oldTable,
    oldTableCluster: header.refcountTableOffset / clusterSize,
    oldTableClusters: header.refcountTableClusters,
    dataClusters,
  });

  // Refcounts: the new blocks and table, the data, the L2 tables (the old table's clusters become
  // L2 tables: their refcount stays 1, or is freed when fewer L2 tables than its clusters).
  const setRefcount = (cluster: number, value: number) => {
    const index = Math.floor(cluster / perBlock);
    let block = blocks.get(index);
    if (block === undefined) {
      block = new Uint8Array(clusterSize);
      blocks.set(index, block);
    }
    encodeRefcount(block, cluster - index * perBlock, refcountOrder, value);
  };
  // Old table clusters no L2 table takes are freed once the header names the new table.
  const freed: number[] = [];
  for (let index = layout.l2Clusters.length; index < header.refcountTableClusters; index++) {
    freed.push(header.refcountTableOffset / clusterSize + index);
  }
  const end = layout.dataCluster + dataClusters;
  for (let cluster = usedClusters; cluster < end; cluster++) setRefcount(cluster, 1);
  for (const cluster of layout.l2Clusters) setRefcount(cluster, 1);

  const table = new Uint8Array(layout.tableClusters * clusterSize);
  const tableView = new DataView(table.buffer);
  for (const [index, offset] of layout.refcountTable.entries()) writeU64(tableView, index * 8, offset);
  const fileEnd = Math.max(end, ...layout.l2Clusters.map((cluster) => cluster + 1)) * clusterSize;
  await file.resize(fileEnd);
  for (const [index, block] of [...blocks].sort(([a], [b]) => a - b)) {
    options.signal?.throwIfAborted();
    await file.write(layout.refcountTable[index]!, block, request);
  }
  await file.write(layout.tableCluster * clusterSize, table, request);
  await file.flush(request);
  const pointer = new Uint8Array(12);
  const pointerView = new DataView(pointer.buffer);
  writeU64(pointerView, 0, layout.tableCluster * clusterSize);
  pointerView.setUint32(8, layout.tableClusters);
  await file.write(HEADER_REFCOUNT_TABLE_OFFSET, pointer, request);
  await file.flush(request);
  if (freed.length > 0) {
    const touched = new Set<number>();
    for (const cluster of freed) {
      setRefcount(cluster, 0);
      touched.add(Math.floor(cluster / perBlock));
    }
    for (const index of touched) await file.write(layout.refcountTable[index]!, blocks.get(index)!, request);
    await file.flush(request);
  }

  // The data area, zeros on disk.
  const dataOffset = layout.dataCluster * clusterSize;
  const total = dataClusters * clusterSize;
  options.onProgress?.(0, total);
  const zeros = mode === 'full' ? new Uint8Array(Math.min(ZERO_CHUNK, total)) : undefined;
  for (let done = 0; done < total; ) {
    options.signal?.throwIfAborted();
    const length = Math.min(ZERO_CHUNK, total - done);
    if (zeros === undefined) await file.writeZeroes(dataOffset + done, length, request);
    else await file.write(dataOffset + done, zeros.subarray(0, length), request);
    done += length;
    options.onProgress?.(done, total);
  }
  await file.flush(request);

  // L2 tables, then the L1 table.
  const entryBytes = l2EntrySize(extendedL2);
  const entriesPerL2 = clusterSize / entryBytes;
  const l1Bytes = new Uint8Array(header.l1Size * 8);
  const l1View = new DataView(l1Bytes.buffer);
  const l2 = new Uint8Array(clusterSize);
  const l2View = new DataView(l2.buffer);
  for (const [l1Index, l2Cluster] of layout.l2Clusters.entries()) {
    const first = l1Index * entriesPerL2;
    if (first >= dataClusters) break;
    options.signal?.throwIfAborted();
    l2.fill(0);
    const count = Math.min(entriesPerL2, dataClusters - first);
    for (let index = 0; index < count; index++) {
      const { high, low } = encodeL2Entry({
        type: 'normal',
        hostOffset: dataOffset + (first + index) * clusterSize,
        copied: true,
      });
      l2View.setUint32(index * entryBytes, high);
      l2View.setUint32(index * entryBytes + 4, low);
    }
    await file.write(l2Cluster * clusterSize, l2, request);
    const entry = encodeL1Entry({ l2Offset: l2Cluster * clusterSize, copied: true });
    l1View.setUint32(l1Index * 8, entry.high);
    l1View.setUint32(l1Index * 8 + 4, entry.low);
  }
  await file.flush(request);
  if (l1Bytes.length > 0) {
    await file.write(header.l1TableOffset, l1Bytes, request);
    await file.flush(request);
  }
}
