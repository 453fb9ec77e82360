/**
 * Where an image goes: every sink is reduced to a {@link ByteSink} that appends bytes in order.
 * Nothing here seeks: the writer lays the image out so that one forward pass is enough.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';

/** An append-only byte consumer. */
export interface ByteSink {
  /** Appends `chunk`. The writer never touches `chunk` again after passing it. */
  write(chunk: Uint8Array): Promise<void>;
  /** Appends `length` zero bytes; a file sink may leave a hole instead. */
  skip?(length: number): Promise<void>;
  /** Ends the output (flushes, closes). */
  close(): Promise<void>;
  /** Ends the output after a failure (best effort). */
  abort?(reason: unknown): Promise<void>;
}

/** The parts of a Node `Writable` the writer uses (no node:stream import needed). */
export interface NodeWritableLike {
  write(chunk: Uint8Array, callback?: (error?: Error | null) => void): boolean;
  end(callback?: () => void): unknown;
  once(event: string, listener: (...args: unknown[]) => void): unknown;
  removeListener(event: string, listener: (...args: unknown[]) => void): unknown;
  destroy?(error?: Error): unknown;
  readonly writableNeedDrain?: boolean;
}

/** Anything the writer can write to (the node entry adds file paths). */
export type Qcow2Sink =
  | ByteSink
  | WritableStream<Uint8Array>
  | NodeWritableLike
  | ((chunk: Uint8Array) => unknown);

const ZEROS = new Uint8Array(1024 * 1024);

/** Appends `length` zero bytes to `sink` (its `skip` when it has one). */
export async function writeZeroBytes(sink: ByteSink, length: number): Promise<void> {
  if (length <= 0) return;
  if (sink.skip !== undefined) return sink.skip(length);
  for (let left = length; left > 0; left -= ZEROS.length) {
    await sink.write(left >= ZEROS.length ? ZEROS : ZEROS.subarray(0, left));
  }
}

function isWebWritable(sink: unknown): sink is WritableStream<Uint8Array> {
  return typeof (sink as WritableStream).getWriter === 'function';
}

function isNodeWritable(sink: unknown): sink is NodeWritableLike {
  const candidate = sink as NodeWritableLike;
  return typeof candidate.write === 'function' && typeof candidate.once === 'function';
}

function isByteSink(sink: unknown): sink is ByteSink {
  const candidate = sink as ByteSink;
  return typeof candidate.write === 'function' && typeof candidate.close === 'function';
}

/** Adapts any supported sink. A Node Writable is ended on close but not destroyed on success. */
export function toByteSink(sink: Qcow2Sink): ByteSink {
  if (typeof sink === 'function') {
    return {
      write: async (chunk) => {
        await sink(chunk);
      },
      close: async () => {},
    };
  }
  if (isWebWritable(sink)) return webWritableSink(sink);
  if (isNodeWritable(sink)) return nodeWritableSink(sink);
  if (isByteSink(sink)) return sink;
  throw new BlockDeviceError('EINVAL', 'qcow2 writer: the sink is not a ByteSink, stream or function');
}

function webWritableSink(stream: WritableStream<Uint8Array>): ByteSink {
  const writer = stream.getWriter();
  let failure: unknown;
  return {
    async write(chunk) {
      if (failure !== undefined) throw failure;
      await writer.ready;
      writer.write(chunk).catch((error: unknown) => {
        failure ??= error;
      });
    },
    async close() {
      await writer.close();
      if (failure !== undefined) throw failure;
    },
    async abort(reason) {
      await writer.abort(reason).catch(() => {});
    },
  };
}

function nodeWritableSink(stream: NodeWritableLike): ByteSink {
  let failure: Error | undefined;
  const onError = (error: unknown) => {
    failure ??= error instanceof Error ? error : new Error(String(error));
  };
  stream.once('error', onError);
  const waitDrain = () =>
    new Promise<void>((resolve, reject) => {
      const done = () => {
        stream.removeListener('error', fail);
        stream.removeListener('close', closed);
        resolve();
      };
      const fail = (error: unknown) => {
        stream.removeListener('drain', done);
        stream.removeListener('close', closed);
        reject(error);
      };
      const closed = () => {
        stream.removeListener('drain', done);
        stream.removeListener('error', fail);
        reject(failure ?? new BlockDeviceError('EIO', 'qcow2 writer: the output stream closed early'));
      };
      stream.once('drain', done);
      stream.once('error', fail);
      stream.once('close', closed);
    });
  return {
    async write(chunk) {
      if (failure !== undefined) throw failure;
      if (!stream.write(chunk)) await waitDrain();
    },
    async close() {
      if (failure !== undefined) throw failure;
      await new Promise<void>((resolve, reject) => {
        const fail = (error: unknown) => reject(error);
        stream.once('error', fail);
        stream.end(() => {
          stream.removeListener('error', fail);
          resolve();
        });
      });
      stream.removeListener('error', onError);
      if (failure !== undefined) throw failure;
    },
    async abort(reason) {
      stream.removeListener('error', onError);
      stream.destroy?.(reason instanceof Error ? reason : undefined);
    },
  };
}

/**
 * Tracks the output position and coalesces small writes into large chunks. `writeAt` asserts the
 * layout: every piece lands exactly where the plan put it (gaps are zero-filled).
 */
export class OutputWriter {
  private buffer: Uint8Array;
  private used = 0;
  position = 0;

  constructor(
    private readonly sink: ByteSink,
    private readonly chunkSize = 4 * 1024 * 1024,
  ) {
    this.buffer = new Uint8Array(chunkSize);
  }

  async writeAt(hostOffset: number, bytes: Uint8Array): Promise<void> {
    if (hostOffset < this.position) {
      throw new BlockDeviceError(
        'EINVAL',
        `qcow2 writer: layout error, write at 0x${hostOffset.toString(16)} behind 0x${this.position.toString(16)}`,
      );
    }
    await this.zeroTo(hostOffset);
    await this.append(bytes);
  }

  /** Appends zeros up to `hostOffset`. */
  async zeroTo(hostOffset: number): Promise<void> {
    const gap = hostOffset - this.position;
    if (gap <= 0) return;
    const small = gap <= 65536 || this.sink.skip === undefined;
    if (small && gap <= this.chunkSize - this.used) {
      this.buffer.fill(0, this.used, this.used + gap);
      this.used += gap;
      this.position += gap;
      return;
    }
    await this.flushBuffer();
    await writeZeroBytes(this.sink, gap);
    this.position += gap;
  }

  async append(bytes: Uint8Array): Promise<void> {
    if (bytes.length >= this.chunkSize / 4) {
      await this.flushBuffer();
      await this.sink.write(bytes);
      this.position += bytes.length;
      return;
    }
    if (bytes.length > this.chunkSize - this.used) await this.flushBuffer();
    this.buffer.set(bytes, this.used);
    this.used += bytes.length;
    this.position += bytes.length;
  }

  async flushBuffer(): Promise<void> {
    if (this.used === 0) return;
    const chunk = this.buffer.subarray(0, this.used);
    this.buffer = new Uint8Array(this.chunkSize);
    this.used = 0;
    await this.sink.write(chunk);
  }
}
