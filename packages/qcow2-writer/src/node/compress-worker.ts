/**
 * Worker thread body of the compressor pool: compresses each cluster of a batch with raw deflate
 * (4 KiB window, as QEMU's qcow2 driver inflates with windowBits -12). The batch arrives as a
 * transferred buffer and its outputs go back in one transferred buffer: no structured-clone copies.
 */
import { parentPort } from 'node:worker_threads';
import { constants, deflateRawSync } from 'node:zlib';

export interface CompressRequest {
  readonly id: number;
  readonly data: Uint8Array;
  readonly clusterSize: number;
}

export interface CompressResponse {
  readonly id: number;
  /** All outputs back to back. */
  readonly output?: Uint8Array;
  readonly lengths?: Uint32Array;
  readonly error?: string;
}

const port = parentPort;
if (port !== null) {
  port.on('message', (request: CompressRequest) => {
    try {
      const count = Math.ceil(request.data.length / request.clusterSize);
      const outputs: Uint8Array[] = [];
      const lengths = new Uint32Array(count);
      let total = 0;
      for (let index = 0; index < count; index++) {
        const input = request.data.subarray(index * request.clusterSize, (index + 1) * request.clusterSize);
        const deflated = deflateRawSync(input, {
          windowBits: 12,
          memLevel: 9,
          level: constants.Z_DEFAULT_COMPRESSION,
        });
        // Not smaller: the piece itself (stored uncompressed by the caller).
        const output = deflated.length >= request.clusterSize ? input : deflated;
        outputs.push(output);
        lengths[index] = output.length;
        total += output.length;
      }
      const output = new Uint8Array(total);
      let at = 0;
      for (const chunk of outputs) {
        output.set(chunk, at);
        at += chunk.length;
      }
      const response: CompressResponse = { id: request.id, output, lengths };
      port.postMessage(response, [output.buffer, lengths.buffer]);
    } catch (error) {
      port.postMessage({ id: request.id, error: String(error) } satisfies CompressResponse);
    }
  });
}
