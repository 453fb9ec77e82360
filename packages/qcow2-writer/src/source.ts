/**
 * Sources of a conversion: any BlockDevice (seekable: block status, two passes), or a raw byte
 * stream of known size (read once, front to back).
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';

/** A raw disk image arriving as a stream: a Node Readable, a web ReadableStream, any async iterable. */
export interface RawStreamSource {
  /** Exact number of bytes the stream delivers (the guest size). */
  readonly size: number;
  readonly stream: AsyncIterable<Uint8Array> | ReadableStream<Uint8Array>;
}

export type ConvertSource = BlockDevice | RawStreamSource;

export function isBlockDevice(source: ConvertSource): source is BlockDevice {
  return typeof (source as BlockDevice).blockStatus === 'function';
}

/** Reads a byte stream in exact-length pieces. */
export class StreamReader {
  private readonly iterator: AsyncIterator<Uint8Array>;
  private pending: Uint8Array | undefined;
  private consumed = 0;

  constructor(stream: AsyncIterable<Uint8Array> | ReadableStream<Uint8Array>) {
    const iterable = stream as AsyncIterable<Uint8Array>;
    if (typeof iterable[Symbol.asyncIterator] !== 'function') {
      throw new BlockDeviceError('EINVAL', 'qcow2 writer: the raw stream is not async iterable');
    }
    this.iterator = iterable[Symbol.asyncIterator]();
  }

  /** Fills `target` completely; throws EIO when the stream ends first. */
  async readInto(target: Uint8Array): Promise<void> {
    let filled = 0;
    while (filled < target.length) {
      if (this.pending === undefined || this.pending.length === 0) {
        const next = await this.iterator.next();
        if (next.done) {
          throw new BlockDeviceError(
            'EIO',
            `qcow2 writer: the raw stream ended after ${this.consumed + filled} bytes, before its declared size`,
          );
        }
        this.pending =
          next.value instanceof Uint8Array ? next.value : new Uint8Array(next.value as ArrayBuffer);
      }
      const take = Math.min(this.pending.length, target.length - filled);
      target.set(this.pending.subarray(0, take), filled);
      this.pending = this.pending.subarray(take);
      filled += take;
    }
    this.consumed += filled;
  }

  async cancel(): Promise<void> {
    await this.iterator.return?.();
  }
}
