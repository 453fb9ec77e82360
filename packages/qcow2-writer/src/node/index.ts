/**
 * The Node entry: everything of the main entry, plus file paths as sinks, a worker-thread
 * compressor used by default, and `writeQcow2ToFile`.
 */

import { convertDirectCompressed } from '../direct-compressed.js';
import type { RandomAccessSink } from '../direct-convert.js';
import { convertDirect } from '../direct-convert.js';
import {
  type ConversionPlan,
  type ConvertOptions,
  type CreateImageOptions,
  createEmptyImage as createEmptyImagePure,
  planConversion as planConversionPure,
} from '../index.js';
import { resolveGeometry } from '../options.js';
import type { Qcow2Sink } from '../sink.js';
import type { ConvertSource } from '../source.js';
import { isBlockDevice } from '../source.js';
import { sparseMode } from '../sparse.js';
import { createCompressorPool } from './compress-pool.js';
import { openFileSink } from './file-sink.js';
import { createFileSpool } from './file-spool.js';
import { type FileFlush, openRandomAccessFile } from './random-access-file.js';

export * from '../index.js';
export { type CompressorPool, createCompressorPool } from './compress-pool.js';
export { type FileSinkOptions, openFileSink } from './file-sink.js';
export { createFileSpool } from './file-spool.js';
export type { FileFlush } from './random-access-file.js';

/** A sink, or a file path. */
export type NodeQcow2Sink = Qcow2Sink | string;

async function resolveSink(sink: NodeQcow2Sink, flush?: FileFlush): Promise<Qcow2Sink> {
  return typeof sink === 'string' ? openFileSink(sink, { flush }) : sink;
}

/** createEmptyImage accepting a file path. */
export async function createEmptyImage(sink: NodeQcow2Sink, options: CreateImageOptions): Promise<number> {
  return createEmptyImagePure(await resolveSink(sink), options);
}

/** Conversion options of the node entry. */
export interface NodeConvertOptions extends ConvertOptions {
  /** Where to write the external data file (default: `dataFile`, the name recorded in the image,
   * relative to the current folder). Ignored when `dataSink` is given. */
  readonly dataFilePath?: string;
  /** When the files this call opens by path (the image, the external data file) are flushed to
   * stable storage: once when closed by default; see {@link FileFlush}. Sinks given as objects
   * flush as they do. */
  readonly flush?: FileFlush | undefined;
}

/** planConversion with a worker-thread compressor and a temporary-file spool when `compress` is set
 * and none is given, and the external data file opened when the image has one. The plan's `write`
 * accepts file paths and releases what it started. */
export async function planConversion(
  source: ConvertSource,
  options: NodeConvertOptions = {},
): Promise<ConversionPlan & { write(sink: NodeQcow2Sink): Promise<number>; dispose(): Promise<void> }> {
  const pool = options.compress && options.compressor === undefined ? createCompressorPool() : undefined;
  const spool = options.compress && options.spool === undefined ? await createFileSpool() : undefined;
  let dataSink: RandomAccessSink | undefined;
  const dispose = async () => {
    await pool?.close();
    await spool?.close();
    await dataSink?.abort();
  };
  try {
    if (options.dataFile !== undefined && options.dataSink === undefined && !options.compress) {
      resolveGeometry(options, options.size ?? source.size); // refuse bad options before creating a file
      dataSink = await openRandomAccessFile(options.dataFilePath ?? options.dataFile, {
        flush: options.flush,
      });
    }
    const plan = await planConversionPure(source, {
      ...options,
      compressor: options.compressor ?? pool,
      spool: options.spool ?? spool,
      dataSink: options.dataSink ?? dataSink,
    });
    return {
      layout: plan.layout,
      fileSize: plan.fileSize,
      async write(sink) {
        try {
          return await plan.write(await resolveSink(sink, options.flush));
        } finally {
          await dispose();
        }
      },
      dispose,
    };
  } catch (error) {
    await dispose();
    throw error;
  }
}

/**
 * Converts `source` to qcow2 at `sink` (a path or any sink); resolves with the bytes written. To a
 * file path, a conversion of a BlockDevice without `backing`, preallocation, a data file or a
 * `sparseSize` that changes the default (0, or above the cluster size uncompressed) reads
 * the source once (`convertDirect`, or `convertDirectCompressed` when compressing); everything
 * else goes through `planConversion`.
 */
export async function convertToQcow2(
  source: ConvertSource,
  sink: NodeQcow2Sink,
  options: NodeConvertOptions = {},
): Promise<number> {
  if (
    typeof sink === 'string' &&
    isBlockDevice(source) &&
    options.backing === undefined &&
    (options.preallocation ?? 'off') === 'off' &&
    options.dataFile === undefined &&
    options.detectZeroes !== false &&
    (options.sparseSize === undefined ||
      sparseMode(
        options.sparseSize,
        resolveGeometry(options, options.size ?? source.size).clusterSize,
        options.compress === true,
      ) === 'clusters')
  ) {
    const geometry = resolveGeometry(options, options.size ?? source.size);
    if (!options.compress) {
      // Eight requests in flight as qemu-img convert has by default (-m 8), in 2 MiB buffers.
      return convertDirect(source, geometry, await openRandomAccessFile(sink, { flush: options.flush }), {
        readDepth: options.readDepth ?? 8,
        chunkBytes: Math.max(options.chunkBytes ?? 2 * 1024 * 1024, geometry.clusterSize),
        signal: options.signal,
        onProgress: options.onProgress,
      });
    }
    const pool = options.compressor === undefined ? createCompressorPool() : undefined;
    try {
      const workers = pool?.size ?? 2;
      // Writes on the thread pool even on tmpfs: here the main thread feeds the compression
      // workers, and a write done inline delays the next batch (zstd, 10 alternating rounds on
      // /dev/shm: 2.05 s wall with pool writes, 2.16 s inline; zlib 9.97 s vs 10.51 s).
      const target = await openRandomAccessFile(sink, { inline: false, flush: options.flush });
      return await convertDirectCompressed(source, geometry, target, {
        compressor: options.compressor ?? pool!,
        depth: options.compressDepth ?? 2 * workers + 2,
        chunkBytes: Math.max(options.chunkBytes ?? 1024 * 1024, geometry.clusterSize),
        signal: options.signal,
        onProgress: options.onProgress,
      });
    } finally {
      await pool?.close();
    }
  }
  const plan = await planConversion(source, options);
  return plan.write(sink);
}

/** Converts `source` to a qcow2 file at `path`. */
export function writeQcow2ToFile(
  source: ConvertSource,
  path: string,
  options: NodeConvertOptions = {},
): Promise<number> {
  return convertToQcow2(source, path, options);
}
