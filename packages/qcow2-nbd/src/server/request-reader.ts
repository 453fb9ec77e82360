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
 * Large WRITE payloads may skip buffers altogether (`placeWrite`): the sink names a file and an
 * offset, staged bytes are written there at once and, once the reader knows the socket's
 * descriptor (`useSocket`), the rest is moved from the socket into the file by splice(2) (see
 * socket-splice.ts). When the socket runs dry in the middle, the next read takes a few bytes
 * (PROBE_SIZE) into the staging buffer, which go to the file the same way, and the splice goes on.
 *
 * Backpressure: when the sink refuses a request (returns false) the reader pauses; the unparsed
 * rest of the bytes it holds is kept until `resume`, and the caller stops reading the socket.
 */
import { writeSync } from 'node:fs';
import { errnoError, fsError } from '@qcowkit/blockdev/node';
import { REQUEST_HEADER_SIZE } from '../protocol/constants.js';
import { decodeRequestHeader, type RequestHeader } from '../protocol/requests.js';
import type { SocketSplicer } from './socket-splice.js';

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
  /**
   * Optional. A WRITE of at least PLACE_MINIMUM bytes has arrived: the file and offset its payload
   * may be written to directly (the request is valid and may be served now), or undefined for the
   * ordinary way (`request` with a buffer).
   */
  placeWrite?(request: RequestHeader): FilePlacement | undefined;
  /** The payload of a WRITE `placeWrite` placed has all arrived: in the file, or `error`. */
  placed?(request: RequestHeader, error: Error | undefined): void;
}

/** Where a placed WRITE's payload goes: a memory-backed file (writes there never wait). */
export interface FilePlacement {
  readonly fd: number;
  /** The file offset of the payload's first byte. */
  readonly offset: number;
  /** What to call the file in error messages. */
  readonly name: string;
}

/** Where payloads are received (the connection's buffer pool). */
export type AllocatePayload = (size: number) => Buffer;

/** Default size of the staging buffer, which receives headers and small payloads. */
const STAGING_SIZE = 32 * 1024;
/** Payload parts at least this long are received into the payload itself, not staged. */
export const DIRECT_MINIMUM = 16 * 1024;
/** WRITE payloads at least this long are offered to the sink's `placeWrite`. */
export const PLACE_MINIMUM = 64 * 1024 + 1;
/** What a read takes while a placed payload waits for the socket: the rest is spliced. */
const PROBE_SIZE = 4096;

interface Placement {
  readonly request: RequestHeader;
  readonly target: FilePlacement;
  readonly length: number;
  done: number;
  error: Error | undefined;
}

export class RequestReader {
  private readonly staging: Buffer;
  /** The staging buffer's first PROBE_SIZE bytes, and its first header's worth. */
  private readonly probe: Buffer;
  private readonly oneHeader: Buffer;
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
  /** A WRITE whose payload is being written straight into a file. */
  private placing: Placement | undefined;
  /** The last request was placed: the next read takes one header, so that a next large WRITE's
   * payload stays in the socket for the splice (a stream of them, as nbdcopy sends, then never
   * passes through our buffers). Any other request ends it. */
  private afterPlacement = false;
  /** The socket's descriptor and the splicer, once known (`useSocket`). */
  private socketFd = -1;
  private splicer: SocketSplicer | undefined;

  constructor(
    private readonly sink: RequestSink,
    private readonly allocate: AllocatePayload,
    stagingSize = STAGING_SIZE,
  ) {
    if (!Number.isSafeInteger(stagingSize) || stagingSize < REQUEST_HEADER_SIZE) {
      throw new RangeError(`RequestReader: staging size ${stagingSize} is too small`);
    }
    this.staging = Buffer.allocUnsafeSlow(stagingSize);
    this.probe = this.staging.subarray(0, Math.min(PROBE_SIZE, stagingSize));
    this.oneHeader = this.staging.subarray(0, REQUEST_HEADER_SIZE);
  }

  /**
   * The plain socket the bytes come from: the rest of a placed payload is then spliced from it
   * into the file, behind the reader's buffers. Only for a socket read with `nextBuffer` /
   * `received`, whose reads the caller stops between callbacks.
   */
  useSocket(fd: number, splicer: SocketSplicer): void {
    this.socketFd = fd;
    this.splicer = splicer;
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
    if (this.splicer !== undefined) {
      const placing = this.placing;
      if (placing !== undefined && placing.error === undefined) return this.probe;
      // Not while a failed placement's payload is being dropped, nor once stopped: 28-byte reads
      // there would only drain the socket slowly.
      if (
        this.afterPlacement &&
        placing === undefined &&
        this.headerFilled === 0 &&
        this.payload === undefined
      ) {
        return this.oneHeader;
      }
    }
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
      if (this.placing !== undefined) this.splice(this.placing);
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
    this.placing = undefined;
    this.afterPlacement = false;
  }

  private parse(bytes: Buffer, start: number, end: number): void {
    let position = start;
    while (position < end && !this.paused && !this.stopped) {
      const placing = this.placing;
      if (placing !== undefined) {
        const count = Math.min(end - position, placing.length - placing.done);
        if (placing.error === undefined) this.writePlaced(placing, bytes, position, count);
        placing.done += count;
        position += count;
        if (placing.done === placing.length) this.endPlacing(placing);
        continue;
      }
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
    this.afterPlacement = false;
    if (length === 0) {
      if (!this.sink.request(header, undefined)) this.paused = true;
      return;
    }
    if (length >= PLACE_MINIMUM && this.sink.placeWrite !== undefined) {
      const target = this.sink.placeWrite(header);
      if (target !== undefined) {
        this.afterPlacement = true;
        this.placing = { request: header, target, length, done: 0, error: undefined };
        return;
      }
    }
    this.current = header;
    this.payload = this.allocate(length);
    this.filled = 0;
  }

  /** Writes `count` staged bytes of a placed payload to its file, or records why not. */
  private writePlaced(placing: Placement, bytes: Buffer, position: number, count: number): void {
    const { fd, offset, name } = placing.target;
    let written = 0;
    try {
      while (written < count) {
        const at = offset + placing.done + written;
        const wrote = writeSync(fd, bytes, position + written, count - written, at);
        if (wrote === 0) throw errnoError('write', name, 'ENOSPC', at);
        written += wrote;
      }
    } catch (error) {
      placing.error = fsError('write', name, error, offset + placing.done + written);
    }
  }

  /** Moves what the socket holds of a placed payload into its file. */
  private splice(placing: Placement): void {
    const splicer = this.splicer;
    if (splicer === undefined || placing.error !== undefined || this.stopped) return;
    const { fd, offset, name } = placing.target;
    const at = offset + placing.done;
    const result = splicer.move(this.socketFd, fd, at, placing.length - placing.done);
    placing.done += result.taken;
    if (result.stopped === 'file') {
      placing.error = errnoError('write', name, result.errno ?? 'EIO', at);
    } else if (result.stopped === 'socket') {
      // This socket refuses splice: the rest of this payload and the next ones come by reads.
      this.splicer = undefined;
    }
    if (placing.done === placing.length) this.endPlacing(placing);
  }

  private endPlacing(placing: Placement): void {
    this.placing = undefined;
    this.sink.placed?.(placing.request, placing.error);
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
