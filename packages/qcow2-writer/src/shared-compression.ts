/**
 * Compression through a few fixed shared-memory buffers, for callers that keep the results (the
 * two-pass conversion caches and spools them): each batch is copied into a free slot, compressed
 * in place by a compressor that has `compressBatch` (the node entry's worker pool), and its outputs
 * copied out into one buffer of their own size. Nothing crosses threads but slot indexes, so memory
 * stays at the slots plus the outputs kept, instead of a transferred buffer per batch (which a
 * worker pool's garbage collection released late: hundreds of MiB). Other compressors, or batches
 * larger than a slot, go to `compressClusters` as they are.
 */
import { batchOutputs, type ClusterCompressor, type CompressionType } from './compressor.js';

interface Slot {
  input: Uint8Array;
  scratch: ArrayBuffer | SharedArrayBuffer;
}

export class SharedCompression {
  private readonly free: Slot[] = [];
  private created = 0;
  private readonly waiting: ((slot: Slot) => void)[] = [];

  constructor(
    private readonly compressor: ClusterCompressor,
    private readonly slotBytes: number,
    private readonly maxSlots: number,
  ) {}

  async compress(data: Uint8Array, clusterSize: number, type: CompressionType): Promise<Uint8Array[]> {
    const compressor = this.compressor;
    if (
      compressor.compressBatch === undefined ||
      typeof SharedArrayBuffer !== 'function' ||
      data.length > this.slotBytes
    ) {
      return compressor.compressClusters(data, clusterSize, type);
    }
    const slot = await this.acquire();
    try {
      slot.input.set(data);
      const batch = await compressor.compressBatch(slot.input, clusterSize, type, slot.scratch, data.length);
      if (batch.input.byteLength >= this.slotBytes) slot.input = batch.input;
      if (batch.output.buffer.byteLength >= this.slotBytes) slot.scratch = batch.output.buffer;
      return batchOutputs(batch.output.slice(), batch.lengths);
    } finally {
      this.release(slot);
    }
  }

  private acquire(): Promise<Slot> {
    const slot = this.free.pop();
    if (slot !== undefined) return Promise.resolve(slot);
    if (this.created < this.maxSlots) {
      this.created++;
      return Promise.resolve({
        input: new Uint8Array(new SharedArrayBuffer(this.slotBytes)),
        scratch: new SharedArrayBuffer(this.slotBytes),
      });
    }
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  private release(slot: Slot): void {
    const next = this.waiting.shift();
    if (next !== undefined) next(slot);
    else this.free.push(slot);
  }
}
