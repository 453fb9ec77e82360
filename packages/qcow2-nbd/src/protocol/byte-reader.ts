/**
 * A pull-style reader over a push-style socket for the handshake (and test clients): callers ask for
 * exactly n bytes. Bytes are buffered as they arrive; the socket is paused while more than
 * `highWaterMark` bytes wait, so a client sending faster than we serve is slowed down by TCP
 * rather than by our memory.
 */
import type { Duplex } from 'node:stream';

export class StreamEndedError extends Error {
  override name = 'StreamEndedError';
}

export class ByteReader {
  private chunks: Buffer[] = [];
  private head = 0; // bytes of chunks[0] already consumed
  private buffered = 0;
  private ended = false;
  private endError: Error | undefined;
  private waiter: (() => void) | undefined;
  private paused = false;
  /** Size of the read waiting for data (never pause below it, or it would wait forever). */
  private wanted = 0;
  private readonly onData = (chunk: Buffer) => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    if (this.buffered > this.highWaterMark && this.buffered >= this.wanted && !this.paused) {
      this.paused = true;
      this.stream.pause();
    }
    this.wake();
  };
  private readonly onEnd = () => {
    this.ended = true;
    this.wake();
  };
  private readonly onError = (error: Error) => {
    this.ended = true;
    this.endError = error;
    this.wake();
  };

  constructor(
    private stream: Duplex,
    private readonly highWaterMark = 1024 * 1024,
  ) {
    this.attach();
  }

  /** Stops listening to the stream (for STARTTLS); returns any bytes already buffered. */
  detach(): Buffer {
    this.stream.off('data', this.onData);
    this.stream.off('end', this.onEnd);
    this.stream.off('close', this.onEnd);
    this.stream.off('error', this.onError);
    this.stream.pause();
    const rest = this.buffered > 0 ? this.take(this.buffered) : Buffer.alloc(0);
    return rest;
  }

  /** Listens to another stream from now on (the TLS socket after STARTTLS). */
  reattach(stream: Duplex): void {
    this.stream = stream;
    this.ended = false;
    this.endError = undefined;
    this.paused = false;
    this.attach();
  }

  private attach(): void {
    this.stream.on('data', this.onData);
    this.stream.on('end', this.onEnd);
    this.stream.on('close', this.onEnd);
    this.stream.on('error', this.onError);
    this.stream.resume();
  }

  private wake(): void {
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.();
  }

  /**
   * Waits for exactly `n` bytes. Rejects with StreamEndedError when the stream ends first. Bytes
   * within one received chunk come back as a view of it; bytes spanning chunks are copied.
   */
  async read(n: number): Promise<Buffer> {
    for (;;) {
      if (this.buffered >= n) return this.take(n);
      if (this.ended) {
        throw new StreamEndedError(
          this.endError === undefined
            ? `connection closed while waiting for ${n} bytes`
            : `connection failed: ${this.endError.message}`,
          { cause: this.endError },
        );
      }
      this.wanted = n;
      if (this.paused) {
        this.paused = false;
        this.stream.resume();
      }
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
      });
      this.wanted = 0;
    }
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    this.buffered -= n;
    let out: Buffer;
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) {
      out = first.subarray(this.head, this.head + n);
      this.head += n;
      if (this.head === first.length) {
        this.chunks.shift();
        this.head = 0;
      }
    } else {
      out = Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const chunk = this.chunks[0]!;
        const count = Math.min(chunk.length - this.head, n - filled);
        chunk.copy(out, filled, this.head, this.head + count);
        filled += count;
        this.head += count;
        if (this.head === chunk.length) {
          this.chunks.shift();
          this.head = 0;
        }
      }
    }
    if (this.paused && this.buffered <= this.highWaterMark) {
      this.paused = false;
      this.stream.resume();
    }
    return out;
  }
}
