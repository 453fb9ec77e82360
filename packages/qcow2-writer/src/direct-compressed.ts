/**
 * Compressed conversion to a sink that can write at any offset (a file), in one pass over the
 * source with a fixed set of buffers:
 *
 *   header, refcount table, refcount blocks, L1    sized for the most the source can need
 *   one reserved L2 table per table block status touches
 *   the compressed area                              clusters packed in guest order as they come
 *
 * Each chunk is read into one of `depth` buffers, its all-zero clusters dropped, the rest moved to
 * the front and compressed (on worker threads with the node entry's pool, which hands the buffer
 * back with the outputs in a second reusable buffer). Results are placed in guest order, runs of
 * adjacent outputs written with one positioned write, and each L2 table is written into its
 * reserved cluster once the conversion has passed it. The L1 table and the refcount blocks are
 * filled in at the end. Reserved L2 clusters that no data needed keep a refcount of 0.
 *
 * Memory: `depth` x 2 x `chunkBytes` of buffers, one L2 table, and 4 bytes per host cluster of the
 * compressed area (its refcounts), whatever the guest size.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import {
  encodeCompressedDescriptor,
  encodeL2Entry,
  encodeRefcount,
  maxRefcount,
  refcountsPerBlock,
  viewOf,
} from '@qcowkit/qcow2-core/format';
import { CompressedPacker } from './compressed-packing.js';
import { batchOutputs, type ClusterCompressor, type CompressionType } from './compressor.js';
import {
  directCandidates,
  directLayout,
  planDirectFront,
  type RandomAccessSink,
  readChunk,
  tableChunks,
  writeDirectHead,
  writeDirectL1,
} from './direct-convert.js';
import { chunkPipeline } from './direct-pipeline.js';
import type { ImageGeometry } from './options.js';
import type { ClusterRange } from './read-ahead.js';
import { isZeroWords } from './zero-detect.js';

export interface DirectCompressOptions {
  readonly compressor: ClusterCompressor;
  /** Chunks in flight (read, being compressed, or being written). */
  readonly depth: number;
  readonly chunkBytes: number;
  readonly signal: AbortSignal | undefined;
  readonly onProgress?: ((done: number, total: number) => void) | undefined;
}

interface Slot {
  input: Uint8Array;
  scratch: ArrayBuffer | SharedArrayBuffer;
  /** Guest cluster (within the chunk) of each cluster moved to the front of `input`. */
  readonly kept: Int32Array;
  writes: Promise<void>;
}

interface Compressed {
  readonly keptCount: number;
  /** One stored form per kept cluster: compressed, or the cluster itself (`clusterSize` long). */
  readonly outputs: Uint8Array[];
}

/** Converts `source` into `sink` with every data cluster compressed; resolves with the file length. */
export async function convertDirectCompressed(
  source: BlockDevice,
  geometry: ImageGeometry,
  sink: RandomAccessSink,
  options: DirectCompressOptions,
): Promise<number> {
  const { clusterSize, clusterBits, l2Entries, l2EntrySize, extendedL2 } = geometry;
  const type: CompressionType = geometry.compressionType;
  const { compressor, signal } = options;
  const candidates = await directCandidates(source, geometry, signal);
  const front = planDirectFront(geometry, candidates);
  const { tables, l1Offset, l1Bytes, l1Clusters, refblockCount, refblockOffset } = front;
  const l2RegionOffset = l1Offset + l1Clusters * clusterSize;
  const areaOffset = l2RegionOffset + tables.length * clusterSize;
  const totalBytes = front.candidateClusters * clusterSize;
  let doneBytes = 0;
  options.onProgress?.(0, totalBytes);

  const layout = directLayout(geometry, front);
  const { groupL1Index, groupL2Offset } = layout;

  // Refcounts of the compressed area's host clusters (several compressed clusters may share one).
  let areaRefcounts = new Uint32Array(Math.max(16, front.candidateClusters + 2));
  const packer = new CompressedPacker(clusterSize, maxRefcount(geometry.refcountOrder), (cluster) => {
    if (cluster >= areaRefcounts.length) {
      const grown = new Uint32Array(Math.max(cluster + 1, areaRefcounts.length * 2));
      grown.set(areaRefcounts);
      areaRefcounts = grown;
    }
    areaRefcounts[cluster]!++;
  });

  try {
    await writeDirectHead(sink, layout);
    let failure: unknown;
    const noteFailure = (error: unknown) => {
      failure ??= error;
    };
    const tableWrites: Promise<void>[] = [];
    let table: Uint8Array | undefined;
    let tableIndex = -1;
    let tableSlot = 0; // index into `tables` of `tableIndex`
    const finishTable = () => {
      if (table === undefined) return;
      while (tables[tableSlot]! < tableIndex) tableSlot++;
      const l2Offset = l2RegionOffset + tableSlot * clusterSize;
      groupL1Index.push(tableIndex);
      groupL2Offset.push(l2Offset);
      tableWrites.push(sink.writeAt(l2Offset, table).catch(noteFailure));
      table = undefined;
    };

    const chunkClusters = Math.max(1, Math.floor(options.chunkBytes / clusterSize));
    const chunkLength = chunkClusters * clusterSize;
    const depth = Math.max(2, options.depth);
    // Shared memory where there is some: a worker pool then compresses in place, nothing moves
    // between threads (transferring buffers back and forth cost about 200 MiB of resident memory).
    const memory = (length: number) =>
      typeof SharedArrayBuffer === 'function' ? new SharedArrayBuffer(length) : new ArrayBuffer(length);
    const slots: Slot[] = Array.from({ length: depth }, () => ({
      input: new Uint8Array(memory(chunkLength)),
      scratch: memory(chunkLength),
      kept: new Int32Array(chunkClusters),
      writes: Promise.resolve(),
    }));
    const wordsPerCluster = clusterSize / 4;

    /** Reads `range` into `slot`, drops its zero clusters and compresses the rest. */
    const prepare = async (slot: Slot, range: ClusterRange): Promise<Compressed> => {
      await readChunk(source, slot.input, range, clusterSize, signal);
      const input = slot.input;
      const words = new Uint32Array(input.buffer, input.byteOffset, input.length >>> 2);
      let keptCount = 0;
      for (let index = 0; index < range.count; index++) {
        if (isZeroWords(words, index * wordsPerCluster, (index + 1) * wordsPerCluster)) continue;
        if (keptCount !== index)
          input.copyWithin(keptCount * clusterSize, index * clusterSize, (index + 1) * clusterSize);
        slot.kept[keptCount++] = index;
      }
      if (keptCount === 0) return { keptCount, outputs: [] };
      const length = keptCount * clusterSize;
      if (compressor.compressBatch !== undefined) {
        const batch = await compressor.compressBatch(input, clusterSize, type, slot.scratch, length);
        slot.input = batch.input.length >= chunkLength ? batch.input : new Uint8Array(chunkLength);
        if (batch.output.buffer.byteLength >= chunkLength) slot.scratch = batch.output.buffer;
        return { keptCount, outputs: batchOutputs(batch.output, batch.lengths) };
      }
      // A plain ClusterCompressor takes its input over: give it a copy, keep the buffer.
      return {
        keptCount,
        outputs: await compressor.compressClusters(input.slice(0, length), clusterSize, type),
      };
    };

    const chunks = chunkPipeline(tableChunks(candidates, l2Entries, chunkClusters), slots, prepare);
    for await (const { range, slot, result } of chunks) {
      const { keptCount, outputs } = result;
      signal?.throwIfAborted();
      if (failure !== undefined) throw failure;
      if (outputs.length !== keptCount) {
        throw new BlockDeviceError(
          'EIO',
          `qcow2 compress: ${outputs.length} outputs for ${keptCount} clusters (at guest cluster ${range.cluster})`,
        );
      }
      const chunkTable = Math.floor(range.cluster / l2Entries);
      if (chunkTable !== tableIndex) {
        finishTable();
        tableIndex = chunkTable;
      }
      const writes: Promise<void>[] = [];
      // Runs of outputs adjacent both in memory and in the file go out as one write.
      let runBytes: Uint8Array | undefined;
      let runOffset = 0;
      const flushRun = () => {
        if (runBytes !== undefined) writes.push(sink.writeAt(runOffset, runBytes));
        runBytes = undefined;
      };
      for (let at = 0; at < keptCount; at++) {
        const stored = outputs[at]!;
        if (stored.length > clusterSize || stored.length === 0) {
          throw new BlockDeviceError('EIO', `qcow2 compress: an output of ${stored.length} bytes`);
        }
        const placed = packer.place(stored.length);
        const hostOffset = areaOffset + placed.offset;
        table ??= new Uint8Array(clusterSize);
        const view = viewOf(table);
        const entryAt = ((range.cluster + slot.kept[at]!) % l2Entries) * l2EntrySize;
        const entry = placed.compressed
          ? encodeCompressedDescriptor(hostOffset, stored.length, clusterBits)
          : encodeL2Entry({ type: 'normal', hostOffset, copied: true });
        view.setUint32(entryAt, entry.high);
        view.setUint32(entryAt + 4, entry.low);
        if (extendedL2 && !placed.compressed) view.setUint32(entryAt + 12, 0xffffffff);
        if (
          runBytes !== undefined &&
          runOffset + runBytes.length === hostOffset &&
          runBytes.buffer === stored.buffer &&
          runBytes.byteOffset + runBytes.length === stored.byteOffset
        ) {
          runBytes = new Uint8Array(runBytes.buffer, runBytes.byteOffset, runBytes.length + stored.length);
        } else {
          flushRun();
          runBytes = stored;
          runOffset = hostOffset;
        }
      }
      flushRun();
      slot.writes = Promise.all(writes).then(() => {}, noteFailure);
      doneBytes += range.count * clusterSize;
      options.onProgress?.(doneBytes, totalBytes);
    }
    await Promise.all(slots.map((slot) => slot.writes));
    finishTable();
    await Promise.all(tableWrites);
    if (failure !== undefined) throw failure;

    const packedEnd = packer.end;
    let fileSize = l1Offset + l1Bytes;
    if (groupL2Offset.length > 0) fileSize = Math.max(fileSize, groupL2Offset.at(-1)! + clusterSize);
    if (packedEnd > 0) fileSize = areaOffset + packedEnd;
    layout.fileSize = fileSize;
    layout.totalClusters = Math.ceil(fileSize / clusterSize);

    await writeDirectL1(sink, layout);
    // Refcounts: 1 for the front metadata and the L2 tables in use, the packing's for the area.
    const usedTables = new Set(groupL2Offset.map((offset) => offset / clusterSize));
    const l2RegionCluster = l2RegionOffset / clusterSize;
    const areaCluster = areaOffset / clusterSize;
    const perBlock = refcountsPerBlock(clusterSize, geometry.refcountOrder);
    for (let block = 0; block < refblockCount; block++) {
      const bytes = new Uint8Array(clusterSize);
      const first = block * perBlock;
      const end = Math.min(first + perBlock, layout.totalClusters);
      for (let cluster = first; cluster < end; cluster++) {
        let refcount: number;
        if (cluster < l2RegionCluster) refcount = 1;
        else if (cluster < areaCluster) refcount = usedTables.has(cluster) ? 1 : 0;
        else refcount = areaRefcounts[cluster - areaCluster] ?? 0;
        if (refcount !== 0) encodeRefcount(bytes, cluster - first, geometry.refcountOrder, refcount);
      }
      await sink.writeAt(refblockOffset + block * clusterSize, bytes);
    }
    await sink.close(fileSize);
    return fileSize;
  } catch (error) {
    await sink.abort();
    throw error;
  }
}
