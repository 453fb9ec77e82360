/**
 * The first pass over a seekable source: block status says which clusters may hold data, then
 * the data is read to drop all-zero clusters (and, over a backing file, clusters equal to the
 * backing file's). When compressing, this pass also compresses, to learn every compressed size
 * before the layout is fixed. Results are cached up to a budget so the writing pass reads (and
 * compresses) again only what did not fit.
 */
import { type BlockDevice, blockStatusAll, type Extent } from '@qcowkit/blockdev';
import { ClusterMap } from './cluster-map.js';
import type { ClusterCompressor, CompressionType } from './compressor.js';
import type { ImageGeometry } from './options.js';
import { type ClusterRange, readAhead, splitRange } from './read-ahead.js';
import { SharedCompression } from './shared-compression.js';
import type { Spool } from './spool.js';
import { isZeroWords, sameBytes } from './zero-detect.js';

/** Batches being compressed at once through shared buffers (each costs two chunks of memory). */
export const SHARED_SLOTS = 4;

export interface ScanOptions {
  readonly geometry: ImageGeometry;
  readonly backing: BlockDevice | undefined;
  readonly detectZeroes: boolean;
  /** Guest cluster ranges to consider instead of the ones block status gives (`-S`). */
  readonly candidates?: ClusterRange[] | undefined;
  readonly compression: { compressor: ClusterCompressor; type: CompressionType; depth: number } | undefined;
  readonly cacheBytes: number;
  /** Where compressed clusters beyond `cacheBytes` go (else they are compressed again later). */
  readonly spool: Spool | undefined;
  readonly readDepth: number;
  readonly chunkBytes: number;
  readonly signal: AbortSignal | undefined;
  /** Called with bytes scanned and bytes to scan (the block-status data). */
  readonly onProgress?: ((done: number, total: number) => void) | undefined;
}

/** Source bytes of whole clusters kept from the scan (uncompressed conversions). */
export interface CachedChunk {
  readonly cluster: number;
  readonly count: number;
  readonly bytes: Uint8Array;
}

export interface ScanResult {
  readonly map: ClusterMap;
  readonly cachedChunks: CachedChunk[];
  /** Compressed conversions: stored length of every data cluster, guest order. */
  readonly lengths: Uint32Array | undefined;
  /** Compressed conversions: stored bytes of the first data clusters (as many as the budget held). */
  readonly compressedCache: Uint8Array[];
  /** Compressed conversions: data clusters after the cache whose stored bytes are in the spool,
   * back to back from spool offset 0. */
  readonly spooled: number;
}

/** Guest cluster ranges where `device` may read as non-zero (block status), merged and sorted. */
export function nonZeroClusters(
  device: BlockDevice,
  end: number,
  clusterSize: number,
  signal: AbortSignal | undefined,
): Promise<ClusterRange[]> {
  return clustersWhere(device, end, clusterSize, signal, (extent) => !extent.zero && extent.present);
}

/**
 * Guest cluster ranges covering the block-status extents of `device` (up to `end`) that `keep`
 * accepts, merged and sorted.
 */
export async function clustersWhere(
  device: BlockDevice,
  end: number,
  clusterSize: number,
  signal: AbortSignal | undefined,
  keep: (extent: Extent) => boolean,
): Promise<ClusterRange[]> {
  const ranges: ClusterRange[] = [];
  const STEP = 2 ** 40;
  for (let position = 0; position < end; position += STEP) {
    const extents = await blockStatusAll(device, position, Math.min(STEP, end - position), { signal });
    for (const extent of extents) {
      if (!keep(extent)) continue;
      const first = Math.floor(extent.offset / clusterSize);
      const last = Math.ceil((extent.offset + extent.length) / clusterSize);
      const previous = ranges[ranges.length - 1];
      if (previous !== undefined && first <= previous.cluster + previous.count) {
        ranges[ranges.length - 1] = {
          cluster: previous.cluster,
          count: Math.max(previous.count, last - previous.cluster),
        };
      } else {
        ranges.push({ cluster: first, count: last - first });
      }
    }
  }
  return ranges;
}

/** Union of two sorted range lists. */
function unionRanges(a: ClusterRange[], b: ClusterRange[]): ClusterRange[] {
  const all = [...a, ...b].sort((x, y) => x.cluster - y.cluster);
  const out: ClusterRange[] = [];
  for (const range of all) {
    const previous = out[out.length - 1];
    if (previous !== undefined && range.cluster <= previous.cluster + previous.count) {
      const end = Math.max(previous.cluster + previous.count, range.cluster + range.count);
      out[out.length - 1] = { cluster: previous.cluster, count: end - previous.cluster };
    } else {
      out.push(range);
    }
  }
  return out;
}

/** Reads clusters `range` of `device` (zeros past its end) into a new buffer. */
export async function readClusters(
  device: BlockDevice,
  range: ClusterRange,
  clusterSize: number,
  signal?: AbortSignal,
): Promise<Uint8Array> {
  const bytes = new Uint8Array(range.count * clusterSize);
  const start = range.cluster * clusterSize;
  const valid = Math.max(0, Math.min(bytes.length, device.size - start));
  if (valid > 0) await device.readInto(bytes.subarray(0, valid), start, { signal });
  return bytes;
}

export async function scanSource(source: BlockDevice, options: ScanOptions): Promise<ScanResult> {
  const { geometry, backing, signal } = options;
  const clusterSize = geometry.clusterSize;
  const guestEnd = Math.min(source.size, geometry.size);
  let candidates = options.candidates ?? (await nonZeroClusters(source, guestEnd, clusterSize, signal));
  if (backing !== undefined && options.candidates === undefined) {
    const backingEnd = Math.min(backing.size, geometry.size);
    candidates = unionRanges(candidates, await nonZeroClusters(backing, backingEnd, clusterSize, signal));
  }
  const map = new ClusterMap();
  const cachedChunks: CachedChunk[] = [];
  const result: ScanResult = {
    map,
    cachedChunks,
    lengths: options.compression !== undefined ? new Uint32Array(1024) : undefined,
    compressedCache: [],
    spooled: 0,
  };
  let spooled = 0;

  // Given candidates (-S) are all stored as data: read only to compress them.
  const given = options.candidates !== undefined;
  const mustRead =
    options.compression !== undefined || (!given && (options.detectZeroes || backing !== undefined));
  if (!mustRead) {
    for (const range of candidates) map.add(range.cluster, range.count, 'data');
    return result;
  }

  const chunkClusters = Math.max(1, Math.floor(options.chunkBytes / clusterSize));
  let scanTotal = 0;
  for (const range of candidates) scanTotal += range.count * clusterSize;
  let scanned = 0;
  options.onProgress?.(0, scanTotal);
  function* chunks(): Generator<ClusterRange> {
    for (const range of candidates) yield* splitRange(range.cluster, range.count, chunkClusters);
  }
  let cacheUsed = 0;
  let caching = options.cacheBytes > 0;
  let lengths = result.lengths;
  let dataIndex = 0;
  const compressQueue: Promise<void>[] = [];
  let lastRecorded: Promise<void> = Promise.resolve();
  const compression = options.compression;
  const shared =
    compression !== undefined
      ? new SharedCompression(compression.compressor, chunkClusters * clusterSize, SHARED_SLOTS)
      : undefined;
  const zeroKind = geometry.version === 3 ? 'zero' : 'data';

  const recordCompressed = async (outputs: Uint8Array[]) => {
    for (let index = 0; index < outputs.length; index++) {
      // At least a cluster long: the cluster's own bytes (see ClusterCompressor), stored as is.
      const stored = outputs[index]!;
      if (lengths!.length <= dataIndex) {
        const grown = new Uint32Array(lengths!.length * 2);
        grown.set(lengths!);
        lengths = grown;
      }
      lengths![dataIndex++] = stored.length;
      if (caching && cacheUsed + stored.length <= options.cacheBytes) {
        result.compressedCache.push(stored);
        cacheUsed += stored.length;
      } else {
        caching = false;
        if (options.spool !== undefined && spooled === dataIndex - 1 - result.compressedCache.length) {
          await options.spool.append(stored);
          spooled++;
        }
      }
    }
  };

  const fetch = async (range: ClusterRange) => {
    const [data, base] = await Promise.all([
      readClusters(source, range, clusterSize, signal),
      backing !== undefined ? readClusters(backing, range, clusterSize, signal) : undefined,
    ]);
    return { data, base };
  };

  for await (const { item: range, result: read } of readAhead(chunks(), options.readDepth, fetch)) {
    signal?.throwIfAborted();
    scanned += range.count * clusterSize;
    options.onProgress?.(scanned, scanTotal);
    const { data, base } = read;
    let allData = true;
    const dataClusters: number[] = [];
    // One word view per chunk (`data` is a fresh buffer from offset 0), none per cluster.
    const words = new Uint32Array(data.buffer, data.byteOffset, data.length >>> 2);
    const clusterWords = clusterSize >>> 2;
    for (let index = 0; index < range.count; index++) {
      const zero = () => isZeroWords(words, index * clusterWords, (index + 1) * clusterWords);
      let kind: 'data' | 'zero' | 'skip';
      if (given) {
        kind = 'data';
      } else if (base !== undefined) {
        const cluster = data.subarray(index * clusterSize, (index + 1) * clusterSize);
        const backingCluster = base.subarray(index * clusterSize, (index + 1) * clusterSize);
        if (sameBytes(cluster, backingCluster)) kind = 'skip';
        else kind = zero() ? 'zero' : 'data';
      } else {
        kind = options.detectZeroes && zero() ? 'skip' : 'data';
      }
      if (kind === 'zero') kind = zeroKind === 'zero' ? 'zero' : 'data';
      if (kind === 'skip') {
        allData = false;
        continue;
      }
      map.add(range.cluster + index, 1, kind);
      if (kind === 'data') dataClusters.push(index);
      else allData = false;
    }
    if (compression !== undefined) {
      if (dataClusters.length === 0) continue;
      let input = data;
      if (!allData) {
        input = new Uint8Array(dataClusters.length * clusterSize);
        for (let at = 0; at < dataClusters.length; at++) {
          const index = dataClusters[at]!;
          input.set(data.subarray(index * clusterSize, (index + 1) * clusterSize), at * clusterSize);
        }
      }
      const outputs = shared!.compress(input, clusterSize, compression.type);
      outputs.catch(() => {});
      // Results are recorded in order: each one waits for the previous one.
      const recorded = lastRecorded.then(() => outputs).then((list) => recordCompressed(list));
      recorded.catch(() => {});
      lastRecorded = recorded;
      compressQueue.push(recorded);
      while (compressQueue.length > compression.depth) await compressQueue.shift();
    } else if (caching && dataClusters.length > 0) {
      if (cacheUsed + data.length <= options.cacheBytes) {
        cachedChunks.push({ cluster: range.cluster, count: range.count, bytes: data });
        cacheUsed += data.length;
      } else {
        caching = false;
      }
    }
  }
  for (const pending of compressQueue) await pending;
  return { ...result, lengths: lengths?.subarray(0, dataIndex), spooled };
}
