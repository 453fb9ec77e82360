/**
 * Decompression for compressed clusters, injected so the engine stays free of Node APIs.
 * `pureCodecs` works anywhere (fflate for raw deflate, fzstd for zstd); the node entry's
 * `nodeCodecs` uses node:zlib on the thread pool for deflate.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';

// The codecs load on the first compressed cluster, not with the engine: most images have none,
// and loading fflate and fzstd costs more than opening an image.
let fflate: Promise<typeof import('fflate')> | undefined;
let fzstd: Promise<typeof import('fzstd')> | undefined;
const loadFflate = () => (fflate ??= import('fflate'));
const loadFzstd = () => (fzstd ??= import('fzstd'));

export interface Qcow2Codecs {
  /**
   * Decompresses `input` (raw deflate stream, or a zstd frame, possibly followed by padding) into
   * `output`; returns the number of bytes produced. Must not write past `output`.
   */
  decompress(type: 'deflate' | 'zstd', input: Uint8Array, output: Uint8Array): Promise<number>;
  /**
   * Compresses one cluster (raw deflate stream, or a zstd frame). Optional: without it, or when it
   * rejects with EUNSUPPORTED, compressed writes are not available.
   */
  compress?(type: 'deflate' | 'zstd', input: Uint8Array): Promise<Uint8Array>;
}

const ZSTD_MAGIC = 0xfd2fb528;

/** The zstd compressor (@hpcc-js/wasm-zstd), loaded on first use. */
let zstdCompressor: Promise<{ compress(input: Uint8Array, level: number): Uint8Array }> | undefined;

/**
 * Length of the zstd frame at the start of `input` (header, blocks, checksum), so padding after it
 * is not taken for another frame. Throws ECORRUPT on a malformed frame.
 */
export function zstdFrameLength(input: Uint8Array): number {
  const bad = (why: string): never => {
    throw new BlockDeviceError('ECORRUPT', `zstd frame: ${why}`);
  };
  if (input.length < 6) bad('too short');
  const magic = (input[0]! | (input[1]! << 8) | (input[2]! << 16) | (input[3]! << 24)) >>> 0;
  if (magic !== ZSTD_MAGIC) bad('bad magic');
  const descriptor = input[4]!;
  const contentSizeFlag = descriptor >>> 6;
  const singleSegment = (descriptor >>> 5) & 1;
  const checksum = (descriptor >>> 2) & 1;
  const dictionaryIdFlag = descriptor & 3;
  let at = 5 + (singleSegment ? 0 : 1) + [0, 1, 2, 4][dictionaryIdFlag]!;
  at += [singleSegment ? 1 : 0, 2, 4, 8][contentSizeFlag]!;
  for (;;) {
    if (at + 3 > input.length) bad('truncated');
    const blockHeader = input[at]! | (input[at + 1]! << 8) | (input[at + 2]! << 16);
    const last = blockHeader & 1;
    const blockType = (blockHeader >>> 1) & 3;
    const blockSize = blockHeader >>> 3;
    if (blockType === 3) bad('reserved block type');
    at += 3 + (blockType === 1 ? 1 : blockSize);
    if (last) break;
  }
  at += checksum ? 4 : 0;
  if (at > input.length) bad('truncated');
  return at;
}

/** Copies `produced` into `output`, failing when it does not fit. */
function deliver(produced: Uint8Array, output: Uint8Array): number {
  if (produced.length > output.length) {
    throw new BlockDeviceError(
      'ECORRUPT',
      `compressed cluster: decompresses to more than ${output.length} bytes`,
    );
  }
  output.set(produced);
  return produced.length;
}

/** Codecs without Node APIs: fflate (raw inflate) and fzstd. Synchronous work, run on the caller's thread. */
export const pureCodecs: Qcow2Codecs = {
  async compress(type, input) {
    if (type === 'zstd') {
      // WebAssembly, loaded on the first zstd-compressed write; level 3 is zstd's default.
      zstdCompressor ??= import('@hpcc-js/wasm-zstd').then(({ Zstd }) => Zstd.load());
      return (await zstdCompressor).compress(input, 3);
    }
    const { deflateSync } = await loadFflate();
    return deflateSync(input, { level: 6 });
  },
  async decompress(type, input, output) {
    try {
      if (type === 'zstd') {
        const { decompress } = await loadFzstd();
        return deliver(decompress(input.subarray(0, zstdFrameLength(input))), output);
      }
      const { inflateSync } = await loadFflate();
      const scratch = new Uint8Array(output.length);
      const produced = inflateSync(input, { out: scratch });
      return deliver(produced, output);
    } catch (error) {
      if (error instanceof BlockDeviceError) throw error;
      throw new BlockDeviceError('ECORRUPT', `compressed cluster: ${type} data is invalid`, { cause: error });
    }
  },
};
