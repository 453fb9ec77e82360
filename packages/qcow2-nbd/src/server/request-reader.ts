/**
 * The framing of the transmission phase: bytes in, whole requests out (the 28-byte header and, for
 * WRITE, its payload), delivered synchronously as the bytes arrive, so a request costs no promise
 * and no await of its own.
 *
 * It is fed in one of two ways. From a socket reading into buffers the reader chooses
 * (`nextBuffer` / `received`, Node's `onread` option): headers and small payloads land in a
 * staging buffer, and the rest of a large WRITE payload is received straight into the buffer the
 * device will write from, one recv for the lot as nbdkit does, instead of through Node's 64 KiB
 * read chunks and a copy. Or from a stream's chunks (`feed`, for TLS).
 *
 * Backpressure: when the sink refuses a request (returns false) the reader pauses; the unparsed
 * rest of the bytes it holds is kept until `resume`, and the caller stops reading the socket.
 */
import { REQUEST_HEADER_SIZE } from '../protocol/constants.js';
import { decodeRequestHeader, type RequestHeader } from '../protocol/requests.js';

export interface RequestSink {
  /**
   * A header has arrived. Returns how many payload bytes follow it, or -1 to stop reading for
   * good (a bad magic, a disconnect, a payload too large to trust).
   */
  header(request: RequestHeader): number;
  /**
   * A whole request with its payload (undefined when its length is 0). Returns false to pause the
   * reader until `resume`.
   */
  request(request: RequestHeader, payload: Buffer | undefined): boolean;
}

/** Where payloads are received (the connection's buffer pool). */
export type AllocatePayload = (size: number) => Buffer;

/** Default size of the staging buffer, which receives headers and small payloads. */
const STAGING_SIZE = 32 * 1024;
/** Payload parts at least this long are received into the payload itself, not staged. */
export const DIRECT_MINIMUM = 16 * 1024;

export class RequestReader {
  private readonly staging: Buffer;
  /** Bytes of a header split across reads. */
  private readonly headerBytes = Buffer.allocUnsafe(REQUEST_HEADER_SIZE);
  private headerFilled = 0;
  /** The request whose payload is being received, its payload, and the bytes of it received. */
  private current: RequestHeader | undefined;
  private payload: Buffer | undefined;
  private filled = 0;
  /** Unparsed bytes kept while paused (a copy: staging buffers are reused). */
  private held: Buffer | undefined;
  private paused = false;
  private stopped = false;

  constructor(
    private readonly sink: RequestSink,
    private readonly allocate: AllocatePayload,
    stagingSize = STAGING_SIZE,
  ) {
    if (!Number.isSafeInteger(stagingSize) || stagingSize < REQUEST_HEADER_SIZE) {
      throw new RangeError(`RequestReader: staging size ${stagingSize} is too small`);
    }
    this.staging = Buffer.allocUnsafeSlow(stagingSize);
  }

  /** False while paused by the sink (bytes are dropped once stopped, so reading goes on). */
  get accepting(): boolean {
    return !this.paused || this.stopped;
  }

  get isStopped(): boolean {
    return this.stopped;
  }

  /**
   * Where the next read should put its bytes: the rest of a large payload being received, or the
   * staging buffer. Never empty. Whatever lands there must be passed to `received`.
   */
  nextBuffer(): Uint8Array {
    const payload = this.payload;
    if (payload !== undefined && payload.length - this.filled >= DIRECT_MINIMUM) {
      return payload.subarray(this.filled);
    }
    return this.staging;
  }

  /**
   * `count` bytes were read into `buffer` (the last one `nextBuffer` returned). Returns false when
   * reading should stop until `resume` (paused). Once stopped, bytes are dropped and reading goes
   * on, so the end of the stream is seen.
   */
  received(buffer: Uint8Array, count: number): boolean {
    if (this.stopped) return true;
    if (buffer.buffer === this.staging.buffer) {
      this.parse(this.staging, 0, count);
    } else {
      // Straight into the payload: nothing to copy.
      this.filled += count;
      if (this.filled === this.payload!.length) this.deliver();
    }
    return this.accepting;
  }

  /** A chunk from a stream. Returns false when reading should stop (paused). */
  feed(chunk: Buffer): boolean {
    if (this.stopped) return true;
    this.parse(chunk, 0, chunk.length);
    return this.accepting;
  }

  /** Continues after a pause: parses the bytes held back. Returns true when reading may resume. */
  resume(): boolean {
    if (this.stopped) return true;
    this.paused = false;
    const held = this.held;
    if (held !== undefined) {
      this.held = undefined;
      this.parse(held, 0, held.length);
    }
    return this.accepting;
  }

  /** Stops delivering requests; what is held and any payload being received are dropped. */
  stop(): void {
    this.stopped = true;
    this.held = undefined;
    this.current = undefined;
    this.payload = undefined;
  }

  private parse(bytes: Buffer, start: number, end: number): void {
    let position = start;
    while (position < end && !this.paused && !this.stopped) {
      const payload = this.payload;
      if (payload !== undefined) {
        const count = Math.min(end - position, payload.length - this.filled);
        bytes.copy(payload, this.filled, position, position + count);
        this.filled += count;
        position += count;
        if (this.filled === payload.length) this.deliver();
        continue;
      }
      let header: RequestHeader;
      if (this.headerFilled === 0 && end - position >= REQUEST_HEADER_SIZE) {
        header = decodeRequestHeader(bytes, position);
        position += REQUEST_HEADER_SIZE;
      } else {
        const count = Math.min(REQUEST_HEADER_SIZE - this.headerFilled, end - position);
        bytes.copy(this.headerBytes, this.headerFilled, position, position + count);
        this.headerFilled += count;
        position += count;
        if (this.headerFilled < REQUEST_HEADER_SIZE) break;
        this.headerFilled = 0;
        header = decodeRequestHeader(this.headerBytes);
      }
      this.begin(header);
    }
    if (position < end && !this.stopped) {
      // Paused: keep the rest, copied (the staging buffer takes the next read).
      this.held = Buffer.from(bytes.subarray(position, end));
    }
  }

  private begin(header: RequestHeader): void {
    const length = this.sink.header(header);
    if (length < 0) {
      this.stop();
      return;
    }
    if (length === 0) {
      if (!this.sink.request(header, undefined)) this.paused = true;
      return;
    }
    this.current = header;
    this.payload = this.allocate(length);
    this.filled = 0;
  }

  private deliver(): void {
    const request = this.current!;
    const payload = this.payload;
    this.current = undefined;
    this.payload = undefined;
    this.filled = 0;
    if (!this.sink.request(request, payload)) this.paused = true;
  }
}
