/**
 * Reuses the buffers of READ replies (header and data in one buffer) and of large WRITE payloads:
 * clients use the same few sizes again and again, and a fresh buffer per request costs a malloc,
 * a free and the garbage collector's sweeping of its ArrayBuffer, more than the protocol work
 * around it (4 KiB random reads spent about 7% of the server's CPU in malloc and free).
 *
 * Buffers of at least MINIMUM_POOLED bytes are made with their own ArrayBuffer (never a slice of
 * Node's shared pool), so they can be handed out again whole. Smaller ones come from Node's pool
 * and are not kept.
 */
export const MINIMUM_POOLED = 4096;

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private freeBytes = 0;

  constructor(private readonly maxFreeBytes = 64 * 1024 * 1024) {}

  /** A buffer of exactly `size` bytes with arbitrary content. */
  acquire(size: number): Buffer {
    if (size < MINIMUM_POOLED) return Buffer.allocUnsafe(size);
    const buffer = this.free.get(size)?.pop();
    if (buffer === undefined) return Buffer.allocUnsafeSlow(size);
    this.freeBytes -= size;
    return buffer;
  }

  /**
   * Gives back a buffer that `acquire` returned, once nothing refers to it any more (its socket
   * write or device write has completed). Small buffers are left to the garbage collector.
   */
  release(buffer: Buffer): void {
    const size = buffer.length;
    if (size < MINIMUM_POOLED || this.freeBytes + size > this.maxFreeBytes) return;
    let list = this.free.get(size);
    if (list === undefined) {
      list = [];
      this.free.set(size, list);
    }
    list.push(buffer);
    this.freeBytes += size;
  }

  /** True when `buffer` spans a whole ArrayBuffer of its own: it may have come from `acquire`. */
  static ownsWhole(buffer: Buffer): boolean {
    return buffer.byteOffset === 0 && buffer.buffer.byteLength === buffer.length;
  }
}
