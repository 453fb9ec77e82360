/**
 * Decompression with Node: raw deflate through node:zlib's asynchronous inflateRaw (on libuv's
 * thread pool, off the event loop), zstd through fzstd (pure JS; Node 20 has no zstd).
 */
import { promisify } from 'node:util';
import { constants, inflateRaw } from 'node:zlib';
import { BlockDeviceError } from '@qcowkit/blockdev';
import { pureCodecs, type Qcow2Codecs } from '../codecs.js';

const inflateRawAsync = promisify(inflateRaw) as (
  input: Uint8Array,
  options: { finishFlush: number; maxOutputLength: number },
) => Promise<Buffer>;

export const nodeCodecs: Qcow2Codecs = {
  async decompress(type, input, output) {
    if (type === 'zstd') return pureCodecs.decompress(type, input, output);
    let produced: Buffer;
    try {
      // Z_SYNC_FLUSH: a stream that fills the cluster without an end marker is accepted, as QEMU does.
      produced = await inflateRawAsync(input, {
        finishFlush: constants.Z_SYNC_FLUSH,
        maxOutputLength: output.length,
      });
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
