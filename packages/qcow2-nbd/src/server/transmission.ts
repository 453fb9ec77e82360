/**
 * The transmission phase of one connection: requests are parsed as their bytes arrive (a
 * RequestReader), validated, and dispatched without waiting for earlier ones; each is answered
 * when it completes. The bytes held for requests in flight (read data, write payloads, replies not
 * yet written, error replies included) are bounded: past the bound the reader pauses and the
 * socket is no longer read, its buffers fill and the client is slowed down. Once the client is
 * gone, requests not yet started are dropped.
 */
import type { Extent } from '@qcowkit/blockdev';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOTSUP,
  NBD_ESHUTDOWN,
  NBD_MAX_PAYLOAD_SIZE,
  NBD_REQUEST_MAGIC,
  NBD_STATE_DIRTY,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  REQUEST_HEADER_SIZE,
  SIMPLE_REPLY_HEADER_SIZE,
} from '../protocol/constants.js';
import {
  type BlockStatusDescriptor,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetDataChunk,
  encodeOffsetHoleChunk,
  encodeSimpleReply,
  OFFSET_DATA_PAYLOAD_START,
} from '../protocol/replies.js';
import {
  commandName,
  decodeRequestHeader,
  type RequestContext,
  type RequestHeader,
  validateRequest,
} from '../protocol/requests.js';
import { BufferPool } from './buffer-pool.js';
import type { ConnectionIo, ReadMode } from './connection-io.js';
import type { DataExtentCache } from './data-extent-cache.js';
import {
  CONTEXT_ID_ALLOCATION_DEPTH,
  CONTEXT_ID_BASE_ALLOCATION,
  type DirtyExtent,
  dirtyBitmapOf,
  isExportReadOnly,
  type NbdDirtyBitmap,
} from './export.js';
import type { Session } from './handshake.js';
import { errorMessage, nbdErrorName, toNbdError } from './nbd-errors.js';
import { type FilePlacement, RequestReader, type RequestSink } from './request-reader.js';

/**
 * READs at least this long of an export with a `fileSource` leave by sendfile(2) (see
 * connection-io.ts); shorter ones are read on this thread into a pooled buffer and coalesced with
 * the other replies of the same turn, which costs less than a sendfile and a header write each.
 */
export const FILE_SEND_MINIMUM = 64 * 1024 + 1;
/** Reads at least this long look for holes and send them as OFFSET_HOLE chunks. */
const SPARSE_READ_MINIMUM = 64 * 1024;
/** The payload of a WRITE of 0 bytes. */
const EMPTY = Buffer.alloc(0);
/** Most block status descriptors sent in one reply. */
const MAX_DESCRIPTORS = 64 * 1024;
/**
 * Most requests in flight on one connection, whatever their size: requests that hold no bytes
 * (FLUSH, TRIM, WRITE_ZEROES) still hold a promise and device work each. qemu-nbd serves 16 at a
 * time; clients queue up to 64 or 128.
 */
export const MAX_IN_FLIGHT_REQUESTS = 256;

export interface TransmissionConfig {
  /** Large reply buffers, reused once written. */
  readonly buffers: BufferPool;
  /** Known data ranges of the export, shared by every connection to it. */
  readonly dataExtents: DataExtentCache;
  /** Bound on bytes held by requests in flight on this connection. */
  readonly maxInFlightBytes: number;
  /** Called for events worth logging (a client broke the protocol, a device failed). */
  readonly log: (message: string) => void;
}

/** Why the request loop ended. */
export type TransmissionEnd = 'disconnect' | 'closed' | 'protocol-error' | 'shutdown';

export class Transmission implements RequestSink {
  private inFlightBytes = 0;
  private inFlightCount = 0;
  private waiters: (() => void)[] = [];
  private stopping = false;
  private readonly context: RequestContext;
  private readonly requests: RequestReader;
  /**
   * A request received while the in-flight bound was reached: served (or answered with its
   * error, when `error` is not 0) once room frees.
   */
  private held:
    | { request: RequestHeader; payload: Buffer | undefined; cost: number; error: number }
    | undefined;
  /** The client's side has ended (or failed). */
  private sourceEnded = false;
  private finish: ((end: TransmissionEnd) => void) | undefined;
  private ending: TransmissionEnd | undefined;

  constructor(
    private readonly io: ConnectionIo,
    private readonly session: Session,
    private readonly config: TransmissionConfig,
  ) {
    this.context = requestContext(session);
    this.requests = new RequestReader(this, this.allocate);
    // Replies leaving our buffers free room too: a client that stops reading stops being served.
    io.onWritten = () => this.wake();
  }

  /** Why the connection is ending, once it is. */
  get ended(): TransmissionEnd | undefined {
    return this.ending;
  }

  /** Stops reading requests (graceful shutdown). Requests in flight finish. */
  stop(): void {
    this.stopping = true;
  }

  /**
   * Serves requests until the client disconnects or breaks the protocol; waits for requests in
   * flight. Requests are parsed and dispatched as their bytes arrive (see RequestReader), each
   * answered when it completes.
   */
  async run(readMode: ReadMode = 'direct'): Promise<TransmissionEnd> {
    const ended = new Promise<TransmissionEnd>((resolve) => {
      this.finish = resolve;
    });
    // The handshake's last reply leaves first: the socket may be rewrapped only when idle.
    await this.io.drained();
    this.io.startRequests(this.requests, () => this.sourceEnd(), readMode);
    try {
      return await ended;
    } finally {
      // Bytes after the end are read and dropped, so the client's closing is seen.
      this.requests.stop();
      this.io.resumeReading();
      this.releaseHeld();
      await this.idle();
    }
  }

  /**
   * Serves one whole request (header, then the payload of a WRITE) received by a connection's own
   * thread (connection-threads.ts), whose replies this connection's `io` sends; resolves once they
   * have left, with whether the connection goes on (false: the client disconnected or broke the
   * protocol, and the connection is to end).
   */
  async serveForwarded(bytes: Buffer): Promise<boolean> {
    const request = decodeRequestHeader(bytes);
    const length = this.header(request);
    if (length < 0) {
      // The reply to a WRITE too large to read leaves before the connection is closed.
      await this.io.drained();
      return false;
    }
    if (bytes.length !== REQUEST_HEADER_SIZE + length) {
      throw new Error(`forwarded request: ${bytes.length} bytes for a payload of ${length}`);
    }
    this.request(request, length === 0 ? undefined : bytes.subarray(REQUEST_HEADER_SIZE));
    await this.idle();
    return this.ending === undefined && !this.io.isClosed;
  }

  /** Resolves when no request is in flight. */
  async idle(): Promise<void> {
    while (this.inFlightCount > 0) {
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
    await this.io.drained();
  }

  /** RequestSink: checks what the stream itself depends on; returns the payload length. */
  header(request: RequestHeader): number {
    // Nothing is read, nor a payload buffer taken, for a client that is gone.
    if (this.gone) return -1;
    if (request.magic !== NBD_REQUEST_MAGIC) {
      this.config.log(`request: bad magic 0x${request.magic.toString(16)}: closing the connection`);
      this.end('protocol-error');
      return -1;
    }
    if (request.type === NBD_CMD_DISC) {
      this.end('disconnect');
      return -1;
    }
    if (request.type !== NBD_CMD_WRITE) return 0;
    if (request.length > NBD_MAX_PAYLOAD_SIZE) {
      // The payload cannot be trusted to follow; answer and close.
      this.replySimple(request, validateRequest(request, this.context));
      this.config.log(`request: write of ${request.length} bytes is too large: closing the connection`);
      this.end('protocol-error');
      return -1;
    }
    return request.length;
  }

  /**
   * RequestSink: a whole request; false when it has to wait for room (the reader pauses). A
   * request answered at once with an error waits for room too: its reply is bytes queued for the
   * socket like any other (`pendingBytes`), and a client sending invalid requests without reading
   * the replies must be stopped at the same bound.
   */
  request(request: RequestHeader, payload: Buffer | undefined): boolean {
    if (this.gone) {
      this.releasePayload(payload);
      this.requests.stop();
      return true;
    }
    const error = this.stopping ? NBD_ESHUTDOWN : validateRequest(request, this.context);
    const cost = error === 0 ? this.costOf(request, payload) : 0;
    if (!this.hasRoom(cost)) {
      this.held = { request, payload, cost, error };
      return false;
    }
    this.start(request, payload, cost, error);
    return true;
  }

  /** Dispatches a request, or answers it with its error. */
  private start(request: RequestHeader, payload: Buffer | undefined, cost: number, error: number): void {
    if (error === 0) {
      this.dispatch(request, payload, cost);
      return;
    }
    this.releasePayload(payload);
    if (error === NBD_ESHUTDOWN) this.replyError(request, error, 'server is shutting down');
    else this.replyError(request, error, `${commandName(request.type)}: ${nbdErrorName(error)}`);
  }

  /**
   * The client is gone (its side ended or failed, or a write to it failed): nothing more can be
   * answered, so requests not yet started are dropped rather than served.
   */
  private get gone(): boolean {
    return this.sourceEnded || this.io.isClosed;
  }

  /**
   * RequestSink: a large WRITE's payload goes straight into the export's file when the export lets
   * it (`fileSource.writes`) and the request may be served now; the ordinary way otherwise, which
   * also answers the invalid ones.
   */
  placeWrite(request: RequestHeader): FilePlacement | undefined {
    const source = this.session.export.fileSource;
    if (
      source === undefined ||
      source.writes !== true ||
      this.stopping ||
      this.gone ||
      validateRequest(request, this.context) !== 0 ||
      !this.hasRoom(0)
    ) {
      return undefined;
    }
    return { fd: source.fd, offset: request.offset, name: `export '${this.session.export.name}'` };
  }

  /** RequestSink: a placed WRITE's payload is in the file (or failed): answered, after a flush for FUA. */
  placed(request: RequestHeader, error: Error | undefined): void {
    if (error !== undefined) {
      this.replyError(request, toNbdError(error), errorMessage(error));
    } else if ((request.flags & NBD_CMD_FLAG_FUA) === 0) {
      this.replySimple(request, 0);
    } else {
      this.inFlightCount++;
      this.session.export.device.flush().then(
        () => {
          this.replySimple(request, 0);
          this.release(0);
        },
        (failure: unknown) => {
          this.replyError(request, toNbdError(failure), errorMessage(failure));
          this.release(0);
        },
      );
    }
  }

  /** The bytes a request holds until answered: read data, write payload, block status reply. */
  private costOf(request: RequestHeader, payload: Buffer | undefined): number {
    switch (request.type) {
      case NBD_CMD_READ:
        return request.length;
      case NBD_CMD_BLOCK_STATUS: {
        const descriptors = (request.flags & NBD_CMD_FLAG_REQ_ONE) !== 0 ? 1 : MAX_DESCRIPTORS;
        return this.session.metaContexts.length * descriptors * 8;
      }
      default:
        return payload?.length ?? 0;
    }
  }

  /**
   * Within the bounds on requests and bytes in flight (a request alone always fits). Never true
   * just because the connection is closed: requests left over then are dropped, not served.
   */
  private hasRoom(cost: number): boolean {
    const pending = this.io.pendingBytes;
    return (
      (this.inFlightCount === 0 && pending === 0) ||
      (this.inFlightCount < MAX_IN_FLIGHT_REQUESTS &&
        this.inFlightBytes + pending + cost <= this.config.maxInFlightBytes)
    );
  }

  private dispatch(request: RequestHeader, payload: Buffer | undefined, cost: number): void {
    this.inFlightBytes += cost;
    this.inFlightCount++;
    const work = request.type === NBD_CMD_READ ? this.readRequest(request) : this.execute(request, payload);
    work.then(
      () => this.release(cost),
      (failure: unknown) => {
        this.config.log(`request: internal failure: ${errorMessage(failure)}`);
        this.release(cost);
      },
    );
  }

  private sourceEnd(): void {
    this.sourceEnded = true;
    // A request held for room is never started: its reply could not be sent.
    this.releaseHeld();
    this.requests.stop();
    this.end(this.stopping ? 'shutdown' : 'closed');
  }

  private end(end: TransmissionEnd): void {
    if (this.ending !== undefined) return;
    this.ending = end;
    this.finish?.(end);
  }

  private releasePayload(payload: Buffer | undefined): void {
    if (payload !== undefined && BufferPool.ownsWhole(payload)) this.config.buffers.release(payload);
  }

  private releaseHeld(): void {
    const held = this.held;
    this.held = undefined;
    if (held !== undefined) this.releasePayload(held.payload);
  }

  private release(cost: number): void {
    this.inFlightBytes -= cost;
    this.inFlightCount--;
    this.wake();
  }

  private wake(): void {
    const held = this.held;
    if (held !== undefined && this.ending === undefined) {
      if (this.gone) {
        // Dropped, and the bytes after it too; the socket's close ends the connection.
        this.releaseHeld();
        this.requests.stop();
      } else if (this.hasRoom(held.cost)) {
        this.held = undefined;
        this.start(held.request, held.payload, held.cost, held.error);
        if (this.requests.resume()) this.io.resumeReading();
      }
    }
    const waiters = this.waiters;
    if (waiters.length === 0) return;
    this.waiters = [];
    for (const waiter of waiters) waiter();
  }

  private async execute(request: RequestHeader, payload: Buffer | undefined): Promise<void> {
    const entry = this.session.export;
    const device = entry.device;
    const fua = (request.flags & NBD_CMD_FLAG_FUA) !== 0;
    try {
      switch (request.type) {
        case NBD_CMD_READ:
          await this.readSparse(request);
          return;
        case NBD_CMD_WRITE:
          // A WRITE of 0 bytes comes without a payload buffer (see RequestReader).
          await device.write(request.offset, payload ?? EMPTY, { fua });
          // The device is done with the bytes: the buffer serves the next request. Not after a
          // failure: a device may reject while parts of the write still read the buffer.
          this.releasePayload(payload);
          break;
        case NBD_CMD_FLUSH:
          await device.flush();
          break;
        case NBD_CMD_TRIM:
          if (entry.discard !== false && request.length > 0) {
            this.config.dataExtents.invalidate(request.offset, request.length);
            await device.discard(request.offset, request.length);
            if (fua) await device.flush();
          }
          break;
        case NBD_CMD_WRITE_ZEROES: {
          const fastOnly = (request.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0;
          if (fastOnly && !device.capabilities.fastZero) {
            this.replySimple(request, NBD_ENOTSUP);
            return;
          }
          this.config.dataExtents.invalidate(request.offset, request.length);
          await device.writeZeroes(request.offset, request.length, {
            fua,
            fastOnly,
            mayUnmap: (request.flags & NBD_CMD_FLAG_NO_HOLE) === 0,
          });
          break;
        }
        case NBD_CMD_CACHE:
          // A hint; devices keep no cache worth warming from here.
          break;
        case NBD_CMD_BLOCK_STATUS:
          await this.blockStatus(request);
          return;
      }
      this.replySimple(request, 0);
    } catch (error) {
      const fastZero =
        request.type === NBD_CMD_WRITE_ZEROES && (request.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0;
      this.replyError(request, toNbdError(error, { fastZero }), errorMessage(error));
    }
  }

  /** READ: one data chunk (or simple reply) unless the range may hold holes worth sending as such. */
  private readRequest(request: RequestHeader): Promise<void> {
    if (this.session.structuredReplies && (request.length === 0 || this.mayHaveHoles(request))) {
      return this.execute(request, undefined);
    }
    return this.readWhole(request);
  }

  /**
   * The hot path: one reply buffer from the pool, the device reads into it after the header, one
   * promise reaction sends it (or the error reply). Never rejects.
   */
  private readWhole(request: RequestHeader): Promise<void> {
    const { cookie, offset, length } = request;
    const structured = this.session.structuredReplies;
    const source = this.session.export.fileSource;
    if (source !== undefined && length >= FILE_SEND_MINIMUM && this.io.canSendFile) {
      this.sendFromFile(request, source.fd);
      return Promise.resolve();
    }
    const reply = structured
      ? encodeOffsetDataChunk(cookie, true, offset, length, this.allocate)
      : encodeSimpleReply(cookie, 0, length, this.allocate);
    const data = reply.subarray(structured ? OFFSET_DATA_PAYLOAD_START : SIMPLE_REPLY_HEADER_SIZE);
    let reading: Promise<void>;
    try {
      reading = this.session.export.device.readInto(data, offset);
    } catch (error) {
      reading = Promise.reject(error);
    }
    return reading.then(
      () => this.sendPooled(reply),
      (error: unknown) => {
        // The buffer is left to the garbage collector: a device may reject while parts of the
        // read still write into it, and a pooled buffer would be another reply's by then.
        this.replyError(request, toNbdError(error), errorMessage(error));
      },
    );
  }

  /**
   * A READ reply whose payload goes from the export's file to the socket by sendfile (the range
   * is valid: validateRequest checked it against the export's size). Whatever sendfile leaves is
   * read through the device into a pooled buffer. The request's bytes in flight are the
   * connection's `pendingBytes` until the payload has left.
   */
  private sendFromFile(request: RequestHeader, fileFd: number): void {
    const { cookie, offset, length } = request;
    const structured = this.session.structuredReplies;
    const headerSize = structured ? OFFSET_DATA_PAYLOAD_START : SIMPLE_REPLY_HEADER_SIZE;
    // The encoders allocate header and data together: here only the header is wanted.
    const headerOnly = () => Buffer.allocUnsafe(headerSize);
    const header = structured
      ? encodeOffsetDataChunk(cookie, true, offset, length, headerOnly)
      : encodeSimpleReply(cookie, 0, length, headerOnly);
    const buffers = this.config.buffers;
    const device = this.session.export.device;
    this.io.sendFile({
      header,
      fileFd,
      fileOffset: offset,
      length,
      readRest: async (skip) => {
        const rest = buffers.acquire(length - skip);
        await device.readInto(rest, offset + skip);
        return rest;
      },
      release: (buffer) => buffers.release(buffer),
    });
  }

  /** A structured READ long enough to look for holes in, over a range not known to be data. */
  private mayHaveHoles(request: RequestHeader): boolean {
    return (
      request.length >= SPARSE_READ_MINIMUM &&
      (request.flags & NBD_CMD_FLAG_DF) === 0 &&
      this.session.export.device.capabilities.blockStatus &&
      !this.config.dataExtents.covers(request.offset, request.length)
    );
  }

  /** A structured READ that may cover holes: OFFSET_HOLE chunks for them, OFFSET_DATA for the rest. */
  private async readSparse(request: RequestHeader): Promise<void> {
    const device = this.session.export.device;
    const { cookie, offset, length } = request;
    if (length === 0) {
      this.io.send(encodeNoneChunk(cookie));
      return;
    }
    // Known data (a client reading the export through again): no window lookup, no await.
    const dataExtents = this.config.dataExtents;
    if (!dataExtents.covers(offset, length)) await dataExtents.learn(device, offset, length);
    if (dataExtents.covers(offset, length)) {
      await this.readWhole(request);
      return;
    }
    const extents = await statusExtents(this.session, offset, length, Number.POSITIVE_INFINITY);
    // Read every data run first: an error must not follow data chunks already sent. On a failure
    // the chunks are left to the garbage collector (reads of other runs may still be filling them).
    const chunks = await Promise.all(
      extents.map(async (extent, index) => {
        const last = index === extents.length - 1;
        if (extent.zero) return encodeOffsetHoleChunk(cookie, last, extent.offset, extent.length);
        const chunk = encodeOffsetDataChunk(cookie, last, extent.offset, extent.length, this.allocate);
        await device.readInto(chunk.subarray(OFFSET_DATA_PAYLOAD_START), extent.offset);
        return chunk;
      }),
    );
    for (const chunk of chunks) this.sendPooled(chunk);
  }

  private readonly allocate = (size: number): Buffer => this.config.buffers.acquire(size);

  private sendPooled(reply: Buffer): void {
    this.io.send(reply, () => this.config.buffers.release(reply));
  }

  private async blockStatus(request: RequestHeader): Promise<void> {
    const { cookie, offset, length } = request;
    const one = (request.flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    if (length === 0) {
      this.replyError(request, NBD_EINVAL, 'NBD_CMD_BLOCK_STATUS: zero length');
      return;
    }
    const contexts = this.session.metaContexts;
    const dataExtents = this.config.dataExtents;
    const device = this.session.export.device;
    if (contexts.length === 1 && contexts[0]!.id === CONTEXT_ID_BASE_ALLOCATION) {
      // Known data (as a client copying the export asks again and again): no walk of the device.
      // The device is asked about whole windows, once each, reaching past the range asked for:
      // a dense file is walked once, not once per query (each walk of tmpfs goes to the file's end).
      if (!dataExtents.covers(offset, length) && device.capabilities.blockStatus) {
        await dataExtents.learn(device, offset, length);
      }
      if (dataExtents.covers(offset, length)) {
        this.io.send(
          encodeBlockStatusChunk(cookie, true, CONTEXT_ID_BASE_ALLOCATION, [{ length, status: 0 }]),
        );
        return;
      }
    }
    const entry = this.session.export;
    // The device is walked only for the contexts that describe it (not for dirty bitmaps alone).
    const extents = contexts.every((context) => dirtyBitmapOf(entry, context.id) !== undefined)
      ? []
      : await statusExtents(this.session, offset, length, one ? 1 : MAX_DESCRIPTORS);
    for (const extent of extents) {
      if (extent.data && !extent.zero) dataExtents.add(extent.offset, extent.offset + extent.length);
    }
    const chunks: Buffer[] = [];
    for (const [index, context] of contexts.entries()) {
      const bitmap = dirtyBitmapOf(entry, context.id);
      const runs =
        bitmap === undefined
          ? extents.map((extent) => ({ length: extent.length, status: deviceStatus(context.id, extent) }))
          : (await dirtyExtents(bitmap, offset, length, one ? 1 : MAX_DESCRIPTORS)).map((extent) => ({
              length: extent.length,
              status: extent.dirty ? NBD_STATE_DIRTY : 0,
            }));
      const descriptors: BlockStatusDescriptor[] = [];
      for (const run of runs) {
        const value = run.status;
        const previous = descriptors[descriptors.length - 1];
        if (previous !== undefined && previous.status === value) {
          descriptors[descriptors.length - 1] = { length: previous.length + run.length, status: value };
        } else {
          descriptors.push({ length: run.length, status: value });
        }
        if (one) break;
      }
      chunks.push(encodeBlockStatusChunk(cookie, index === contexts.length - 1, context.id, descriptors));
    }
    for (const chunk of chunks) this.io.send(chunk);
  }

  private replySimple(request: RequestHeader, error: number): void {
    this.io.send(encodeSimpleReply(request.cookie, error));
  }

  /** An error reply: structured for READ and BLOCK_STATUS when structured replies are on. */
  private replyError(request: RequestHeader, error: number, message: string): void {
    const structured =
      this.session.structuredReplies &&
      (request.type === NBD_CMD_READ || request.type === NBD_CMD_BLOCK_STATUS);
    this.io.send(
      structured
        ? encodeErrorChunk(request.cookie, error, message)
        : encodeSimpleReply(request.cookie, error),
    );
  }
}

/** What requests on a session are validated against. */
export function requestContext(session: Session): RequestContext {
  return {
    size: session.export.device.size,
    readOnly: isExportReadOnly(session.export),
    structuredReplies: session.structuredReplies,
    metaContexts: session.metaContexts.length > 0,
  };
}

/** A device extent's status in base:allocation or qemu:allocation-depth. */
function deviceStatus(contextId: number, extent: Extent): number {
  if (contextId === CONTEXT_ID_ALLOCATION_DEPTH) return extent.present ? extent.depth + 1 : 0;
  return (extent.data ? 0 : NBD_STATE_HOLE) | (extent.zero ? NBD_STATE_ZERO : 0);
}

/** A dirty bitmap's runs over the range, checked as statusExtents checks the device's. */
async function dirtyExtents(
  bitmap: NbdDirtyBitmap,
  offset: number,
  length: number,
  limit: number,
): Promise<readonly DirtyExtent[]> {
  const runs = await bitmap.extents(offset, length, limit);
  let total = 0;
  for (const run of runs)
    total += Number.isSafeInteger(run.length) && run.length > 0 ? run.length : Number.NaN;
  if (runs.length === 0 || runs.length > limit || !(total <= length)) {
    throw new Error(`dirty bitmap '${bitmap.name}' returned bad extents (at 0x${offset.toString(16)})`);
  }
  return runs;
}

/** Extents over the range, at most `limit` of them (the last one may end before the range). */
async function statusExtents(
  session: Session,
  offset: number,
  length: number,
  limit: number,
): Promise<Extent[]> {
  const device = session.export.device;
  const out: Extent[] = [];
  const end = offset + length;
  let position = offset;
  while (position < end && out.length < limit) {
    const extents = await device.blockStatus(position, end - position);
    if (extents.length === 0) break;
    for (const extent of extents) {
      if (extent.offset !== position || extent.length <= 0) {
        throw new Error(
          `blockStatus: ${device.description} returned a bad extent (at 0x${position.toString(16)})`,
        );
      }
      const clipped = Math.min(extent.length, end - position);
      out.push(clipped === extent.length ? extent : { ...extent, length: clipped });
      position += clipped;
      if (position >= end || out.length >= limit) break;
    }
  }
  if (out.length === 0) throw new Error(`blockStatus: ${device.description} returned no extent`);
  return out;
}
