/**
 * Worker thread body of the compressor pool: compresses each cluster of a batch, with raw deflate
 * (4 KiB window, as QEMU's qcow2 driver inflates with windowBits -12) or zstd (one frame a
 * cluster, level 3). The batch arrives as a transferred buffer; the outputs go back back to back
 * in one transferred buffer (the caller's `scratch` when it sent one large enough), and the input
 * buffer goes back too, so the caller can reuse both: no structured-clone copies, no allocation per
 * batch once the buffers circulate.
 */
import { parentPort } from 'node:worker_threads';
import { constants, deflateRawSync } from 'node:zlib';
import type { CompressionType } from '../compressor.js';
import { loadZstdEncoder, type ZstdEncoder } from './zstd-encoder.js';

export interface CompressRequest {
  readonly id: number;
  readonly data: Uint8Array;
  /** Bytes of `data` to compress, from its start. */
  readonly length: number;
  readonly clusterSize: number;
  readonly type: CompressionType;
  /** A buffer of at least `length` bytes to write the outputs into (else one is allocated). */
  readonly scratch?: ArrayBuffer | SharedArrayBuffer;
}

export interface CompressResponse {
  readonly id: number;
  /** The request's `data`, handed back. */
  readonly input?: Uint8Array;
  /** All outputs back to back. */
  readonly output?: Uint8Array;
  readonly lengths?: Uint32Array;
  readonly error?: string;
}

function compressBatch(request: CompressRequest, zstd: ZstdEncoder | undefined): CompressResponse {
  const { data, clusterSize } = request;
  const length = request.length;
  const count = Math.ceil(length / clusterSize);
  const lengths = new Uint32Array(count);
  const output =
    request.scratch !== undefined && request.scratch.byteLength >= length
      ? new Uint8Array(request.scratch, 0, length)
      : new Uint8Array(length);
  let at = 0;
  for (let index = 0; index < count; index++) {
    const input = data.subarray(index * clusterSize, Math.min(length, (index + 1) * clusterSize));
    let compressed: Uint8Array | undefined;
    if (zstd !== undefined) {
      compressed = zstd.compress(input, input.length);
    } else {
      const deflated = deflateRawSync(input, {
        windowBits: 12,
        memLevel: 9,
        level: constants.Z_DEFAULT_COMPRESSION,
      });
      compressed = deflated.length < input.length ? deflated : undefined;
    }
    // Not smaller: the piece itself (stored uncompressed by the caller).
    const stored = compressed ?? input;
    output.set(stored, at);
    lengths[index] = stored.length;
    at += stored.length;
  }
  return { id: request.id, input: data, output: output.subarray(0, at), lengths };
}

const port = parentPort;
if (port !== null) {
  port.on('message', (request: CompressRequest) => {
    const encoder = request.type === 'zstd' ? loadZstdEncoder() : undefined;
    const run = (zstd: ZstdEncoder | undefined) => {
      try {
        const response = compressBatch(request, zstd);
        // Shared buffers are shared, not transferred.
        const transfer = [response.lengths!.buffer as ArrayBuffer];
        for (const view of [response.output!, response.input!])
          if (view.buffer instanceof ArrayBuffer && !transfer.includes(view.buffer))
            transfer.push(view.buffer);
        port.postMessage(response, transfer);
      } catch (error) {
        port.postMessage({ id: request.id, error: String(error) } satisfies CompressResponse);
      }
    };
    if (encoder === undefined) run(undefined);
    else
      encoder.then(run, (error: unknown) =>
        port.postMessage({ id: request.id, error: `zstd: ${String(error)}` } satisfies CompressResponse),
      );
  });
}
