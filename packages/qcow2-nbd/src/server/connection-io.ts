/**
 * The byte pipe of one connection: a ByteReader for what the client sends, a corked writer for
 * replies (replies made in the same tick leave in one system call), and the STARTTLS upgrade that
 * swaps the plain socket for a TLS one.
 */
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { type SecureContext, TLSSocket } from 'node:tls';
import { ByteReader } from '../protocol/byte-reader.js';

export class ConnectionIo {
  readonly reader: ByteReader;
  private stream: Duplex;
  private corked = false;
  private closed = false;
  /** Bytes handed to the socket whose write has not completed. */
  private pending = 0;
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

  /** Queues bytes for the client. `done` runs when they have left our buffers (or failed). */
  send(bytes: Uint8Array, done?: () => void): void {
    if (this.isClosed) {
      done?.();
      return;
    }
    if (!this.corked) {
      this.corked = true;
      this.stream.cork();
      // Replies completing in the same turn of the event loop leave in one writev.
      setImmediate(() => this.flush());
    }
    this.pending += bytes.length;
    this.stream.write(bytes, () => {
      this.pending -= bytes.length;
      if (this.pending === 0) this.wakeDrain();
      this.onWritten?.();
      done?.();
    });
  }

  /** Sends what is corked now (when nothing else is about to complete). */
  flush(): void {
    if (!this.corked) return;
    this.corked = false;
    this.stream.uncork();
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
