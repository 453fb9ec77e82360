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
  /** Stops worker threads, if any. */
  close?(): Promise<void>;
}
