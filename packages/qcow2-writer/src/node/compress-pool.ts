/**
 * A pool of worker threads compressing clusters (raw deflate), one batch per message, results in
 * the order asked. Size: the available cores by default. zstd is not available on Node 20's zlib:
 * asking for it rejects with EUNSUPPORTED.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { BlockDeviceError } from '@qcowkit/blockdev';
import type { ClusterCompressor, CompressionType } from '../compressor.js';
import type { CompressRequest, CompressResponse } from './compress-worker.js';

interface Pending {
  resolve(outputs: Uint8Array[]): void;
  reject(error: unknown): void;
}

export interface CompressorPool extends ClusterCompressor {
  readonly size: number;
  close(): Promise<void>;
}

/** Starts `size` worker threads (default: available cores). Close it when done. */
export function createCompressorPool(size = availableParallelism()): CompressorPool {
  const workerUrl = new URL('./compress-worker.js', import.meta.url);
  const workers: { worker: Worker; busy: number }[] = [];
  const pending = new Map<number, Pending>();
  let nextId = 0;
  let closed = false;
  for (let index = 0; index < Math.max(1, size); index++) {
    // No inherited flags: `node --input-type=module -e` would make the worker fail to start.
    const worker = new Worker(workerUrl, { execArgv: [] });
    worker.unref();
    const slot = { worker, busy: 0 };
    worker.on('message', (response: CompressResponse) => {
      slot.busy--;
      const request = pending.get(response.id);
      if (request === undefined) return;
      pending.delete(response.id);
      if (response.error !== undefined || response.output === undefined || response.lengths === undefined) {
        request.reject(new BlockDeviceError('EIO', `qcow2 compress: ${response.error ?? 'no output'}`));
        return;
      }
      const outputs: Uint8Array[] = [];
      let at = 0;
      for (const length of response.lengths) {
        outputs.push(response.output.subarray(at, at + length));
        at += length;
      }
      request.resolve(outputs);
    });
    worker.on('error', (error) => {
      for (const request of pending.values()) request.reject(error);
      pending.clear();
    });
    workers.push(slot);
  }
  return {
    size: workers.length,
    compressClusters(data: Uint8Array, clusterSize: number, type: CompressionType) {
      if (closed)
        return Promise.reject(new BlockDeviceError('ECLOSED', 'qcow2 compress: the pool is closed'));
      if (type !== 'zlib') {
        return Promise.reject(
          new BlockDeviceError(
            'EUNSUPPORTED',
            `qcow2 compress: ${type} compression is not available (Node 20 has no zstd)`,
          ),
        );
      }
      const id = nextId++;
      const slot = workers.reduce((best, candidate) => (candidate.busy < best.busy ? candidate : best));
      slot.busy++;
      return new Promise<Uint8Array[]>((resolve, reject) => {
        pending.set(id, { resolve, reject });
        // The caller gave `data` up: transfer its buffer when `data` spans all of it, else a copy.
        const owned =
          data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : data.slice();
        const request: CompressRequest = { id, data: owned, clusterSize };
        slot.worker.postMessage(request, [owned.buffer as ArrayBuffer]);
      });
    },
    async close() {
      closed = true;
      await Promise.all(workers.map(({ worker }) => worker.terminate()));
    },
  };
}
