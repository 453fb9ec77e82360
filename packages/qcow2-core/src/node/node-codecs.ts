/**
 * Decompression with Node: raw deflate through node:zlib, zstd through fzstd (pure JS; Node 20 has
 * no zstd).
 *
 * Clusters up to 256 KiB are inflated synchronously: node:zlib's asynchronous API goes through a
 * stream per call, whose overhead (about twice the inflate itself for a 64 KiB cluster, measured)
 * outweighs the thread pool's help, and one such inflate keeps the event loop for well under a
 * millisecond. Larger clusters (up to 2 MiB) use the asynchronous inflateRaw on libuv's thread pool.
 */
import { promisify } from 'node:util';
import { BlockDeviceError } from '@qcowkit/blockdev';
import { pureCodecs, type Qcow2Codecs } from '../codecs.js';

/** Largest output inflated on the event loop. */
const SYNC_INFLATE_MAX_BYTES = 256 * 1024;

interface Zlib {
  readonly Z_SYNC_FLUSH: number;
  inflateRawSync(input: Uint8Array, options: { finishFlush: number; maxOutputLength: number }): Buffer;
  inflateRawAsync(
    input: Uint8Array,
    options: { finishFlush: number; maxOutputLength: number },
  ): Promise<Buffer>;
  deflateRawAsync(input: Uint8Array, options: { windowBits: number; level: number }): Promise<Buffer>;
}

/** node:zlib, loaded on the first compressed cluster (most images have none). */
let zlib: Promise<Zlib> | undefined;
const loadZlib = (): Promise<Zlib> =>
  (zlib ??= import('node:zlib').then(
    ({ constants, deflateRaw, inflateRaw, inflateRawSync }): Zlib => ({
      Z_SYNC_FLUSH: constants.Z_SYNC_FLUSH,
      inflateRawSync,
      inflateRawAsync: promisify(inflateRaw) as Zlib['inflateRawAsync'],
      deflateRawAsync: promisify(deflateRaw) as Zlib['deflateRawAsync'],
    }),
  ));

export const nodeCodecs: Qcow2Codecs = {
  async compress(type, input) {
    if (type === 'zstd') return pureCodecs.compress!(type, input);
    // A 4 KiB window (windowBits 12) as QEMU uses for compressed clusters.
    const { deflateRawAsync } = await loadZlib();
    const output = await deflateRawAsync(input, { windowBits: 12, level: 6 });
    return new Uint8Array(output.buffer, output.byteOffset, output.byteLength);
  },
  async decompress(type, input, output) {
    if (type === 'zstd') return pureCodecs.decompress(type, input, output);
    const { Z_SYNC_FLUSH, inflateRawSync, inflateRawAsync } = await loadZlib();
    // Z_SYNC_FLUSH: a stream that fills the cluster without an end marker is accepted, as QEMU does.
    const options = { finishFlush: Z_SYNC_FLUSH, maxOutputLength: output.length };
    let produced: Buffer;
    try {
      produced =
        output.length <= SYNC_INFLATE_MAX_BYTES
          ? inflateRawSync(input, options)
          : await inflateRawAsync(input, options);
    } catch (error) {
      // More output than a cluster: QEMU takes the first cluster's worth; the pure codec does that.
      if ((error as { code?: string }).code === 'ERR_BUFFER_TOO_LARGE')
        return pureCodecs.decompress(type, input, output);
      throw new BlockDeviceError('ECORRUPT', 'compressed cluster: deflate data is invalid', { cause: error });
    }
    output.set(produced);
    return produced.length;
  },
};
