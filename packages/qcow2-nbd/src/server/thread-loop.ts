/**
 * The transmission loop of one connection served by a thread of its own (see
 * connection-threads.ts): plain blocking-style system calls, no event loop, no promises. It reads
 * requests from the socket into one buffer and serves the common ones itself, straight on the
 * export's file: READs of known data, WRITEs, FLUSH. Everything else (every other command, every
 * request that fails validation, a file error, a protocol error) is handed to the main thread's
 * Transmission with `forward`, which answers it on the same socket while this thread waits; so the
 * protocol's rules live in one place and the replies are the same whichever thread sends them.
 *
 * The socket stays non-blocking (the main thread's handle shares its file status flags): a call
 * that would block gets EAGAIN and the thread waits in poll(2), waking now and then to see whether
 * the server is stopping.
 */
import { errnoError, type RawIo } from '@qcowkit/blockdev/node';
import {
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_MAX_PAYLOAD_SIZE,
  NBD_REQUEST_MAGIC,
  REQUEST_HEADER_SIZE,
  SIMPLE_REPLY_HEADER_SIZE,
} from '../protocol/constants.js';
import { encodeOffsetDataChunk, encodeSimpleReply, OFFSET_DATA_PAYLOAD_START } from '../protocol/replies.js';
import { decodeRequestHeader, type RequestContext, validateRequest } from '../protocol/requests.js';
import { DataExtentCache } from './data-extent-cache.js';
import { toNbdError } from './nbd-errors.js';
import { STOP_GRACE_MS } from './stop-grace.js';

/** Requests are read into a buffer this large; longer WRITE payloads are written as they come. */
const THREAD_INPUT_BUFFER = 256 * 1024;
/** Replies are gathered in a buffer this large and written when the thread is about to wait. */
const OUTPUT_BUFFER = 256 * 1024;
/**
 * Gathered replies are written once they reach this many bytes after a short (simple) reply: the
 * client, answered sooner, sends its next requests while this thread serves the rest. fio's 4 KiB
 * random writes at depth 16: 0.75-0.85 s against 0.93-0.94 s when answered only as the socket ran
 * dry (nbdkit 0.72-0.85). READ replies stay gathered: answered one by one they took 0.76-0.86 s
 * against 0.71-0.82 s.
 */
const SHORT_REPLIES_BYTES = 4 * SIMPLE_REPLY_HEADER_SIZE;
/** READs at least this long of ranges not known to be data go to the main thread (holes). */
const SPARSE_READ_MINIMUM = 64 * 1024;
/** poll(2) event bits. */
const POLLIN = 0x001;
const POLLOUT = 0x004;
/** How often a waiting thread looks whether the server is stopping, in milliseconds. */
const STOP_CHECK_MS = 200;
const EAGAIN = 11;
const EINTR = 4;
/**
 * How long a thread whose socket ran dry keeps reading before it sleeps in poll(2), in
 * milliseconds, when the client's last pause was shorter than that and fewer connection threads
 * are busy than there are CPUs. On these VMs a thread asleep on an idle CPU costs a wake-up between
 * CPUs (an interrupt, a VM exit) for every batch of requests: fio's 4 KiB requests at depth 16
 * went 1.25-2.1 s -> 0.82-1.19 s with it. A client that pauses longer gets no spin at all, so an
 * idle connection costs nothing; with a thread busy per CPU, spinning would take the CPU from the
 * clients (nbdcopy's 2 connections into an export: 0.65-0.75 s without, 0.74-0.79 s with).
 */
const SPIN_MS = 0.2;
const EIO = 5;

export interface ThreadLoopOptions {
  readonly io: RawIo;
  readonly socketFd: number;
  /** The export's file (its `fileSource`), open for writing when `fileWrites`. */
  readonly fileFd: number;
  readonly fileWrites: boolean;
  readonly context: RequestContext;
  /** Bytes of the transmission phase that arrived with the handshake. */
  readonly leftover: Uint8Array;
  /**
   * Serves one whole request (header and payload; the header alone for a WRITE too large to
   * read) on the main thread, which sends its reply. False: the connection is over.
   */
  readonly forward: (request: Uint8Array) => boolean;
  /** Whether a thread whose socket runs dry may spin now (fewer busy threads than CPUs). */
  readonly maySpin: () => boolean;
  /** True once the server is stopping: requests already received are served, no more are read. */
  readonly stopping: () => boolean;
}

/** Why the loop ended: the client's NBD_CMD_DISC, its close, the main thread's verdict, a stop,
 * or a socket error. */
export type ThreadLoopEnd = 'disconnect' | 'closed' | 'forwarded-end' | 'shutdown' | 'socket-error';

export function runThreadLoop(options: ThreadLoopOptions): ThreadLoopEnd {
  return new ThreadLoop(options).run();
}

class ThreadLoop {
  private readonly io: RawIo;
  private readonly socketFd: number;
  private readonly input = Buffer.allocUnsafe(THREAD_INPUT_BUFFER);
  private start = 0;
  private end = 0;
  private readonly output = Buffer.allocUnsafe(OUTPUT_BUFFER);
  private outLength = 0;
  private readonly probe = Buffer.alloc(1);
  /** Ranges of the file known to hold data (stale entries only make holes go out as data). */
  private readonly knownData = new DataExtentCache();
  private ended: ThreadLoopEnd | undefined;
  /** The client's last pause (socket dry until more came), in milliseconds. */
  private lastPause = Number.POSITIVE_INFINITY;

  constructor(private readonly options: ThreadLoopOptions) {
    this.io = options.io;
    this.socketFd = options.socketFd;
    const leftover = options.leftover;
    if (leftover.length > this.input.length) throw new RangeError('thread loop: leftover too long');
    this.input.set(leftover, 0);
    this.end = leftover.length;
  }

  run(): ThreadLoopEnd {
    while (this.ended === undefined) {
      if (this.end - this.start < REQUEST_HEADER_SIZE) {
        this.receive();
        continue;
      }
      this.serveOne();
    }
    this.flushOutput();
    return this.ended;
  }

  /** Serves the request whose header starts at `start` (the header is in the buffer). */
  private serveOne(): void {
    const input = this.input;
    const at = this.start;
    if (input.readUInt32BE(at) !== NBD_REQUEST_MAGIC) {
      this.start += REQUEST_HEADER_SIZE;
      this.forward(input.subarray(at, at + REQUEST_HEADER_SIZE));
      return;
    }
    const type = input.readUInt16BE(at + 6);
    if (type === NBD_CMD_DISC) {
      this.ended = 'disconnect';
      return;
    }
    const request = decodeRequestHeader(input, at);
    const length = request.length;
    if (type === NBD_CMD_WRITE && length > NBD_MAX_PAYLOAD_SIZE) {
      // The payload cannot be trusted to follow: the main thread answers and closes.
      this.start += REQUEST_HEADER_SIZE;
      this.forward(input.subarray(at, at + REQUEST_HEADER_SIZE));
      return;
    }
    const context = this.options.context;
    const valid = !this.options.stopping() && validateRequest(request, context) === 0;
    if (valid && type === NBD_CMD_WRITE && this.options.fileWrites) {
      this.write(request.cookie, request.offset, length, (request.flags & NBD_CMD_FLAG_FUA) !== 0);
      return;
    }
    if (
      valid &&
      type === NBD_CMD_READ &&
      length > 0 &&
      this.isPlainRead(request.offset, length, request.flags)
    ) {
      this.start += REQUEST_HEADER_SIZE;
      if (!this.read(request.cookie, request.offset, length)) {
        this.forward(input.subarray(at, at + REQUEST_HEADER_SIZE));
      }
      return;
    }
    if (valid && type === NBD_CMD_FLUSH && this.options.fileWrites) {
      this.start += REQUEST_HEADER_SIZE;
      if (this.io.fdatasync(this.options.fileFd) < 0) {
        this.forward(input.subarray(at, at + REQUEST_HEADER_SIZE));
        return;
      }
      this.replySimple(request.cookie);
      return;
    }
    // Anything else, whole, to the main thread.
    const payload = type === NBD_CMD_WRITE ? length : 0;
    const whole = this.gather(REQUEST_HEADER_SIZE + payload);
    if (whole !== undefined) this.forward(whole);
  }

  /** A READ this thread answers with the file's bytes as they are: no hole to look for. */
  private isPlainRead(offset: number, length: number, flags: number): boolean {
    if (length < SPARSE_READ_MINIMUM || !this.options.context.structuredReplies) return true;
    if ((flags & NBD_CMD_FLAG_DF) !== 0) return true;
    if (this.knownData.covers(offset, length)) return true;
    // One look for the next hole: on tmpfs it walks the pages up to it, so what it finds is kept.
    const hole = this.io.seekHole(this.options.fileFd, offset);
    if (hole < offset + length) return false;
    this.knownData.add(offset, hole);
    return true;
  }

  /**
   * Answers a valid READ: the reply header, then the data, read into the reply buffer or sent
   * from the file by sendfile. False when the file failed (nothing was sent).
   */
  private read(cookie: bigint, offset: number, length: number): boolean {
    const structured = this.options.context.structuredReplies;
    const headerSize = structured ? OFFSET_DATA_PAYLOAD_START : SIMPLE_REPLY_HEADER_SIZE;
    if (headerSize + length <= OUTPUT_BUFFER) {
      if (this.outLength + headerSize + length > OUTPUT_BUFFER) this.flushOutput();
      const dataAt = this.outLength + headerSize;
      const data = this.output.subarray(dataAt, dataAt + length);
      if (!this.preadFully(data, offset)) return false;
      this.writeReadHeader(cookie, offset, length, headerSize);
      this.outLength = dataAt + length;
      return true;
    }
    // Long: the header, then the data by sendfile (or through the output buffer where it fails).
    // A file that fails fails here, while an error reply can still be sent instead.
    if (this.io.pread(this.options.fileFd, this.probe, 1, offset) < 0) return false;
    if (this.outLength + headerSize > OUTPUT_BUFFER) this.flushOutput();
    this.writeReadHeader(cookie, offset, length, headerSize);
    this.outLength += headerSize;
    this.flushOutput();
    let sent = 0;
    while (sent < length && this.ended === undefined) {
      const count = this.io.sendfile(this.socketFd, this.options.fileFd, offset + sent, length - sent);
      if (count > 0) {
        sent += count;
      } else if (count === -EAGAIN) {
        if (!this.waitFor(POLLOUT)) return true;
      } else if (count !== -EINTR) {
        // sendfile refused (or the file shrank): the rest through the buffer, zeros past the end.
        this.sendThroughBuffer(offset + sent, length - sent);
        return true;
      }
    }
    return true;
  }

  private sendThroughBuffer(offset: number, length: number): void {
    let done = 0;
    while (done < length && this.ended === undefined) {
      const chunk = Math.min(OUTPUT_BUFFER, length - done);
      const data = this.output.subarray(0, chunk);
      // A failure this late cannot become an error reply (the header is out): the connection ends.
      if (!this.preadFully(data, offset + done)) {
        this.ended = 'socket-error';
        return;
      }
      this.outLength = chunk;
      this.flushOutput();
      done += chunk;
    }
  }

  /**
   * A READ reply's header (OFFSET_DATA chunk or simple reply), at `outLength` of the output; the
   * caller places the data after it. The encoders write only the header into the view they get.
   */
  private writeReadHeader(cookie: bigint, offset: number, length: number, headerSize: number): void {
    const header = () => this.output.subarray(this.outLength, this.outLength + headerSize);
    if (this.options.context.structuredReplies) encodeOffsetDataChunk(cookie, true, offset, length, header);
    else encodeSimpleReply(cookie, 0, length, header);
  }

  /** A simple reply (success unless `error`), gathered with the others. */
  private replySimple(cookie: bigint, error = 0): void {
    if (this.outLength + SIMPLE_REPLY_HEADER_SIZE > OUTPUT_BUFFER) this.flushOutput();
    encodeSimpleReply(cookie, error, 0, this.allocateReply);
    this.outLength += SIMPLE_REPLY_HEADER_SIZE;
    // Short replies (WRITE, FLUSH) leave four at a time, not only when the socket runs dry.
    if (this.outLength >= SHORT_REPLIES_BYTES) this.flushOutput();
  }

  /** The next `size` bytes of the output buffer, for the reply encoders. */
  private readonly allocateReply = (size: number): Buffer =>
    this.output.subarray(this.outLength, this.outLength + size);

  /** Reads `data.length` bytes of the file at `offset`; zeros past its end. False on a failure. */
  private preadFully(data: Buffer, offset: number): boolean {
    let done = 0;
    while (done < data.length) {
      const view = done === 0 ? data : data.subarray(done);
      const count = this.io.pread(this.options.fileFd, view, data.length - done, offset + done);
      if (count > 0) done += count;
      else if (count === 0) {
        data.fill(0, done);
        return true;
      } else if (count !== -EINTR) return false;
    }
    return true;
  }

  /** Writes `data` to the file at `offset`: 0, or minus the errno of a failure. */
  private pwriteFully(data: Buffer, offset: number): number {
    let done = 0;
    while (done < data.length) {
      const view = done === 0 ? data : data.subarray(done);
      const count = this.io.pwrite(this.options.fileFd, view, data.length - done, offset + done);
      if (count > 0) done += count;
      else if (count === 0) return -EIO;
      else if (count !== -EINTR) return count;
    }
    return 0;
  }

  /**
   * A valid WRITE to the file. A payload that fits the input buffer is written once whole; a
   * longer one as its bytes arrive. A failure hands the request to the main thread, which writes
   * it again through the device and answers with the device's error (a long payload is no longer
   * whole by then: it is answered here, EIO or ENOSPC).
   */
  private write(cookie: bigint, offset: number, length: number, fua: boolean): void {
    const total = REQUEST_HEADER_SIZE + length;
    if (total <= this.input.length) {
      const whole = this.gather(total);
      if (whole === undefined) return;
      const payload = whole.subarray(REQUEST_HEADER_SIZE);
      if (this.pwriteFully(payload, offset) < 0 || (fua && this.io.fdatasync(this.options.fileFd) < 0)) {
        this.forward(whole);
        return;
      }
      this.replySimple(cookie);
      return;
    }
    // Long: the payload is written as it comes.
    this.start += REQUEST_HEADER_SIZE;
    let written = 0;
    /** The first failure's NBD error: the rest of the payload is read and dropped. */
    let error = 0;
    while (written < length && this.ended === undefined) {
      if (this.start === this.end) {
        this.start = 0;
        this.end = 0;
        if (!this.receiveSome(Math.min(this.input.length, length - written))) break;
      }
      const count = Math.min(this.end - this.start, length - written);
      const piece = this.input.subarray(this.start, this.start + count);
      if (error === 0) {
        const failed = this.pwriteFully(piece, offset + written);
        if (failed < 0) error = this.fileError('write', -failed, offset + written);
      }
      this.start += count;
      written += count;
    }
    if (this.ended !== undefined) return;
    if (error === 0 && fua) {
      const synced = this.io.fdatasync(this.options.fileFd);
      if (synced < 0) error = this.fileError('fdatasync', -synced);
    }
    this.replySimple(cookie, error);
  }

  /**
   * The `total` bytes from `start` (reading until they are there), and `start` moved past them.
   * Undefined when the connection ended first.
   */
  private gather(total: number): Buffer | undefined {
    if (total <= this.input.length) {
      while (this.end - this.start < total) {
        if (this.start > 0 && this.start + total > this.input.length) this.compact();
        if (!this.receiveSome(this.input.length - this.end)) return undefined;
      }
      const whole = this.input.subarray(this.start, this.start + total);
      this.start += total;
      return whole;
    }
    const whole = Buffer.allocUnsafe(total);
    let have = this.input.copy(whole, 0, this.start, this.end);
    this.start = 0;
    this.end = 0;
    while (have < total) {
      const count = this.readSocket(whole.subarray(have), total - have);
      if (count <= 0) return undefined;
      have += count;
    }
    return whole;
  }

  private compact(): void {
    this.input.copyWithin(0, this.start, this.end);
    this.end -= this.start;
    this.start = 0;
  }

  /** Reads more requests (replies go out first when it would wait). */
  private receive(): void {
    if (this.start === this.end) {
      this.start = 0;
      this.end = 0;
    } else if (this.start > 0) {
      this.compact();
    }
    if (this.options.stopping()) {
      this.ended = 'shutdown';
      return;
    }
    this.receiveSome(this.input.length - this.end);
  }

  /** Reads up to `limit` bytes at `end`; false (and `ended` set) when the connection is over. */
  private receiveSome(limit: number): boolean {
    const count = this.readSocket(this.input.subarray(this.end), limit);
    if (count <= 0) return false;
    this.end += count;
    return true;
  }

  /** read(2) from the socket, waiting as needed: the count, or 0 once `ended` is set. */
  private readSocket(into: Buffer, limit: number): number {
    for (;;) {
      const count = this.io.read(this.socketFd, into, limit);
      if (count > 0) return count;
      if (count === 0) {
        this.ended = 'closed';
        return 0;
      }
      if (count === -EAGAIN) {
        this.flushOutput();
        if (this.ended !== undefined) return 0;
        const dry = performance.now();
        if (this.lastPause < SPIN_MS && this.options.maySpin()) {
          const until = dry + SPIN_MS;
          let spun = -EAGAIN;
          do spun = this.io.read(this.socketFd, into, limit);
          while (spun === -EAGAIN && performance.now() < until);
          if (spun !== -EAGAIN) {
            this.lastPause = performance.now() - dry;
            if (spun > 0) return spun;
            continue;
          }
        }
        if (!this.waitFor(POLLIN)) return 0;
        this.lastPause = performance.now() - dry;
      } else if (count !== -EINTR) {
        this.ended = 'socket-error';
        return 0;
      }
    }
  }

  /**
   * Waits until the socket is ready for `events`. False (and `ended` set) when the server is
   * stopping: at once for more requests, after STOP_GRACE_MS for a client that does not read
   * its replies (as the event loop's connections end).
   */
  private waitFor(events: number): boolean {
    let stopSeen: number | undefined;
    for (;;) {
      const ready = this.io.poll(this.socketFd, events, STOP_CHECK_MS);
      if (ready !== 0 && ready !== -EINTR) return true;
      if (!this.options.stopping()) continue;
      stopSeen ??= performance.now();
      if (events === POLLIN || performance.now() - stopSeen >= STOP_GRACE_MS) {
        this.ended = 'shutdown';
        return false;
      }
    }
  }

  /** Writes the gathered replies, waiting as needed. */
  flushOutput(): void {
    let done = 0;
    while (done < this.outLength) {
      const view = done === 0 ? this.output : this.output.subarray(done);
      const count = this.io.write(this.socketFd, view, this.outLength - done);
      if (count > 0) done += count;
      else if (count === -EAGAIN) {
        if (!this.waitFor(POLLOUT)) break;
      } else if (count !== -EINTR) {
        this.ended = 'socket-error';
        break;
      }
    }
    this.outLength = 0;
  }

  /** The NBD error for a failed call on the file: the one the device's failure would give. */
  private fileError(what: string, errno: number, offset?: number): number {
    return toNbdError(errnoError(what, 'export file', this.io.errnoName(errno), offset));
  }

  /** Hands a request to the main thread (replies gathered so far leave first). */
  private forward(request: Uint8Array): void {
    this.flushOutput();
    if (this.ended !== undefined) return;
    if (!this.options.forward(request)) this.ended = 'forwarded-end';
  }
}
