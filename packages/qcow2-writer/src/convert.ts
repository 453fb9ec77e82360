/**
 * Conversion to qcow2 in one forward pass over the output.
 *
 * Seekable sources (any BlockDevice): a scan pass (block status, then the data, for zero detection,
 * backing comparison and compressed sizes) fixes the whole layout; the writing pass then emits
 * metadata first and data in host order, reading (and compressing) again only what the scan could
 * not keep within `cacheBytes`. The output size is known before the first byte, compressed or not.
 *
 * Raw streams (read once): nothing can be known ahead, so every cluster is stored (a fully
 * allocated image, zero clusters included); compression and zero detection need a seekable source.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { maxRefcount } from '@qcowkit/qcow2-core/format';
import { ClusterMap } from './cluster-map.js';
import { CompressedPacker } from './compressed-packing.js';
import type { ClusterCompressor } from './compressor.js';
import type { RandomAccessSink } from './direct-convert.js';
import { emitImage } from './emit.js';
import { planLayout, type Qcow2Layout } from './layout.js';
import { type Qcow2ImageOptions, resolveGeometry } from './options.js';
import { type ClusterRange, readAhead, splitRange } from './read-ahead.js';
import { type CachedChunk, clustersWhere, readClusters, SHARED_SLOTS, scanSource } from './scan.js';
import { SharedCompression } from './shared-compression.js';
import { OutputWriter, type Qcow2Sink, toByteSink } from './sink.js';
import { type ConvertSource, isBlockDevice, StreamReader } from './source.js';
import { sparseDataClusters, sparseMode, validateSparseSize } from './sparse.js';
import type { Spool } from './spool.js';
import { isAllZero, isZeroWords } from './zero-detect.js';

export interface ConvertOptions extends Qcow2ImageOptions {
  /** Store data clusters compressed (qemu-img convert -c). Needs `compressor`. */
  readonly compress?: boolean;
  /** Does the compression (the node entry supplies a worker-thread pool by default). */
  readonly compressor?: ClusterCompressor;
  /** Compressions in flight (default 2 per worker, 8). */
  readonly compressDepth?: number;
  /** A device to compare against (qemu-img convert -B): clusters equal to it are not stored. Name
   * it in the header with `backingFile` (and `backingFormat`). */
  readonly backing?: BlockDevice;
  /** Drop clusters that read as all zeros (default true). */
  readonly detectZeroes?: boolean;
  /**
   * qemu-img convert's `-S`: the least run of zero bytes (a multiple of 512, up to 16 MiB) left
   * out of the image; shorter runs between data are stored with it. `0` stores every cluster of
   * the source as data, holes and zeros included (a fully allocated image; with `compress`,
   * every cluster compressed). Unset, or at most the cluster size: every cluster that reads as
   * zeros is left out (the default, qemu-img's `-S 4k` for clusters of 4 KiB and more). Above the
   * cluster size the source's data is read in qemu-img's pieces (see `sparse.ts`) and the
   * clusters its writes would touch are stored, as real bytes. Compressed conversions test whole
   * clusters whatever the size (as qemu-img), unless 0. With `backing`, only 0 applies: every
   * cluster the source's top layer answers for (block status depth 0) is stored, the rest left
   * to the backing file, as qemu-img does; other sizes keep the backing comparison.
   */
  readonly sparseSize?: number;
  /** The source's cluster size when it has one (a qcow2 image): with `sparseSize` above the
   * cluster size, qemu-img ends the source's block-status runs on its cluster boundaries, which
   * moves where its 2 MiB pieces start. Default 512 (a raw source). */
  readonly sourceClusterSize?: number;
  /** Memory the scan may keep to avoid reading twice (default 16 MiB). */
  readonly cacheBytes?: number;
  /** Compressed clusters beyond `cacheBytes` are kept here instead of compressed again (the node
   * entry uses a temporary file by default). */
  readonly spool?: Spool;
  /** Reads in flight (default 4) and their size (default 4 MiB). */
  readonly readDepth?: number;
  readonly chunkBytes?: number;
  readonly signal?: AbortSignal;
  /** Called as the conversion advances, with work done and work in all (in bytes of source data;
   * a conversion that reads the source twice counts both passes). */
  readonly onProgress?: (done: number, total: number) => void;
  /** Where the data goes when the image has an external data file (`dataFile`): data clusters are
   * written at their guest offsets, and the sink is closed at the guest size. The node entry opens
   * `dataFile` (or `dataFilePath`) when none is given. */
  readonly dataSink?: RandomAccessSink;
}

/** A conversion whose layout is fixed: its exact output size is known before writing. */
export interface ConversionPlan {
  readonly layout: Qcow2Layout;
  /** Exact length of the output in bytes. */
  readonly fileSize: number;
  /** Writes the image to `sink` and closes it. Call once. */
  write(sink: Qcow2Sink): Promise<number>;
}

const DEFAULT_CACHE_BYTES = 16 * 1024 * 1024;
const DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024;

/** Plans a conversion of `source` (running the scan pass for a seekable source). */
export async function planConversion(
  source: ConvertSource,
  options: ConvertOptions = {},
): Promise<ConversionPlan> {
  const size = options.size ?? source.size;
  if (size < source.size) {
    throw new BlockDeviceError(
      'EINVAL',
      `qcow2 convert: size ${size} is smaller than the source (${source.size} bytes)`,
    );
  }
  const geometry = resolveGeometry(options, size);
  const externalData = geometry.dataFile !== undefined;
  if (externalData && options.compress) {
    throw new BlockDeviceError(
      'EINVAL',
      'qcow2 convert: compressed clusters cannot be stored in an external data file',
    );
  }
  if (externalData && options.dataSink === undefined) {
    throw new BlockDeviceError(
      'EINVAL',
      'qcow2 convert: an external data file needs a data sink (the node entry opens the file)',
    );
  }
  // As QEMU does: a raw data file must read as the guest, so every cluster is mapped.
  const preallocation = geometry.dataFileRaw ? 'metadata' : geometry.preallocation;
  if (options.compress && geometry.preallocation !== 'off') {
    throw new BlockDeviceError('EINVAL', 'qcow2 convert: compression cannot be combined with preallocation');
  }
  const compressor = options.compress ? options.compressor : undefined;
  if (options.compress && compressor === undefined) {
    throw new BlockDeviceError(
      'EUNSUPPORTED',
      'qcow2 convert: compression needs a compressor (the node entry has one)',
    );
  }
  if (options.sparseSize !== undefined) validateSparseSize(options.sparseSize);
  const readDepth = options.readDepth ?? 4;
  // Compressed batches of 1 MiB: enough per worker message, and the shared slots stay small.
  const chunkBytes = Math.max(
    options.chunkBytes ?? (options.compress ? DEFAULT_CHUNK_BYTES / 4 : DEFAULT_CHUNK_BYTES),
    geometry.clusterSize,
  );
  const chunkClusters = Math.floor(chunkBytes / geometry.clusterSize);
  const clusterSize = geometry.clusterSize;
  const signal = options.signal;

  if (!isBlockDevice(source)) {
    if (compressor !== undefined || options.backing !== undefined) {
      throw new BlockDeviceError(
        'EUNSUPPORTED',
        'qcow2 convert: compression and backing comparison need a seekable source (a BlockDevice), not a stream',
      );
    }
    const map = new ClusterMap();
    map.add(0, Math.ceil(source.size / clusterSize), 'data');
    if (preallocation === 'metadata')
      map.add(map.hostClusters, geometry.guestClusters - map.hostClusters, 'fill');
    const layout = planLayout(geometry, map);
    const reader = new StreamReader(source.stream);
    let streamLeft = source.size;
    const fetch = async (range: ClusterRange) => {
      const bytes = new Uint8Array(range.count * clusterSize);
      const take = Math.min(bytes.length, streamLeft);
      await reader.readInto(bytes.subarray(0, take));
      streamLeft -= take;
      return bytes;
    };
    const progress = progressOf(options.onProgress, 0, source.size);
    return makePlan(layout, [], fetch, 1, chunkClusters, undefined, signal, {
      cleanup: () => reader.cancel(),
      dense: options.sparseSize === 0,
      dataSink: options.dataSink,
      onData: progress,
    });
  }

  let scanTotal = 0;
  // -S: every cluster ('all'), or the clusters qemu-img's zero-run rule writes ('runs'), all
  // stored as data without a zero test; over a backing file only -S 0 applies.
  const sparse = sparseMode(
    options.sparseSize,
    clusterSize,
    compressor !== undefined || options.backing !== undefined,
  );
  let candidates: ClusterRange[] | undefined;
  if (sparse === 'all') {
    const end = Math.min(source.size, geometry.size);
    const clusters = Math.ceil(end / clusterSize);
    // Over a backing file, as qemu-img: what the source's own top layer holds (data or zeros, or
    // nothing below it); ranges it leaves to its backing file stay unallocated.
    candidates =
      options.backing !== undefined
        ? await clustersWhere(source, end, clusterSize, signal, (extent) => extent.depth === 0)
        : clusters > 0
          ? [{ cluster: 0, count: clusters }]
          : [];
  } else if (sparse === 'runs') {
    candidates = await sparseDataClusters(
      source,
      Math.min(source.size, geometry.size),
      clusterSize,
      options.sparseSize!,
      { readDepth, signal, sourceClusterSize: options.sourceClusterSize },
    );
  }
  const map0 = await scanSource(source, {
    geometry,
    backing: options.backing,
    detectZeroes: candidates === undefined && (options.detectZeroes ?? true),
    candidates,
    compression:
      compressor !== undefined
        ? { compressor, type: geometry.compressionType, depth: options.compressDepth ?? 8 }
        : undefined,
    cacheBytes: options.cacheBytes ?? DEFAULT_CACHE_BYTES,
    spool: compressor !== undefined ? options.spool : undefined,
    readDepth,
    chunkBytes,
    signal,
    onProgress:
      options.onProgress === undefined
        ? undefined
        : (done, total) => {
            scanTotal = total;
            options.onProgress?.(done, 2 * total);
          },
  });
  let map = map0.map;
  if (preallocation === 'metadata') map = withFill(map, geometry.guestClusters);
  const layout = planLayout(geometry, map, map0.lengths);
  const fetch = (range: ClusterRange) => readClusters(source, range, clusterSize, signal);
  return makePlan(
    layout,
    map0.cachedChunks,
    fetch,
    readDepth,
    chunkClusters,
    compressor !== undefined
      ? {
          compressor,
          cache: map0.compressedCache,
          spool: options.spool,
          spooled: map0.spooled,
          depth: options.compressDepth ?? 8,
        }
      : undefined,
    signal,
    {
      dataSink: options.dataSink,
      onData: progressOf(options.onProgress, scanTotal, map.dataClusters * clusterSize),
      // As qemu-img: clusters -S keeps are written, zeros included (never holes in the file).
      dense: candidates !== undefined,
    },
  );
}

/**
 * Progress of the writing pass: `bytes` of data written out of `dataBytes`, shown as the second
 * half of the work after a scan of `scanBytes` (or all of it when there was no scan).
 */
function progressOf(
  onProgress: ((done: number, total: number) => void) | undefined,
  scanBytes: number,
  dataBytes: number,
): ((bytes: number) => void) | undefined {
  if (onProgress === undefined) return undefined;
  const span = scanBytes > 0 ? scanBytes : dataBytes;
  const total = scanBytes + span;
  let written = 0;
  onProgress(scanBytes, total);
  return (bytes) => {
    written += bytes;
    onProgress(scanBytes + (dataBytes === 0 ? span : Math.min(span, (written / dataBytes) * span)), total);
  };
}

/** The map with every cluster it does not store preallocated (preallocation=metadata). */
function withFill(map: ClusterMap, guestClusters: number): ClusterMap {
  const out = new ClusterMap();
  let next = 0;
  for (let run = 0; run < map.runCount; run++) {
    out.add(next, map.starts[run]! - next, 'fill');
    out.add(map.starts[run]!, map.counts[run]!, map.kinds[run]! === 'zero' ? 'fill' : map.kinds[run]!);
    next = map.starts[run]! + map.counts[run]!;
  }
  out.add(next, guestClusters - next, 'fill');
  return out;
}

/** Data clusters of `map` in guest order, as ranges of at most `maxCount`, from data cluster `skip`. */
function* dataRanges(layout: Qcow2Layout, maxCount: number, skip = 0): Generator<ClusterRange> {
  const map = layout.map;
  const perTable = layout.geometry.l2Entries;
  let skipped = 0;
  for (let run = 0; run < map.runCount; run++) {
    if (map.kinds[run] !== 'data') continue;
    let start = map.starts[run]!;
    let count = map.counts[run]!;
    if (skipped < skip) {
      const drop = Math.min(count, skip - skipped);
      skipped += drop;
      start += drop;
      count -= drop;
    }
    // Split at L2 table boundaries so a range never spans two groups.
    while (count > 0) {
      const tableEnd = (Math.floor(start / perTable) + 1) * perTable;
      const piece = Math.min(count, tableEnd - start);
      yield* splitRange(start, piece, maxCount);
      start += piece;
      count -= piece;
    }
  }
}

/** Where the writing pass finds compressed clusters: memory, then the spool, then compressing again. */
interface CompressedSources {
  readonly compressor: ClusterCompressor;
  readonly cache: Uint8Array[];
  readonly spool: Spool | undefined;
  readonly spooled: number;
  readonly depth: number;
}

function makePlan(
  layout: Qcow2Layout,
  cachedChunks: CachedChunk[],
  fetch: (range: ClusterRange) => Promise<Uint8Array>,
  readDepth: number,
  chunkClusters: number,
  compression: CompressedSources | undefined,
  signal: AbortSignal | undefined,
  extras: {
    cleanup?: () => Promise<void>;
    dataSink?: RandomAccessSink | undefined;
    /** Called with the bytes of each piece of data written. */
    onData?: ((bytes: number) => void) | undefined;
    /** Data clusters are written as they are, all-zero ones too (no holes in the file). */
    dense?: boolean;
  } = {},
): ConversionPlan {
  const { cleanup, dataSink, onData, dense = false } = extras;
  let used = false;
  return {
    layout,
    fileSize: layout.fileSize,
    async write(sinkLike) {
      if (used) throw new BlockDeviceError('EINVAL', 'qcow2 convert: a plan can be written once');
      used = true;
      const sink = toByteSink(sinkLike);
      const out = new OutputWriter(sink);
      try {
        if (dataSink !== undefined) {
          // The data file first, so the image never names data that is not there yet.
          await writeDataFile(
            layout,
            dataSink,
            cachedChunks,
            fetch,
            readDepth,
            chunkClusters,
            signal,
            onData,
          );
          await emitImage(layout, out, { signal });
        } else if (compression === undefined) {
          await emitImage(layout, out, {
            signal,
            group: groupWriter(layout, out, cachedChunks, fetch, readDepth, chunkClusters, onData, dense),
          });
        } else {
          await emitImage(layout, out, {
            signal,
            area: (areaOffset) =>
              writeCompressedArea(
                layout,
                out,
                areaOffset,
                fetch,
                readDepth,
                chunkClusters,
                compression,
                onData,
              ),
          });
        }
        await sink.close();
      } catch (error) {
        await sink.abort?.(error);
        await dataSink?.abort().catch(() => {});
        await cleanup?.().catch(() => {});
        throw error;
      }
      return layout.fileSize;
    },
  };
}

/** The data clusters of `layout` in guest order, from the scan's cache or read again. */
function dataReads(
  layout: Qcow2Layout,
  cachedChunks: CachedChunk[],
  fetch: (range: ClusterRange) => Promise<Uint8Array>,
  readDepth: number,
  chunkClusters: number,
): AsyncGenerator<{ item: ClusterRange; result: Uint8Array }> {
  const clusterSize = layout.geometry.clusterSize;
  let cacheIndex = 0;
  const fromCache = (range: ClusterRange): Uint8Array | undefined => {
    while (cacheIndex < cachedChunks.length) {
      const chunk = cachedChunks[cacheIndex]!;
      if (chunk.cluster + chunk.count <= range.cluster) {
        cacheIndex++;
        continue;
      }
      if (chunk.cluster <= range.cluster && range.cluster + range.count <= chunk.cluster + chunk.count) {
        const from = (range.cluster - chunk.cluster) * clusterSize;
        return chunk.bytes.subarray(from, from + range.count * clusterSize);
      }
      return undefined;
    }
    return undefined;
  };
  return readAhead(dataRanges(layout, chunkClusters), readDepth, async (range) => {
    return fromCache(range) ?? fetch(range);
  });
}

/** Writes the data clusters of `layout` at their guest offsets in an external data file. */
async function writeDataFile(
  layout: Qcow2Layout,
  dataSink: RandomAccessSink,
  cachedChunks: CachedChunk[],
  fetch: (range: ClusterRange) => Promise<Uint8Array>,
  readDepth: number,
  chunkClusters: number,
  signal: AbortSignal | undefined,
  onData: ((bytes: number) => void) | undefined,
): Promise<void> {
  const clusterSize = layout.geometry.clusterSize;
  const wordsPerCluster = clusterSize / 4;
  let pending: Promise<void> = Promise.resolve();
  let writtenEnd = 0;
  for await (const { item, result } of dataReads(layout, cachedChunks, fetch, readDepth, chunkClusters)) {
    signal?.throwIfAborted();
    await pending;
    // All-zero clusters (kept with detectZeroes: false, or preallocated) stay holes.
    const words =
      result.byteOffset % 4 === 0
        ? new Uint32Array(result.buffer, result.byteOffset, result.length >>> 2)
        : undefined;
    const writes: Promise<void>[] = [];
    let runStart = -1;
    for (let index = 0; index <= item.count; index++) {
      const zero =
        index < item.count &&
        (words !== undefined
          ? isZeroWords(words, index * wordsPerCluster, (index + 1) * wordsPerCluster)
          : isAllZero(result.subarray(index * clusterSize, (index + 1) * clusterSize)));
      if (index < item.count && !zero) {
        if (runStart < 0) runStart = index;
        continue;
      }
      if (runStart >= 0) {
        writtenEnd = (item.cluster + index) * clusterSize;
        writes.push(
          dataSink.writeAt(
            (item.cluster + runStart) * clusterSize,
            result.subarray(runStart * clusterSize, index * clusterSize),
          ),
        );
        runStart = -1;
      }
    }
    pending = Promise.all(writes).then(() => onData?.(result.length));
  }
  await pending;
  // As qemu-img leaves it: the guest size, or further when the last cluster written ends later;
  // a raw data file (every cluster mapped) ends on a cluster boundary.
  const size = layout.geometry.size;
  await dataSink.close(
    layout.geometry.dataFileRaw ? Math.ceil(size / clusterSize) * clusterSize : Math.max(size, writtenEnd),
  );
}

function groupWriter(
  layout: Qcow2Layout,
  out: OutputWriter,
  cachedChunks: CachedChunk[],
  fetch: (range: ClusterRange) => Promise<Uint8Array>,
  readDepth: number,
  chunkClusters: number,
  onData: ((bytes: number) => void) | undefined,
  dense: boolean,
) {
  const clusterSize = layout.geometry.clusterSize;
  const perTable = layout.geometry.l2Entries;
  const map = layout.map;
  const reads = dataReads(layout, cachedChunks, fetch, readDepth, chunkClusters);
  let run = 0;
  return async (group: number, hostOffset: number) => {
    const firstCluster = layout.groupL1Index[group]! * perTable;
    const endCluster = firstCluster + perTable;
    let cursor = hostOffset;
    while (run < map.runCount && map.starts[run]! + map.counts[run]! <= firstCluster) run++;
    for (; run < map.runCount && map.starts[run]! < endCluster; run++) {
      const start = Math.max(map.starts[run]!, firstCluster);
      const end = Math.min(map.starts[run]! + map.counts[run]!, endCluster);
      const kind = map.kinds[run]!;
      if (kind === 'fill') {
        cursor += (end - start) * clusterSize;
        await out.zeroTo(cursor);
      } else if (kind === 'data') {
        for (let at = start; at < end; ) {
          const next = await reads.next();
          if (next.done || next.value.item.cluster !== at) {
            throw new Error(`qcow2 convert: data out of order at guest cluster ${at}`);
          }
          if (dense) await out.writeAt(cursor, next.value.result);
          else await writeSparse(out, cursor, next.value.result, clusterSize);
          onData?.(next.value.result.length);
          cursor += next.value.result.length;
          at += next.value.item.count;
        }
      }
      if (map.starts[run]! + map.counts[run]! > endCluster) break;
    }
  };
}

/**
 * Writes `bytes` (whole clusters) at `hostOffset`, all-zero clusters as zeros the sink may skip
 * (holes in a file). They only occur with `detectZeroes: false`: the scan did not read the data,
 * so such a cluster stays allocated in the image and reads as zeros from its hole.
 */
async function writeSparse(
  out: OutputWriter,
  hostOffset: number,
  bytes: Uint8Array,
  clusterSize: number,
): Promise<void> {
  let runStart = 0;
  for (let at = 0; at <= bytes.length; at += clusterSize) {
    const zero = at < bytes.length && isAllZero(bytes.subarray(at, at + clusterSize));
    if (at === bytes.length || zero) {
      if (at > runStart) await out.writeAt(hostOffset + runStart, bytes.subarray(runStart, at));
      if (zero) await out.zeroTo(hostOffset + at + clusterSize);
      runStart = at + clusterSize;
    }
  }
}

async function writeCompressedArea(
  layout: Qcow2Layout,
  out: OutputWriter,
  areaOffset: number,
  fetch: (range: ClusterRange) => Promise<Uint8Array>,
  readDepth: number,
  chunkClusters: number,
  compression: CompressedSources,
  onData: ((bytes: number) => void) | undefined,
): Promise<void> {
  const geometry = layout.geometry;
  const clusterSize = geometry.clusterSize;
  const lengths = layout.compressed!.lengths;
  const packer = new CompressedPacker(clusterSize, maxRefcount(geometry.refcountOrder));
  let dataIndex = 0;
  const put = async (stored: Uint8Array) => {
    const expected = lengths[dataIndex]!;
    if (stored.length !== expected) {
      throw new BlockDeviceError(
        'EIO',
        `qcow2 convert: data cluster ${dataIndex} now stores ${stored.length} bytes, ${expected} when planned (did the source change?)`,
      );
    }
    const placed = packer.place(stored.length);
    const hostOffset = areaOffset + placed.offset;
    if (placed.deferred) {
      pendingPlain.push({ hostOffset, bytes: stored });
      dataIndex++;
      onData?.(clusterSize);
      return;
    }
    while (pendingPlain.length > 0 && pendingPlain[0]!.hostOffset < hostOffset) {
      const plain = pendingPlain.shift()!;
      await out.writeAt(plain.hostOffset, plain.bytes);
    }
    await out.writeAt(hostOffset, stored);
    dataIndex++;
    onData?.(clusterSize);
  };
  // Plain clusters placed behind a partly filled host cluster (at most MAX_PENDING_PLAIN_BYTES).
  const pendingPlain: { hostOffset: number; bytes: Uint8Array }[] = [];
  for (const stored of compression.cache) await put(stored);
  if (compression.spool !== undefined && compression.spooled > 0) {
    const spool = compression.spool;
    const batches = spoolBatches(lengths, compression.cache.length, compression.spooled);
    for await (const { item, result } of readAhead(batches, readDepth, (batch) =>
      spool.read(batch.offset, batch.bytes),
    )) {
      let at = 0;
      for (let index = item.first; index < item.end; index++) {
        await put(result.subarray(at, at + lengths[index]!));
        at += lengths[index]!;
      }
    }
  }
  const depth = Math.max(readDepth, compression.depth);
  const shared = new SharedCompression(compression.compressor, chunkClusters * clusterSize, SHARED_SLOTS);
  const batches = readAhead(
    dataRanges(layout, chunkClusters, compression.cache.length + compression.spooled),
    depth,
    async (range) => {
      const data = await fetch(range);
      const outputs = await shared.compress(data, clusterSize, geometry.compressionType);
      // Outputs at least a cluster long are the cluster's own bytes (see ClusterCompressor).
      return outputs;
    },
  );
  for await (const { result } of batches) for (const stored of result) await put(stored);
  for (const plain of pendingPlain) await out.writeAt(plain.hostOffset, plain.bytes);
  if (dataIndex !== lengths.length) {
    throw new BlockDeviceError(
      'EIO',
      `qcow2 convert: wrote ${dataIndex} data clusters, planned ${lengths.length}`,
    );
  }
}

/** Spool reads of about 4 MiB covering data clusters [first, first + count). */
function* spoolBatches(
  lengths: Uint32Array,
  first: number,
  count: number,
): Generator<{ first: number; end: number; offset: number; bytes: number }> {
  let offset = 0;
  let index = first;
  const end = first + count;
  while (index < end) {
    const batchFirst = index;
    let bytes = 0;
    while (index < end && (bytes === 0 || bytes + lengths[index]! <= 4 * 1024 * 1024))
      bytes += lengths[index++]!;
    yield { first: batchFirst, end: index, offset, bytes };
    offset += bytes;
  }
}

/**
 * Converts `source` to a qcow2 image written to `sink` (closed at the end); resolves with the
 * number of bytes written.
 */
export async function convertToQcow2(
  source: ConvertSource,
  sink: Qcow2Sink,
  options: ConvertOptions = {},
): Promise<number> {
  const plan = await planConversion(source, options);
  return plan.write(sink);
}
