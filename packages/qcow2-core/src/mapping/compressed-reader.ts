import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { TableCache } from '../cache/table-cache.js';
import type { Qcow2Codecs } from '../codecs.js';
import type { CompressedDescriptor } from '../format/compressed-descriptor.js';
import { readClipped } from './read-segments.js';

export interface CompressedReaderOptions {
  /** The image file the compressed bytes are read from. */
  readonly file: BlockDevice;
  readonly codecs: Qcow2Codecs;
  readonly clusterSize: number;
  readonly algorithm: 'deflate' | 'zstd';
  /** Names the cluster kind in error messages, e.g. `compressed cluster (zlib)`. */
  readonly label: string;
  /** How many decompressed clusters to keep (reads of neighbouring sectors hit the cache). */
  readonly cachedClusters: number;
}

/**
 * Reads and decompresses compressed clusters (qcow2 and qcow v1 alike), keeping the last few
 * decompressed clusters. Damaged data ends in `ECORRUPT` naming the host offset.
 */
export class CompressedClusterReader {
  readonly #options: CompressedReaderOptions;
  readonly #cache: TableCache<Uint8Array>;

  constructor(options: CompressedReaderOptions) {
    this.#options = options;
    this.#cache = new TableCache<Uint8Array>(options.cachedClusters * options.clusterSize);
  }

  /** The cluster described by `descriptor`: into `into` when given (uncached), else cached.
   * `compressedBytes` are the descriptor's bytes when the caller has read them already. */
  read(
    descriptor: CompressedDescriptor,
    compressedBytes?: Uint8Array,
    into?: Uint8Array,
  ): Promise<Uint8Array> {
    if (into !== undefined) return this.#decompress(descriptor, compressedBytes, into);
    return this.#cache.get(descriptor.hostOffset, () =>
      this.#decompress(descriptor, compressedBytes, new Uint8Array(this.#options.clusterSize)),
    );
  }

  /** Drops a cached cluster whose host bytes are being rewritten or freed. */
  forget(hostOffset: number): void {
    this.#cache.invalidate(hostOffset);
  }

  async #decompress(
    descriptor: CompressedDescriptor,
    compressedBytes: Uint8Array | undefined,
    output: Uint8Array,
  ): Promise<Uint8Array> {
    const { file, codecs, clusterSize, algorithm, label } = this.#options;
    if (descriptor.hostOffset >= file.size) {
      throw new BlockDeviceError('ECORRUPT', `${label}: data lies past the end of the file`, {
        offset: descriptor.hostOffset,
      });
    }
    let input = compressedBytes;
    if (input === undefined) {
      input = new Uint8Array(descriptor.compressedLength);
      await readClipped(file, descriptor.hostOffset, input);
    }
    let produced: number;
    try {
      produced = await codecs.decompress(algorithm, input, output);
    } catch (error) {
      throw new BlockDeviceError('ECORRUPT', `${label}: cannot decompress`, {
        offset: descriptor.hostOffset,
        cause: error,
      });
    }
    if (produced !== clusterSize) {
      throw new BlockDeviceError(
        'ECORRUPT',
        `${label}: decompressed to ${produced} bytes instead of ${clusterSize}`,
        { offset: descriptor.hostOffset },
      );
    }
    return output;
  }
}
