/**
 * Conversion to a sink that can write at any offset (a file): the data is read once. The front
 * metadata (header, refcount table, refcount blocks, L1) is sized for the most the source can
 * need (its block-status data), data clusters follow in guest order as they are read (all-zero
 * ones dropped), each L2 table right after its data; the L1 table and the refcount blocks are
 * written into their reserved place at the end. Refcount blocks beyond the need stay empty.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { encodeL2Entry, QCOW_MAX_REFTABLE_SIZE, refcountClusters, viewOf } from '@qcowkit/qcow2-core/format';
import { ClusterMap } from './cluster-map.js';
import { chunkPipeline } from './direct-pipeline.js';
import type { Qcow2Layout } from './layout.js';
import { encodeImageHeader, encodeL1Slice, encodeRefcountBlock, encodeRefcountTable } from './metadata.js';
import type { ImageGeometry } from './options.js';
import { type ClusterRange, splitRange } from './read-ahead.js';
import { nonZeroClusters } from './scan.js';
import { isZeroWords } from './zero-detect.js';

/** A sink writing at explicit offsets. */
export interface RandomAccessSink {
  /** Resolves once `bytes` is written (or copied): the caller reuses the buffer only after that.
   * Calls may overlap; the caller bounds how many are in flight. */
  writeAt(hostOffset: number, bytes: Uint8Array): Promise<void>;
  /** Sets the final length and closes. */
  close(length: number): Promise<void>;
  abort(): Promise<void>;
}

export interface DirectConvertOptions {
  readonly readDepth: number;
  readonly chunkBytes: number;
  readonly signal: AbortSignal | undefined;
  /** Called as the source is consumed: bytes done and in all (block-status data). */
  readonly onProgress?: ((done: number, total: number) => void) | undefined;
}

/** Front metadata of a read-once conversion, sized for the most the candidates can need. */
export interface DirectFront {
  /** L2 tables the candidates touch, ascending. */
  readonly tables: number[];
  readonly candidateClusters: number;
  readonly l1Bytes: number;
  readonly l1Clusters: number;
  readonly reftableClusters: number;
  readonly refblockCount: number;
  readonly refblockOffset: number;
  readonly l1Offset: number;
}

/**
 * Sizes the refcount table and blocks for everything a conversion of `candidates` may allocate
 * (header, refcount structures, L1, one L2 table per table touched, every candidate cluster).
 */
export function planDirectFront(geometry: ImageGeometry, candidates: readonly ClusterRange[]): DirectFront {
  const { clusterSize, l2Entries } = geometry;
  let candidateClusters = 0;
  const tables: number[] = [];
  for (const range of candidates) {
    candidateClusters += range.count;
    let table = Math.floor(range.cluster / l2Entries);
    if (tables.length > 0 && tables[tables.length - 1]! >= table) table = tables[tables.length - 1]! + 1;
    for (; table * l2Entries < range.cluster + range.count; table++) tables.push(table);
  }
  const l1Bytes = geometry.l1Size * 8;
  const l1Clusters = Math.ceil(l1Bytes / clusterSize);
  const { reftableClusters, refblockCount } = refcountClusters(
    clusterSize,
    geometry.refcountOrder,
    l1Clusters + tables.length + candidateClusters,
  );
  if (reftableClusters * clusterSize > QCOW_MAX_REFTABLE_SIZE) {
    throw new BlockDeviceError('EINVAL', 'qcow2 writer: the image needs a refcount table above 8 MiB');
  }
  const refblockOffset = (1 + reftableClusters) * clusterSize;
  const l1Offset = refblockOffset + refblockCount * clusterSize;
  return {
    tables,
    candidateClusters,
    l1Bytes,
    l1Clusters,
    reftableClusters,
    refblockCount,
    refblockOffset,
    l1Offset,
  };
}

/** `candidates` in chunks of at most `chunkClusters`, none spanning two L2 tables. */
export function* tableChunks(
  candidates: readonly ClusterRange[],
  l2Entries: number,
  chunkClusters: number,
): Generator<ClusterRange> {
  for (const range of candidates) {
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

/** A layout the direct conversions fill in as they go. */
export type DirectLayout = { -readonly [K in keyof Qcow2Layout]: Qcow2Layout[K] } & {
  readonly groupL1Index: number[];
  readonly groupL2Offset: number[];
  readonly groupHostClusters: number[];
};

/**
 * Checks that `geometry` holds all of `source` and scans the source's block status: the cluster
 * ranges that may hold data (within the image's size), in guest order.
 */
export async function directCandidates(
  source: BlockDevice,
  geometry: ImageGeometry,
  signal: AbortSignal | undefined,
): Promise<ClusterRange[]> {
  if (geometry.size < source.size) {
    throw new BlockDeviceError(
      'EINVAL',
      `qcow2 convert: size ${geometry.size} is smaller than the source (${source.size} bytes)`,
    );
  }
  return nonZeroClusters(source, Math.min(source.size, geometry.size), geometry.clusterSize, signal);
}

/** The layout of a direct conversion with `front`, no L2 table placed yet and no size set. */
export function directLayout(geometry: ImageGeometry, front: DirectFront): DirectLayout {
  return {
    geometry,
    map: new ClusterMap(),
    reftableOffset: geometry.clusterSize,
    reftableClusters: front.reftableClusters,
    refblockOffset: front.refblockOffset,
    refblockCount: front.refblockCount,
    l1Offset: front.l1Offset,
    l1Bytes: front.l1Bytes,
    groupL1Index: [],
    groupL2Offset: [],
    groupHostClusters: [],
    compressed: undefined,
    totalClusters: 0,
    fileSize: 0,
  };
}

/** Writes the header and the refcount table of `layout` (their content is known up front). */
export async function writeDirectHead(sink: RandomAccessSink, layout: DirectLayout): Promise<void> {
  await sink.writeAt(0, encodeImageHeader(layout));
  await sink.writeAt(layout.reftableOffset, encodeRefcountTable(layout));
}

/** Writes the L1 table of the finished `layout` into its reserved place, 1 MiB at a time. */
export async function writeDirectL1(sink: RandomAccessSink, layout: DirectLayout): Promise<void> {
  const { l1Offset, l1Bytes } = layout;
  for (let from = 0; from < l1Bytes; from += 1024 * 1024) {
    const slice = encodeL1Slice(layout, from, Math.min(l1Bytes, from + 1024 * 1024));
    await sink.writeAt(l1Offset + from, slice);
  }
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
  const candidates = await directCandidates(source, geometry, signal);
  const front = planDirectFront(geometry, candidates);
  const { l1Bytes, l1Clusters, refblockCount, refblockOffset, l1Offset } = front;
  const totalBytes = front.candidateClusters * clusterSize;
  let doneBytes = 0;
  options.onProgress?.(0, totalBytes);
  const layout = directLayout(geometry, front);
  const { groupL1Index, groupL2Offset, groupHostClusters } = layout;

  try {
    await writeDirectHead(sink, layout);
    let failure: unknown;
    const noteFailure = (error: unknown) => {
      failure ??= error;
    };
    const tableWrites: Promise<void>[] = [];
    let cursor = l1Offset + l1Clusters * clusterSize;
    let table: Uint8Array | undefined;
    let tableIndex = -1;
    const finishTable = async () => {
      if (table === undefined) return;
      groupL1Index.push(tableIndex);
      groupL2Offset.push(cursor);
      groupHostClusters.push(0);
      tableWrites.push(sink.writeAt(cursor, table).catch(noteFailure));
      cursor += clusterSize;
      table = undefined;
    };
    const chunkClusters = Math.max(1, Math.floor(options.chunkBytes / clusterSize));
    // Bounded pipeline over `depth` reusable buffers: reads run ahead in guest order, and a
    // buffer is read into again only once every write from its previous chunk is done.
    const depth = Math.max(1, options.readDepth);
    const slots = Array.from({ length: depth }, () => {
      const buffer = new Uint8Array(chunkClusters * clusterSize);
      return { buffer, words: new Uint32Array(buffer.buffer), writes: Promise.resolve() };
    });
    const chunks = chunkPipeline(tableChunks(candidates, l2Entries, chunkClusters), slots, (slot, range) =>
      readChunk(source, slot.buffer, range, clusterSize, signal),
    );
    const wordsPerCluster = clusterSize / 4;
    for await (const { range, slot } of chunks) {
      signal?.throwIfAborted();
      if (failure !== undefined) throw failure;
      const chunkTable = Math.floor(range.cluster / l2Entries);
      if (chunkTable !== tableIndex) {
        await finishTable();
        tableIndex = chunkTable;
      }
      const writes: Promise<void>[] = [];
      let runStart = -1;
      const flushRun = (end: number) => {
        if (runStart < 0) return;
        writes.push(sink.writeAt(cursor, slot.buffer.subarray(runStart * clusterSize, end * clusterSize)));
        table ??= new Uint8Array(clusterSize);
        const view = viewOf(table);
        for (let index = runStart; index < end; index++) {
          const entry = encodeL2Entry({ type: 'normal', hostOffset: cursor, copied: true });
          const at = ((range.cluster + index) % l2Entries) * l2EntrySize;
          view.setUint32(at, entry.high);
          view.setUint32(at + 4, entry.low);
          if (extendedL2) view.setUint32(at + 12, 0xffffffff);
          cursor += clusterSize;
        }
        runStart = -1;
      };
      const words = slot.words;
      for (let index = 0; index < range.count; index++) {
        if (isZeroWords(words, index * wordsPerCluster, (index + 1) * wordsPerCluster)) flushRun(index);
        else if (runStart < 0) runStart = index;
      }
      flushRun(range.count);
      slot.writes = Promise.all(writes).then(() => {}, noteFailure);
      doneBytes += range.count * clusterSize;
      options.onProgress?.(doneBytes, totalBytes);
    }
    await Promise.all(slots.map((slot) => slot.writes));
    await finishTable();
    await Promise.all(tableWrites);
    if (failure !== undefined) throw failure;
    layout.totalClusters = cursor / clusterSize;
    layout.fileSize =
      cursor === l1Offset + l1Clusters * clusterSize && groupL1Index.length === 0
        ? l1Offset + l1Bytes
        : cursor;
    await writeDirectL1(sink, layout);
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

/** Reads clusters `range` of `device` into the start of `buffer` (zeros past the device's end). */
export function readChunk(
  device: BlockDevice,
  buffer: Uint8Array,
  range: ClusterRange,
  clusterSize: number,
  signal: AbortSignal | undefined,
): Promise<void> {
  const length = range.count * clusterSize;
  const start = range.cluster * clusterSize;
  const valid = Math.max(0, Math.min(length, device.size - start));
  if (valid < length) buffer.fill(0, valid, length);
  return valid > 0 ? device.readInto(buffer.subarray(0, valid), start, { signal }) : Promise.resolve();
}
