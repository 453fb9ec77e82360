/**
 * Conversion to a sink that can write at any offset (a file): the data is read once. The front
 * metadata (header, refcount table, refcount blocks, L1) is sized for the most the source can
 * need (its block-status data), data clusters follow in guest order as they are read (all-zero
 * ones dropped), each L2 table right after its data; the L1 table and the refcount blocks are
 * written into their reserved place at the end. Refcount blocks beyond the need stay empty.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { encodeL2Entry, QCOW_MAX_REFTABLE_SIZE, refcountsPerBlock, viewOf } from '@qcowkit/qcow2-core';
import { ClusterMap } from './cluster-map.js';
import type { Qcow2Layout } from './layout.js';
import { encodeImageHeader, encodeL1Slice, encodeRefcountBlock, encodeRefcountTable } from './metadata.js';
import type { ImageGeometry } from './options.js';
import { type ClusterRange, readAhead, splitRange } from './read-ahead.js';
import { nonZeroClusters, readClusters } from './scan.js';
import { isAllZero } from './zero-detect.js';

/** A sink writing at explicit offsets. */
export interface RandomAccessSink {
  writeAt(hostOffset: number, bytes: Uint8Array): Promise<void>;
  /** Sets the final length and closes. */
  close(length: number): Promise<void>;
  abort(): Promise<void>;
}

export interface DirectConvertOptions {
  readonly readDepth: number;
  readonly chunkBytes: number;
  readonly signal: AbortSignal | undefined;
}

/** Converts `source` into `sink`; resolves with the file length. */
export async function convertDirect(
  source: BlockDevice,
  geometry: ImageGeometry,
  sink: RandomAccessSink,
  options: DirectConvertOptions,
): Promise<number> {
  const { clusterSize, l2Entries, l2EntrySize, extendedL2 } = geometry;
  const signal = options.signal;
  if (geometry.size < source.size) {
    throw new BlockDeviceError(
      'EINVAL',
      `qcow2 convert: size ${geometry.size} is smaller than the source (${source.size} bytes)`,
    );
  }
  const candidates = await nonZeroClusters(source, Math.min(source.size, geometry.size), clusterSize, signal);
  let candidateClusters = 0;
  const tables = new Set<number>();
  for (const range of candidates) {
    candidateClusters += range.count;
    for (
      let table = Math.floor(range.cluster / l2Entries);
      table * l2Entries < range.cluster + range.count;
      table++
    ) {
      tables.add(table);
    }
  }
  // Front metadata sized for the upper bound.
  const l1Bytes = geometry.l1Size * 8;
  const l1Clusters = Math.ceil(l1Bytes / clusterSize);
  const perBlock = refcountsPerBlock(clusterSize, geometry.refcountOrder);
  let reftableClusters = 1;
  let refblockCount = 1;
  for (;;) {
    const total = 1 + reftableClusters + refblockCount + l1Clusters + tables.size + candidateClusters;
    const blocks = Math.ceil(total / perBlock);
    const table = Math.ceil((blocks * 8) / clusterSize);
    if (blocks <= refblockCount && table <= reftableClusters) break;
    refblockCount = Math.max(blocks, refblockCount);
    reftableClusters = Math.max(table, reftableClusters);
  }
  if (reftableClusters * clusterSize > QCOW_MAX_REFTABLE_SIZE) {
    throw new BlockDeviceError('EINVAL', 'qcow2 writer: the image needs a refcount table above 8 MiB');
  }
  const refblockOffset = (1 + reftableClusters) * clusterSize;
  const l1Offset = refblockOffset + refblockCount * clusterSize;
  const groupL1Index: number[] = [];
  const groupL2Offset: number[] = [];
  const groupHostClusters: number[] = [];
  const layout = {
    geometry,
    map: new ClusterMap(),
    reftableOffset: clusterSize,
    reftableClusters,
    refblockOffset,
    refblockCount,
    l1Offset,
    l1Bytes,
    groupL1Index,
    groupL2Offset,
    groupHostClusters,
    compressed: undefined,
    totalClusters: 0,
    fileSize: 0,
  } satisfies Qcow2Layout as { -readonly [K in keyof Qcow2Layout]: Qcow2Layout[K] };

  try {
    await sink.writeAt(0, encodeImageHeader(layout));
    await sink.writeAt(layout.reftableOffset, encodeRefcountTable(layout));
    let cursor = l1Offset + l1Clusters * clusterSize;
    let table: Uint8Array | undefined;
    let tableIndex = -1;
    const finishTable = async () => {
      if (table === undefined) return;
      groupL1Index.push(tableIndex);
      groupL2Offset.push(cursor);
      groupHostClusters.push(0);
      await sink.writeAt(cursor, table);
      cursor += clusterSize;
      table = undefined;
    };
    const chunkClusters = Math.max(1, Math.floor(options.chunkBytes / clusterSize));
    function* chunks(): Generator<ClusterRange> {
      for (const range of candidates) {
        // Never let a chunk span two L2 tables.
        let start = range.cluster;
        const end = range.cluster + range.count;
        while (start < end) {
          const tableEnd = (Math.floor(start / l2Entries) + 1) * l2Entries;
          const piece = Math.min(end, tableEnd) - start;
          yield* splitRange(start, piece, chunkClusters);
          start += piece;
        }
      }
    }
    const fetch = (range: ClusterRange) => readClusters(source, range, clusterSize, signal);
    for await (const { item: range, result: data } of readAhead(chunks(), options.readDepth, fetch)) {
      signal?.throwIfAborted();
      const chunkTable = Math.floor(range.cluster / l2Entries);
      if (chunkTable !== tableIndex) {
        await finishTable();
        tableIndex = chunkTable;
      }
      let runStart = -1;
      const flushRun = async (end: number) => {
        if (runStart < 0) return;
        await sink.writeAt(cursor, data.subarray(runStart * clusterSize, end * clusterSize));
        for (let index = runStart; index < end; index++) {
          table ??= new Uint8Array(clusterSize);
          const entry = encodeL2Entry({ type: 'normal', hostOffset: cursor, copied: true });
          const at = ((range.cluster + index) % l2Entries) * l2EntrySize;
          const view = viewOf(table);
          view.setUint32(at, entry.high);
          view.setUint32(at + 4, entry.low);
          if (extendedL2) view.setUint32(at + 12, 0xffffffff);
          cursor += clusterSize;
        }
        runStart = -1;
      };
      for (let index = 0; index < range.count; index++) {
        const zero = isAllZero(data.subarray(index * clusterSize, (index + 1) * clusterSize));
        if (zero) await flushRun(index);
        else if (runStart < 0) runStart = index;
      }
      await flushRun(range.count);
    }
    await finishTable();
    layout.totalClusters = cursor / clusterSize;
    layout.fileSize =
      cursor === l1Offset + l1Clusters * clusterSize && groupL1Index.length === 0
        ? l1Offset + l1Bytes
        : cursor;
    for (let from = 0; from < l1Bytes; from += 1024 * 1024) {
      const slice = encodeL1Slice(layout, from, Math.min(l1Bytes, from + 1024 * 1024));
      await sink.writeAt(l1Offset + from, slice);
    }
    for (let block = 0; block < refblockCount; block++) {
      await sink.writeAt(refblockOffset + block * clusterSize, encodeRefcountBlock(layout, block));
    }
    await sink.close(layout.fileSize);
    return layout.fileSize;
  } catch (error) {
    await sink.abort();
    throw error;
  }
}
