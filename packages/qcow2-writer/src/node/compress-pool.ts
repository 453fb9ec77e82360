/**
 * A pool of worker threads compressing clusters (raw deflate through node:zlib, or zstd through
 * WebAssembly), one batch per message, each to the least busy worker. Size: the available cores
 * by default. Buffers are transferred both ways: `compressBatch` hands the input back with the
 * outputs so a caller can keep a fixed set of buffers circulating.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { BlockDeviceError } from '@qcowkit/blockdev';
import {
  batchOutputs,
  type ClusterCompressor,
  type CompressedBatch,
  type CompressionType,
} from '../compressor.js';
import type { CompressRequest, CompressResponse } from './compress-worker.js';

interface Pending {
  resolve(batch: CompressedBatch): void;
  reject(error: unknown): void;
}

export type { CompressedBatch };

/**
 * A compressor whose `compressBatch` is always there: `data` is transferred to a worker (detached
 * on return; the result hands it back), and so is `scratch` when it holds at least `length` bytes.
 */
export type CompressorPool = ClusterCompressor &
  Required<Pick<ClusterCompressor, 'compressBatch' | 'close'>> & {
    readonly size: number;
  };

/** A view over the whole of its buffer (transferable as is), else a copy that is. */
function ownedView(data: Uint8Array): Uint8Array {
  return data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : data.slice();
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
      const { input, output, lengths } = response;
      if (
        response.error !== undefined ||
        input === undefined ||
        output === undefined ||
        lengths === undefined
      ) {
        request.reject(new BlockDeviceError('EIO', `qcow2 compress: ${response.error ?? 'no output'}`));
        return;
      }
      request.resolve({ input, output, lengths });
    });
    worker.on('error', (error) => {
      for (const request of pending.values()) request.reject(error);
      pending.clear();
    });
    workers.push(slot);
  }
  const compressBatch = (
    data: Uint8Array,
    clusterSize: number,
    type: CompressionType,
    scratch?: ArrayBuffer | SharedArrayBuffer,
    length = data.length,
  ): Promise<CompressedBatch> => {
    if (closed) return Promise.reject(new BlockDeviceError('ECLOSED', 'qcow2 compress: the pool is closed'));
    if (type !== 'zlib' && type !== 'zstd') {
      return Promise.reject(
        new BlockDeviceError('EUNSUPPORTED', `qcow2 compress: unknown compression type ${String(type)}`),
      );
    }
    const id = nextId++;
    const slot = workers.reduce((best, candidate) => (candidate.busy < best.busy ? candidate : best));
    slot.busy++;
    return new Promise<CompressedBatch>((resolve, reject) => {
      pending.set(id, { resolve, reject });
      // The caller gave `data` up: transfer its buffer when `data` spans all of it, else a copy.
      const owned = ownedView(data);
      const usable = scratch !== undefined && scratch.byteLength >= length && scratch !== owned.buffer;
      const request: CompressRequest = {
        id,
        data: owned,
        length: Math.min(length, owned.length),
        clusterSize,
        type,
        ...(usable ? { scratch } : {}),
      };
      // Shared buffers (SharedArrayBuffer) are shared with the worker; others are transferred.
      const transfer: ArrayBuffer[] = [];
      if (owned.buffer instanceof ArrayBuffer) transfer.push(owned.buffer);
      if (usable && scratch instanceof ArrayBuffer) transfer.push(scratch);
      slot.worker.postMessage(request, transfer);
    });
  };
  return {
    size: workers.length,
    compressBatch,
    async compressClusters(data: Uint8Array, clusterSize: number, type: CompressionType) {
      const { output, lengths } = await compressBatch(data, clusterSize, type);
      return batchOutputs(output, lengths);
    },
    async close() {
      closed = true;
      await Promise.all(workers.map(({ worker }) => worker.terminate()));
    },
  };
}
