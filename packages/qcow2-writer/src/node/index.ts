/**
 * The Node entry: everything of the main entry, plus file paths as sinks, a worker-thread
 * compressor used by default, and `writeQcow2ToFile`.
 */
import {
  type ConversionPlan,
  type ConvertOptions,
  type CreateImageOptions,
  createEmptyImage as createEmptyImagePure,
  planConversion as planConversionPure,
} from '../index.js';
import type { Qcow2Sink } from '../sink.js';
import type { ConvertSource } from '../source.js';
import { createCompressorPool } from './compress-pool.js';
import { openFileSink } from './file-sink.js';
import { createFileSpool } from './file-spool.js';

export * from '../index.js';
export { type CompressorPool, createCompressorPool } from './compress-pool.js';
export { openFileSink } from './file-sink.js';
export { createFileSpool } from './file-spool.js';

/** A sink, or a file path. */
export type NodeQcow2Sink = Qcow2Sink | string;

async function resolveSink(sink: NodeQcow2Sink): Promise<Qcow2Sink> {
  return typeof sink === 'string' ? openFileSink(sink) : sink;
}

/** createEmptyImage accepting a file path. */
export async function createEmptyImage(sink: NodeQcow2Sink, options: CreateImageOptions): Promise<number> {
  return createEmptyImagePure(await resolveSink(sink), options);
}

/** planConversion with a worker-thread compressor and a temporary-file spool when `compress` is set
 * and none is given. The plan's `write` accepts file paths and releases what it started. */
export async function planConversion(
  source: ConvertSource,
  options: ConvertOptions = {},
): Promise<ConversionPlan & { write(sink: NodeQcow2Sink): Promise<number>; dispose(): Promise<void> }> {
  const pool = options.compress && options.compressor === undefined ? createCompressorPool() : undefined;
  const spool = options.compress && options.spool === undefined ? await createFileSpool() : undefined;
  const dispose = async () => {
    await pool?.close();
    await spool?.close();
  };
  try {
    const plan = await planConversionPure(source, {
      ...options,
      compressor: options.compressor ?? pool,
      spool: options.spool ?? spool,
    });
    return {
      layout: plan.layout,
      fileSize: plan.fileSize,
      async write(sink) {
        try {
          return await plan.write(await resolveSink(sink));
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

/** Converts `source` to qcow2 at `sink` (a path or any sink); resolves with the bytes written. */
export async function convertToQcow2(
  source: ConvertSource,
  sink: NodeQcow2Sink,
  options: ConvertOptions = {},
): Promise<number> {
  const plan = await planConversion(source, options);
  return plan.write(sink);
}

/** Converts `source` to a qcow2 file at `path`. */
export function writeQcow2ToFile(
  source: ConvertSource,
  path: string,
  options: ConvertOptions = {},
): Promise<number> {
  return convertToQcow2(source, path, options);
}
