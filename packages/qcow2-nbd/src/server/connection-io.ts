/**
 * The byte pipe of one connection: a ByteReader for what the client sends, a batching writer for
 * replies (replies made in the same turn of the event loop leave in one system call), and the
 * STARTTLS upgrade that swaps the plain socket for a TLS one.
 */
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { type SecureContext, TLSSocket } from 'node:tls';
import { ByteReader } from '../protocol/byte-reader.js';

/**
 * Replies at most this long are copied into one buffer with the others of the same turn of the
 * event loop, so a burst of small replies costs one socket write and one stream callback rather
 * than one each (per-write bookkeeping in Node's streams was a tenth of a 4 KiB read's cost).
 * Longer replies are written as they are, without a copy.
 */
const COALESCE_MAX = 16 * 1024;

export class ConnectionIo {
  readonly reader: ByteReader;
  private stream: Duplex;
  private closed = false;
  /** Bytes handed to send() whose write has not completed. */
  private pending = 0;
  /** Replies queued in this turn of the event loop, and what to call once each has left us. */
  private queue: Uint8Array[] = [];
  private queueDone: ((() => void) | undefined)[] = [];
  private flushScheduled = false;
  /** Called whenever a write completes (the transmission loop waits on it for backpressure). */
  onWritten: (() => void) | undefined;
  private drainWaiters: (() => void)[] = [];
  tls = false;

  constructor(readonly socket: Socket) {
    this.stream = socket;
    // The reader listens for errors too; this keeps an error after a TLS upgrade from crashing us.
    socket.on('error', () => {});
    socket.setNoDelay?.(true);
    this.reader = new ByteReader(socket);
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
    const queue = this.queue;
    const queueDone = this.queueDone;
    if (queue.length === 0) return;
    this.queue = [];
    this.queueDone = [];
    if (this.isClosed) {
      for (const done of queueDone) done?.();
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
        this.write(Buffer.concat(group, groupBytes), undefined);
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
      if (bytes.length <= COALESCE_MAX) {
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

  private write(bytes: Uint8Array, done: (() => void) | undefined): void {
    this.stream.write(bytes, () => {
      this.pending -= bytes.length;
      if (this.pending === 0) this.wakeDrain();
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
      }, 2000).unref();
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
