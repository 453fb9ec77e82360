/**
 * The byte pipe of one connection: a ByteReader for the handshake, a batching writer for replies
 * (replies made in the same turn of the event loop leave in one system call), the STARTTLS upgrade
 * that swaps the plain socket for a TLS one, and the switch of the transmission phase to a
 * RequestReader that chooses where the socket's bytes land.
 *
 * File segments (`sendFile`): a large READ reply of a memory-backed file export leaves by
 * sendfile(2) from the file to the socket, on this thread, instead of a pread into a pooled buffer
 * on the thread pool and a write of that buffer here. On Linux since 6.5 sendfile to a unix socket
 * passes references to the file's pages (no copy at all) and to TCP it copies once in the kernel;
 * either way the thread-pool hand-off (a futex wake and a context switch per request, which on this
 * 2-core bench machine let the woken pool thread preempt the event loop) is gone. nbdcopy of a 1 GiB
 * tmpfs export to null: with 4 connections: the server's CPU fell from 0.75-1.23 s to 0.45-0.52 s
 * (system time 0.50-0.80 s to 0.14-0.17 s; nbdkit 0.44-0.58 s), its time from 1.59x nbdkit's to
 * 0.89x; fio 1 MiB sequential reads 1.26x to 0.82x (see the package README's Speed notes). The
 * socket is non-blocking: sendfile sends what fits in its buffer, and the rest (EAGAIN, a short
 * count, a failure) is read into a buffer and written the ordinary way. The header goes first
 * through the stream; while a segment is under way nothing else is written.
 */
import { type OnReadOpts, Socket, type SocketConstructorOpts } from 'node:net';
import type { Duplex } from 'node:stream';
import { type SecureContext, TLSSocket } from 'node:tls';
import { loadLibc } from '@qcowkit/blockdev/node';
import { ByteReader } from '../protocol/byte-reader.js';
import type { RequestReader } from './request-reader.js';
import { enlargeUnixSendBuffer } from './socket-buffer.js';
import { openSocketSplicer } from './socket-splice.js';
import { STOP_GRACE_MS } from './stop-grace.js';

/**
 * What a plain socket accepted by a net.Server holds that `startRequests` needs: the native handle
 * (libuv's stream, able to read into a buffer given to it, the machinery of Node's documented
 * `onread` socket option) and the server counting the socket among its connections.
 */
interface SocketInternals {
  _handle?: { useUserBuffer?: unknown; fd?: unknown; reading?: boolean; readStop?: unknown } | null;
  _server?: unknown;
  server?: unknown;
}

/** How the transmission phase reads: into buffers the RequestReader chooses, or stream chunks. */
export type ReadMode = 'direct' | 'stream';

/**
 * Replies at most this long are copied into one buffer with the others of the same turn of the
 * event loop, so a burst of small replies costs one socket write and one stream callback rather
 * than one each (per-write bookkeeping in Node's streams was a tenth of a 4 KiB read's cost).
 * Longer replies are written as they are, without a copy.
 */
const COALESCE_MAX = 16 * 1024;
/**
 * Replies of one turn are copied into a buffer of this size kept for the purpose (a few per
 * connection, reused once written) rather than a fresh Buffer.concat each turn: for fio's 4 KiB
 * random reads at depth 16 that was a new 64 KiB ArrayBuffer per turn, and the garbage collector
 * took 0.23 s of the server's 2.7 s profile. A turn's replies beyond it fill another one.
 */
const COALESCE_BUFFER_SIZE = 256 * 1024;
/**
 * Coalescing buffers kept per connection. When all are waiting to be written (a client slow to
 * read), a turn's replies are copied into a buffer of their own size, left to the collector.
 */
const COALESCE_BUFFERS_KEPT = 4;

/** A reply whose payload is sent straight from a file (see `ConnectionIo.sendFile`). */
export interface FileSegment {
  /** The reply's header, sent first. */
  readonly header: Uint8Array;
  /** The file, memory-backed: sendfile from it never waits for a disk. */
  readonly fileFd: number;
  readonly fileOffset: number;
  readonly length: number;
  /**
   * The payload's bytes from `skip` on, read into a buffer: what sendfile did not send. Called at
   * most once; `release` is given the buffer once it has been written.
   */
  readRest(skip: number): Promise<Buffer>;
  release(buffer: Buffer): void;
}

type QueueItem = Uint8Array | FileSegment;

export class ConnectionIo {
  readonly reader: ByteReader;
  private stream: Duplex;
  private socket: Socket;
  private closed = false;
  /** Bytes handed to send() whose write has not completed. */
  private pending = 0;
  /** Replies queued in this turn of the event loop, and what to call once each has left us. */
  private queue: QueueItem[] = [];
  private queueDone: ((() => void) | undefined)[] = [];
  private flushScheduled = false;
  /** A file segment is under way: nothing else may be written until it is done. */
  private segmentActive = false;
  /** Coalescing buffers free for the next turn (see COALESCE_BUFFER_SIZE). */
  private coalesceFree: Buffer[] = [];
  /** Coalescing buffers made so far (at most COALESCE_BUFFERS_KEPT). */
  private coalesceMade = 0;
  /** The plain socket's descriptor once the transmission phase has started (see `fileSendFd`). */
  private socketFd: number | undefined;
  /** Called whenever a write completes (the transmission loop waits on it for backpressure). */
  onWritten: (() => void) | undefined;
  private drainWaiters: (() => void)[] = [];
  tls = false;

  constructor(socket: Socket) {
    this.socket = socket;
    this.stream = socket;
    // The reader listens for errors too; this keeps an error after a TLS upgrade from crashing us.
    socket.on('error', () => {});
    socket.setNoDelay?.(true);
    this.reader = new ByteReader(socket);
  }

  /**
   * Whether `sendFile` can be used: a plain (not TLS) socket with a descriptor, in the
   * transmission phase, and a libc binding with sendfile.
   */
  get canSendFile(): boolean {
    return this.socketFd !== undefined && !this.tls && loadLibc()?.sendFile !== undefined;
  }

  /**
   * Queues a reply whose payload comes from a file (see FileSegment and the header comment): in
   * order with everything else sent, counted in `pendingBytes` until it has left us. Use only when
   * `canSendFile`.
   */
  sendFile(segment: FileSegment): void {
    if (this.isClosed) return;
    this.queue.push(segment);
    this.queueDone.push(undefined);
    this.pending += segment.header.length + segment.length;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(this.flushQueued);
    }
  }

  /** Reply bytes queued and not yet written to the socket. */
  get pendingBytes(): number {
    return this.pending;
  }

  get isClosed(): boolean {
    return this.closed || this.stream.destroyed;
  }

  /**
   * Queues bytes for the client; they leave with everything else sent in this turn of the event
   * loop. `done` runs once the bytes are no longer needed (copied or written, or the connection
   * is gone): a pooled buffer may be reused from then on.
   */
  send(bytes: Uint8Array, done?: () => void): void {
    if (this.isClosed) {
      done?.();
      return;
    }
    this.queue.push(bytes);
    this.queueDone.push(done);
    this.pending += bytes.length;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(this.flushQueued);
    }
  }

  private readonly flushQueued = (): void => this.flush();

  /** Writes what is queued now: small replies copied together, large ones as they are. */
  flush(): void {
    this.flushScheduled = false;
    // A segment under way flushes the rest when it is done.
    if (this.segmentActive) return;
    const queue = this.queue;
    const queueDone = this.queueDone;
    if (queue.length === 0) return;
    this.queue = [];
    this.queueDone = [];
    if (this.isClosed) {
      // Never to be written: no longer pending, and whoever waits for the queue to drain goes on.
      for (const item of queue) {
        this.pending -= item instanceof Uint8Array ? item.length : item.header.length + item.length;
      }
      for (const done of queueDone) done?.();
      this.wakeDrain();
      return;
    }
    const stream = this.stream;
    const several = queue.length > 1;
    if (several) stream.cork();
    let group: Uint8Array[] = [];
    let groupDone: (() => void)[] = [];
    let groupBytes = 0;
    const writeGroup = () => {
      if (group.length === 1) {
        // Nothing to join: written as it is, released once written.
        this.write(group[0]!, groupDone[0]);
      } else if (group.length > 1) {
        // A kept buffer, or one of just the group's size: while a client does not read, every
        // turn's replies wait in the socket's queue, and a 256 KiB buffer for a few hundred bytes
        // of replies would hold far more memory than `pendingBytes` says.
        let kept = this.coalesceFree.pop();
        if (kept === undefined && this.coalesceMade < COALESCE_BUFFERS_KEPT) {
          kept = Buffer.allocUnsafeSlow(COALESCE_BUFFER_SIZE);
          this.coalesceMade++;
        }
        const buffer = kept ?? Buffer.allocUnsafeSlow(groupBytes);
        let position = 0;
        for (const bytes of group) {
          buffer.set(bytes, position);
          position += bytes.length;
        }
        this.write(buffer.subarray(0, groupBytes), () => {
          if (kept !== undefined) this.coalesceFree.push(kept);
        });
        // Copied: the originals may be reused now.
        for (const done of groupDone) done();
      }
      group = [];
      groupDone = [];
      groupBytes = 0;
    };
    for (let i = 0; i < queue.length; i++) {
      const bytes = queue[i]!;
      const done = queueDone[i];
      if (!(bytes instanceof Uint8Array)) {
        writeGroup();
        // What follows the segment waits for it, ahead of anything queued meanwhile.
        this.queue = queue.slice(i + 1).concat(this.queue);
        this.queueDone = queueDone.slice(i + 1).concat(this.queueDone);
        this.startSegment(bytes);
        break;
      }
      if (bytes.length <= COALESCE_MAX) {
        if (groupBytes + bytes.length > COALESCE_BUFFER_SIZE) writeGroup();
        group.push(bytes);
        if (done !== undefined) groupDone.push(done);
        groupBytes += bytes.length;
      } else {
        writeGroup();
        this.write(bytes, done);
      }
    }
    writeGroup();
    if (several) stream.uncork();
  }

  /**
   * The header through the stream; once it has been written (and with it everything before it),
   * the stream's queue is empty and the payload may go by sendfile, behind the stream's back.
   */
  private startSegment(segment: FileSegment): void {
    this.segmentActive = true;
    this.write(segment.header, () => this.sendSegmentPayload(segment));
  }

  private sendSegmentPayload(segment: FileSegment): void {
    const fd = this.socketFd;
    const sendFile = loadLibc()?.sendFile;
    let sent = 0;
    if (!this.isClosed && fd !== undefined && sendFile !== undefined) {
      while (sent < segment.length) {
        const result = sendFile(fd, segment.fileFd, segment.fileOffset + sent, segment.length - sent);
        if (!result.ok || result.value === 0) break;
        sent += result.value;
      }
    }
    this.pending -= sent;
    if (sent === segment.length || this.isClosed) {
      if (this.isClosed) this.pending -= segment.length - sent;
      this.endSegment();
      return;
    }
    // The socket is full (or sendfile failed, or the file ended early): the rest the ordinary way.
    segment.readRest(sent).then(
      (rest) => {
        // Counted in `pending` from the start: write() subtracts it once written.
        this.write(rest, () => segment.release(rest));
        this.endSegment();
      },
      (error: unknown) => {
        // The header has left: the reply cannot become an error any more. The stream is broken.
        this.pending -= segment.length - sent;
        this.endSegment();
        this.stream.destroy(error instanceof Error ? error : new Error(String(error)));
      },
    );
  }

  private endSegment(): void {
    this.segmentActive = false;
    if (this.pending === 0 || this.isClosed) this.wakeDrain();
    this.onWritten?.();
    if (this.queue.length > 0) this.flush();
  }

  private write(bytes: Uint8Array, done: (() => void) | undefined): void {
    this.stream.write(bytes, (error) => {
      // A failed write: the stream is about to be destroyed (Node calls back first), and nothing
      // more can reach the client. Closed from now on, so no one serves requests for it.
      if (error != null) this.closed = true;
      this.pending -= bytes.length;
      if (this.pending === 0 || this.closed) this.wakeDrain();
      this.onWritten?.();
      done?.();
    });
  }

  /** Resolves when everything sent so far has been written out (or the connection is gone). */
  async drained(): Promise<void> {
    if (this.pending === 0 || this.isClosed) return;
    await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
  }

  private wakeDrain(): void {
    const waiters = this.drainWaiters;
    this.drainWaiters = [];
    for (const waiter of waiters) waiter();
  }

  /**
   * Hands every byte received from now on to `requests` (the transmission phase), starting with
   * any the handshake's reader holds. Call once, with nothing left to write (after `drained`).
   *
   * A unix socket gets a larger send buffer (see socket-buffer.ts). A plain socket is rewrapped
   * so that it reads into the buffers `requests.nextBuffer()` chooses
   * (Node's `onread` option, given the accepted socket's handle): large WRITE payloads are then
   * received in place. A TLS socket, or any other stream, feeds `requests` its chunks. Reading
   * stops whenever `requests` stops accepting; `resumeReading` restarts it. `onEnd` is called
   * once, when the client's side ends or fails.
   */
  startRequests(requests: RequestReader, onEnd: () => void, mode: ReadMode = 'direct'): ReadMode {
    const leftover = this.takeBuffered(this.reader.detach());
    if (!this.tls) {
      const fd = (this.socket as Socket & SocketInternals)._handle?.fd;
      if (typeof fd === 'number' && fd >= 0) {
        enlargeUnixSendBuffer(fd);
        this.socketFd = fd;
      }
    }
    let ended = false;
    const end = () => {
      if (ended) return;
      ended = true;
      onEnd();
    };
    // Rewrapped before the leftover is parsed: its requests' replies must go to the new socket.
    const direct = mode === 'direct' ? this.rewrapForDirectReads(requests) : undefined;
    const stream = direct ?? this.stream;
    if (direct !== undefined) {
      this.stream = direct;
      this.socket = direct;
      const splicer = this.socketFd === undefined ? undefined : openSocketSplicer();
      if (this.socketFd !== undefined && splicer !== undefined) requests.useSocket(this.socketFd, splicer);
    } else {
      stream.on('data', (chunk: Buffer) => {
        if (!this.guarded(requests, () => requests.feed(chunk))) stream.pause();
      });
    }
    stream.on('error', end);
    stream.on('end', end);
    stream.on('close', end);
    if (leftover.length > 0) this.guarded(requests, () => requests.feed(leftover));
    // A client that left during the handshake's last turn: its end was the handshake reader's.
    if (stream.destroyed || stream.readableEnded) end();
    else if (requests.accepting) stream.resume();
    return direct !== undefined ? 'direct' : 'stream';
  }

  /**
   * For a connection served by a thread of its own (connection-threads.ts): stops reading the
   * socket and returns its descriptor and the bytes received past the handshake, which are the
   * thread's to serve from now on. This object still sends (replies to the requests the thread
   * forwards) and ends the connection. Undefined, with nothing changed, for TLS or a socket
   * without a descriptor. Call once, with nothing left to write (after `drained`).
   */
  detachForThread(): { fd: number; leftover: Buffer } | undefined {
    if (this.tls || this.stream !== this.socket) return undefined;
    const handle = (this.socket as Socket & SocketInternals)._handle;
    const fd = handle?.fd;
    if (handle == null || typeof fd !== 'number' || fd < 0 || typeof handle.readStop !== 'function') {
      return undefined;
    }
    this.socket.pause();
    // As Socket.pause does for its own buffered reads: libuv stops reading now, and a later
    // resume() starts it again.
    handle.reading = false;
    (handle.readStop as () => number).call(handle);
    const leftover = this.takeBuffered(this.reader.detach());
    enlargeUnixSendBuffer(fd);
    this.socketFd = fd;
    return { fd, leftover };
  }

  /**
   * After the thread serving the connection let it go (see `detachForThread`): reads again, and
   * drops what comes, so that `end` sees the client's closing.
   */
  reattachAfterThread(): void {
    const handle = (this.socket as Socket & SocketInternals)._handle as
      | { reading?: boolean; readStart?: () => number }
      | null
      | undefined;
    if (this.isClosed || handle == null || typeof handle.readStart !== 'function') return;
    // The stream still waits for the read it asked for before the hand-over: libuv restarts
    // reading directly, as Socket.pause's counterpart would.
    handle.reading = true;
    if (handle.readStart() !== 0) {
      this.destroy();
      return;
    }
    this.stream.on('data', () => {});
    this.stream.resume();
  }

  /**
   * `taken` and whatever the stream itself still buffers: bytes that arrived while the handshake's
   * reader had paused it. They would be lost with the socket a rewrap lets go of.
   */
  private takeBuffered(taken: Buffer): Buffer {
    if (this.stream.readableLength === 0) return taken;
    const chunks = [taken];
    for (let chunk = this.stream.read() as Buffer | null; chunk !== null; chunk = this.stream.read()) {
      chunks.push(chunk);
    }
    return Buffer.concat(chunks);
  }

  /**
   * Runs `deliver` (bytes handed to `requests`, in either read mode) and returns whether reading
   * may go on. A request's handling that throws inside a socket callback would reach the process
   * as an uncaught exception: this connection ends instead (its 'error' reaches `onEnd`).
   */
  private guarded(requests: RequestReader, deliver: () => boolean): boolean {
    try {
      return deliver();
    } catch (error) {
      requests.stop();
      this.stream.destroy(error instanceof Error ? error : new Error(String(error)));
      return true;
    }
  }

  /** Restarts reading after `requests` stopped accepting (see `startRequests`). */
  resumeReading(): void {
    if (!this.isClosed) this.stream.resume();
  }

  /**
   * A new Socket over this plain socket's handle, reading into `requests`' buffers, and owning
   * the handle and the server's count of it from now on; undefined when this is not a plain
   * socket accepted by a net.Server on this version of Node (the caller then reads chunks).
   */
  private rewrapForDirectReads(requests: RequestReader): Socket | undefined {
    const old = this.socket as Socket & SocketInternals;
    const handle = old._handle;
    if (
      this.tls ||
      this.stream !== this.socket ||
      !(old instanceof Socket) ||
      old.destroyed ||
      old.readableEnded ||
      handle === undefined ||
      handle === null ||
      typeof handle.useUserBuffer !== 'function' ||
      this.pending !== 0
    ) {
      return undefined;
    }
    const options: SocketConstructorOpts & { handle: unknown; pauseOnCreate: boolean; onread: OnReadOpts } = {
      handle,
      allowHalfOpen: old.allowHalfOpen,
      pauseOnCreate: true,
      readable: true,
      writable: true,
      onread: {
        buffer: () => requests.nextBuffer(),
        callback: (count: number, buffer: Uint8Array) =>
          this.guarded(requests, () => requests.received(buffer, count)),
      },
    };
    const fresh = new Socket(options) as Socket & SocketInternals;
    // The old socket lets go of the handle without closing it; the new one is counted in its place.
    fresh._server = old._server;
    fresh.server = old.server;
    old._server = null;
    old._handle = null;
    old.destroy();
    return fresh;
  }

  /** Upgrades to TLS (after the STARTTLS ACK has been sent). Resolves once the handshake is done. */
  async startTls(secureContext: SecureContext): Promise<void> {
    await this.drained();
    const leftover = this.reader.detach();
    if (leftover.length > 0) {
      throw new Error('STARTTLS: client sent data before the TLS handshake');
    }
    const tlsSocket = new TLSSocket(this.socket, { isServer: true, secureContext, requestCert: false });
    tlsSocket.on('error', () => {});
    await new Promise<void>((resolve, reject) => {
      tlsSocket.once('secure', resolve);
      tlsSocket.once('error', reject);
      tlsSocket.once('close', () =>
        reject(new Error('STARTTLS: connection closed during the TLS handshake')),
      );
    });
    this.stream = tlsSocket;
    this.reader.reattach(tlsSocket);
    this.tls = true;
  }

  /** Ends the connection after everything queued has been sent. */
  async end(): Promise<void> {
    if (this.isClosed) return;
    this.flush();
    this.closed = true;
    await new Promise<void>((resolve) => {
      this.stream.once('close', () => resolve());
      this.stream.end();
      // A client that never reads must not keep us waiting forever.
      setTimeout(() => {
        this.destroy();
        resolve();
      }, STOP_GRACE_MS).unref();
    });
    this.socket.destroy();
  }

  /** Drops the connection at once. */
  destroy(): void {
    this.closed = true;
    this.stream.destroy();
    this.socket.destroy();
    this.wakeDrain();
    this.onWritten?.();
  }
}
