/**
 * Cluster compression, injected so the writer's main entry stays free of Node APIs. The node
 * entry's `createCompressorPool()` compresses on worker threads.
 */

export type CompressionType = 'zlib' | 'zstd';

export interface ClusterCompressor {
  /**
   * Compresses every `clusterSize` piece of `data` on its own (the last piece may be shorter) and
   * resolves with one output per piece, in order. zlib output is a raw deflate stream with a 4 KiB
   * window (QEMU inflates with windowBits -12); zstd output is one zstd frame. Must be
   * deterministic: the same input gives the same output. A piece whose compressed form would not
   * be shorter than the piece comes back as the piece's own bytes (same length): the caller stores
   * it uncompressed. The compressor takes `data` over (a worker pool transfers its buffer away):
   * the caller must not use `data` after the call.
   */
  compressClusters(data: Uint8Array, clusterSize: number, type: CompressionType): Promise<Uint8Array[]>;
  /**
   * Optional, for callers that keep a fixed set of buffers circulating: compresses every
   * `clusterSize` piece of the first `length` bytes of `data` (default: all of it; taken over, handed back in the result) into `scratch` when it is
   * given and large enough (taken over too, handed back as the result's `output` buffer). With
   * SharedArrayBuffers nothing moves: the worker pool works in place.
   */
  compressBatch?(
    data: Uint8Array,
    clusterSize: number,
    type: CompressionType,
    scratch?: ArrayBuffer | SharedArrayBuffer,
    length?: number,
  ): Promise<CompressedBatch>;
  /** Stops worker threads, if any. */
  close?(): Promise<void>;
}

/** The outputs of a batch (`output` back to back, `lengths` each), one view of `output` each. */
export function batchOutputs(output: Uint8Array, lengths: Uint32Array): Uint8Array[] {
  const outputs: Uint8Array[] = [];
  let at = 0;
  for (const length of lengths) {
    outputs.push(output.subarray(at, at + length));
    at += length;
  }
  return outputs;
}

/** A batch compressed by {@link ClusterCompressor.compressBatch}. */
export interface CompressedBatch {
  /** The batch's input, handed back (same bytes; the view passed in may be detached). */
  readonly input: Uint8Array;
  /** Every output back to back (in `scratch` when it was large enough). */
  readonly output: Uint8Array;
  /** Length of each output, in order; an output as long as its piece is the piece, stored plain. */
  readonly lengths: Uint32Array;
}
