/**
 * createNbdServer: serves BlockDevices over NBD on TCP, a unix socket or an inherited file
 * descriptor (systemd socket activation). Every connection runs the handshake then the
 * transmission loop; connections to one export share its device, so a flush on any connection
 * covers writes acknowledged on all of them (multi-conn).
 */
import { type AddressInfo, createServer, type Server, type Socket } from 'node:net';
import { createSecureContext, type SecureContext, type SecureContextOptions } from 'node:tls';
import { BufferPool } from './buffer-pool.js';
import { ConnectionIo, type ReadMode } from './connection-io.js';
import { ConnectionThreads, type ServedOnThread } from './connection-threads.js';
import { DataExtentCache } from './data-extent-cache.js';
import type { NbdExport } from './export.js';
import { HandshakeAbort, negotiate } from './handshake.js';
import { errorMessage } from './nbd-errors.js';
import { STOP_GRACE_MS } from './stop-grace.js';
import { Transmission } from './transmission.js';

export interface NbdTlsOptions {
  /** PEM server certificate (chain). */
  readonly cert: string | Buffer;
  /** PEM private key. */
  readonly key: string | Buffer;
  /** PEM CA certificate(s); kept for clients verifying the chain. */
  readonly ca?: string | Buffer;
  /** Refuse every option but STARTTLS before TLS is up. Default true (as qemu-nbd). */
  readonly required?: boolean;
}

export interface NbdServerOptions {
  readonly exports: readonly NbdExport[];
  readonly tls?: NbdTlsOptions;
  /** Connections served at once; more wait (up to 64, then are closed) until one ends, as with
   * qemu-nbd's `-e`. Default: unlimited. */
  readonly maxConnections?: number;
  /** Advertise NBD_FLAG_CAN_MULTI_CONN. Default: true unless maxConnections is 1. */
  readonly multiConn?: boolean;
  /** Bytes held by requests in flight per connection. Default 64 MiB. */
  readonly maxInFlightBytes?: number;
  /**
   * How requests are read from plain (not TLS) connections: `direct` (default) receives them into
   * buffers the server chooses, large WRITE payloads straight into the buffer the device writes
   * from; `stream` takes Node's socket chunks and copies payloads out of them, as over TLS.
   */
  readonly readMode?: ReadMode;
  /** A client must finish the handshake within this many milliseconds (default 10 000, as
   * qemu-nbd); 0 disables the limit. */
  readonly handshakeTimeout?: number;
  /** Receives one line per notable event (bad client, failed request). Default: ignored. */
  readonly log?: (message: string) => void;
  /**
   * Connections to exports with a `fileSource` (raw files on tmpfs) are served by worker threads
   * of their own after the handshake, up to this many at once (see connection-threads.ts); more
   * are served on the event loop. Two workers are started with the server; `listen` resolves once
   * they are ready. `false` or 0: every
   * connection on the event loop. Default 16 where the platform can (Linux with koffi).
   */
  readonly connectionThreads?: number | false;
  /** Called after a connection has ended, with the number still open. */
  readonly onDisconnect?: (info: { readonly open: number; readonly served: number }) => void;
}

export type NbdListenTarget =
  | { readonly port: number; readonly host?: string }
  | { readonly path: string }
  | { readonly fd: number };

export interface NbdServer extends AsyncDisposable {
  listen(target: NbdListenTarget): Promise<void>;
  /** The bound address: `{ port, address }` for TCP, the path for a unix socket. */
  address(): AddressInfo | string | null;
  /** Connections open now. */
  readonly connections: number;
  /** Stops accepting, lets requests in flight finish, flushes the exports, closes connections. */
  close(): Promise<void>;
}

/** Connection threads started with the server (nbdcopy's 2 connections on 2 cores find theirs). */
const PRESTARTED_THREADS = 2;
/** Most clients kept waiting for a slot; more are closed on arrival. */
const MAX_WAITING = 64;

interface Connection {
  readonly io: ConnectionIo;
  transmission: Transmission | undefined;
  /** Set when a thread serves the connection: its graceful stop. */
  stopThread: (() => void) | undefined;
  done: Promise<void>;
}

export function createNbdServer(options: NbdServerOptions): NbdServer {
  if (options.exports.length === 0) throw new TypeError('createNbdServer: at least one export is needed');
  const names = new Set<string>();
  for (const entry of options.exports) {
    if (names.has(entry.name))
      throw new TypeError(`createNbdServer: export name '${entry.name}' is used twice`);
    names.add(entry.name);
  }
  const log = options.log ?? (() => {});
  const handshakeTimeout = options.handshakeTimeout ?? 10_000;
  const maxConnections = options.maxConnections ?? Number.POSITIVE_INFINITY;
  const secureContext: SecureContext | undefined =
    options.tls === undefined ? undefined : createSecureContext(tlsContextOptions(options.tls));
  const handshakeConfig = {
    exports: options.exports,
    secureContext,
    tlsRequired: options.tls?.required ?? true,
    multiConn: options.multiConn ?? maxConnections !== 1,
  };
  const maxInFlightBytes = options.maxInFlightBytes ?? 64 * 1024 * 1024;
  const buffers = new BufferPool();
  const dataExtents = new Map(options.exports.map((entry) => [entry, new DataExtentCache()]));
  const connections = new Set<Connection>();
  const maxThreads = options.connectionThreads === false ? 0 : (options.connectionThreads ?? 16);
  const threads =
    maxThreads > 0 &&
    options.exports.some((entry) => entry.fileSource !== undefined) &&
    ConnectionThreads.available
      ? new ConnectionThreads(log, maxThreads, PRESTARTED_THREADS)
      : undefined;
  let served = 0;
  let closing: Promise<void> | undefined;

  const serve = async (connection: Connection): Promise<void> => {
    const { io } = connection;
    const timer =
      handshakeTimeout > 0
        ? setTimeout(() => {
            log('handshake: client too slow, closing the connection');
            io.destroy();
          }, handshakeTimeout)
        : undefined;
    try {
      const session = await negotiate(io, handshakeConfig).finally(() => clearTimeout(timer));
      if (session === undefined || closing !== undefined) return;
      const transmission = new Transmission(io, session, {
        maxInFlightBytes,
        log,
        buffers,
        dataExtents: dataExtents.get(session.export)!,
      });
      connection.transmission = transmission;
      let onThread: ServedOnThread | undefined;
      if (threads !== undefined) {
        // The handshake's last reply leaves first: the thread writes to the socket directly.
        await io.drained();
        onThread = threads.serve(io, session, transmission);
      }
      if (onThread !== undefined) connection.stopThread = onThread.stop;
      const end = await (onThread?.done ?? transmission.run(options.readMode ?? 'direct'));
      if (end === 'protocol-error') io.destroy();
    } catch (error) {
      if (error instanceof HandshakeAbort) log(error.message);
      else if (!io.isClosed && error instanceof Error && error.name !== 'StreamEndedError') {
        log(`connection: ${errorMessage(error)}`);
      }
      io.destroy();
    } finally {
      await io.end();
    }
  };

  /** Clients waiting for a free slot: they get the greeting when one frees (as qemu-nbd's -e). */
  const waiting: Socket[] = [];
  const admit = (socket: Socket): void => {
    served++;
    const connection: Connection = {
      io: new ConnectionIo(socket),
      transmission: undefined,
      stopThread: undefined,
      done: Promise.resolve(),
    };
    connections.add(connection);
    connection.done = serve(connection).finally(() => {
      connections.delete(connection);
      let next = waiting.shift();
      while (next?.destroyed) next = waiting.shift();
      if (next !== undefined && closing === undefined) {
        next.removeAllListeners('close');
        next.resume();
        admit(next);
      }
      options.onDisconnect?.({ open: connections.size, served });
    });
  };

  const netServer: Server = createServer({ pauseOnConnect: true }, (socket: Socket) => {
    if (closing !== undefined) {
      socket.destroy();
      return;
    }
    if (connections.size >= maxConnections) {
      if (waiting.length >= MAX_WAITING) {
        socket.destroy();
        return;
      }
      socket.on('error', () => {});
      socket.once('close', () => {
        const index = waiting.indexOf(socket);
        if (index >= 0) waiting.splice(index, 1);
      });
      waiting.push(socket);
      return;
    }
    socket.resume();
    admit(socket);
  });
  netServer.on('error', (error) => log(`server: ${error.message}`));

  const close = (): Promise<void> => {
    closing ??= (async () => {
      const stopped = new Promise<void>((resolve) => netServer.close(() => resolve()));
      for (const socket of waiting.splice(0)) socket.destroy();
      for (const connection of connections) {
        if (connection.transmission === undefined) connection.io.destroy();
        else if (connection.stopThread !== undefined) connection.stopThread();
        else connection.transmission.stop();
      }
      // A client that neither reads its replies nor leaves must not hold the stop up: past the
      // grace period its connection is dropped (requests in flight still finish on the device).
      let graceTimer: NodeJS.Timeout | undefined;
      const graceOver = new Promise<void>((resolve) => {
        graceTimer = setTimeout(resolve, STOP_GRACE_MS);
      });
      await Promise.all(
        [...connections].map(async (connection) => {
          const graceful = (async () => {
            // A thread lets its connection go once the requests it received are served.
            if (connection.stopThread !== undefined) await connection.done;
            await connection.transmission?.idle();
            await connection.io.end();
          })();
          const ended = await Promise.race([graceful.then(() => true), graceOver.then(() => false)]);
          if (!ended) {
            log('close: a client did not take its replies in time, dropping the connection');
            connection.io.destroy();
          }
          await connection.done;
        }),
      );
      clearTimeout(graceTimer);
      await Promise.all(
        options.exports.map(async (entry) => {
          if (!entry.device.readOnly) {
            try {
              await entry.device.flush();
            } catch (error) {
              log(`close: flush of ${entry.device.description} failed: ${errorMessage(error)}`);
            }
          }
        }),
      );
      threads?.close();
      if (netServer.listening) await stopped;
    })();
    return closing;
  };

  return {
    async listen(target: NbdListenTarget): Promise<void> {
      // Clients find the connection threads started, not starting (tens of ms of CPU each).
      await threads?.ready;
      return new Promise<void>((resolve, reject) => {
        const onError = (error: Error) => reject(error);
        netServer.once('error', onError);
        const done = () => {
          netServer.off('error', onError);
          resolve();
        };
        if ('fd' in target) netServer.listen({ fd: target.fd }, done);
        else if ('path' in target) netServer.listen({ path: target.path }, done);
        else netServer.listen({ port: target.port, host: target.host ?? '127.0.0.1' }, done);
      });
    },
    address: () => netServer.address(),
    get connections() {
      return connections.size;
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}

function tlsContextOptions(tls: NbdTlsOptions): SecureContextOptions {
  return tls.ca === undefined
    ? { cert: tls.cert, key: tls.key }
    : { cert: tls.cert, key: tls.key, ca: tls.ca };
}
