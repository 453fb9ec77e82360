/**
 * Reuses the large reply buffers of READ (header and data in one buffer): clients read in the
 * same few sizes, and allocating then collecting a fresh 256 KiB or 1 MiB buffer per request
 * costs more than the protocol work around it. Small buffers come from Node's own pool.
 */
const MINIMUM_POOLED = 64 * 1024;

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private freeBytes = 0;

  constructor(private readonly maxFreeBytes = 64 * 1024 * 1024) {}

  /** A buffer of exactly `size` bytes with arbitrary content. */
  acquire(size: number): Buffer {
    if (size >= MINIMUM_POOLED) {
      const buffer = this.free.get(size)?.pop();
      if (buffer !== undefined) {
        this.freeBytes -= size;
        return buffer;
      }
    }
    return Buffer.allocUnsafe(size);
  }

  /** Gives a buffer back once nothing refers to it any more (its write has completed). */
  release(buffer: Buffer): void {
    const size = buffer.length;
    if (size < MINIMUM_POOLED || buffer.byteOffset !== 0 || buffer.buffer.byteLength !== size) return;
    if (this.freeBytes + size > this.maxFreeBytes) return;
    let list = this.free.get(size);
    if (list === undefined) {
      list = [];
      this.free.set(size, list);
    }
    list.push(buffer);
    this.freeBytes += size;
  }
}
