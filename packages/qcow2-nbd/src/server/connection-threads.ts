/**
 * Connections served by threads of their own. A connection to an export with a `fileSource` (a
 * raw file on tmpfs), once its handshake is done on the main thread, is handed to a worker thread
 * that reads its requests with plain system calls and serves READs, WRITEs and FLUSHes straight
 * on the file (thread-loop.ts), as nbdkit's threads do: no event loop, no promises, and each
 * connection on a core of its own. Whatever else comes (other commands, invalid requests, file
 * errors) is forwarded to the connection's Transmission on the main thread, which sends the reply
 * itself while the thread waits; the protocol's rules stay in one place.
 *
 * Workers are started ahead (each takes tens of milliseconds to start and load) and reused: a
 * connection takes an idle one or starts one; at its end the worker goes back to the idle ones.
 * Past `max` connections on threads at once, more are served on the event loop as before.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { F_DUPFD_CLOEXEC, loadLibc } from '@qcowkit/blockdev/node';
import type { ConnectionIo } from './connection-io.js';
import type { Session } from './handshake.js';
import { errorMessage } from './nbd-errors.js';
import {
  SIGNAL_STOP,
  SIGNAL_TAKEN,
  SIGNAL_VERDICT,
  SIGNAL_WORDS,
  type ThreadJob,
  type ThreadMessage,
  VERDICT_END,
  VERDICT_GO_ON,
} from './thread-messages.js';
import { requestContext, type Transmission, type TransmissionEnd } from './transmission.js';

/** Longest a server waits for its workers started ahead before it listens anyway. */
const READY_PATIENCE_MS = 5000;
/** Idle workers kept for the next connections. */
const MAX_IDLE = 4;

export interface ServedOnThread {
  /** Resolves when the connection's transmission phase is over, with why. */
  readonly done: Promise<TransmissionEnd>;
  /** Graceful stop: the requests received are served, then the thread lets the connection go. */
  readonly stop: () => void;
}

/**
 * The worker's file: next to this module once built; from the sources (the package's own tests
 * import them), the built one, since Node 20 cannot start a TypeScript worker.
 */
function workerUrl(): URL {
  return import.meta.url.endsWith('.ts')
    ? new URL('../../dist/server/connection-worker.js', import.meta.url)
    : new URL('./connection-worker.js', import.meta.url);
}

export class ConnectionThreads {
  private readonly idle: Worker[] = [];
  /** Connections served on threads now, in a word the threads read too (see ThreadJob.busy). */
  private readonly busy = new Int32Array(new SharedArrayBuffer(4));
  private closed = false;
  /** Set when a worker failed to start: every connection goes to the event loop from then on. */
  private broken = false;
  /** Settles when the workers started ahead are ready (or have failed). */
  readonly ready: Promise<void>;

  /** Whether this platform can serve connections on threads (koffi's libc binding loads). */
  static get available(): boolean {
    const libc = loadLibc();
    return libc?.rawIo !== undefined && libc.fcntlInt !== undefined;
  }

  /**
   * @param max Connections served on threads at once.
   * @param prestart Workers started now, ahead of the first connections.
   */
  constructor(
    private readonly log: (message: string) => void,
    private readonly max: number,
    prestart: number,
  ) {
    for (let i = 0; i < Math.min(prestart, max, MAX_IDLE); i++) this.idle.push(this.start());
    const started = Promise.all(
      this.idle.map(
        (worker) =>
          new Promise<void>((resolve) => {
            const onMessage = (message: ThreadMessage) => {
              if (message.type === 'ready') done();
            };
            const done = () => {
              worker.off('message', onMessage);
              worker.off('exit', done);
              resolve();
            };
            worker.on('message', onMessage);
            worker.once('exit', done);
          }),
      ),
    ).then(() => {});
    // A worker that neither starts nor fails must not hold the server back.
    const patience = new Promise<void>((resolve) => setTimeout(resolve, READY_PATIENCE_MS).unref());
    this.ready = Promise.race([started, patience]);
  }

  private start(): Worker {
    // No inherited flags: `node --input-type=module -e` would make the worker fail to start.
    const worker = new Worker(workerUrl(), { execArgv: [] });
    // Idle workers do not keep the process alive; a busy one is referenced while it serves.
    worker.unref();
    worker.on('error', (error) => {
      this.broken = true;
      this.log(`connection thread: ${errorMessage(error)}`);
    });
    worker.once('exit', () => {
      const index = this.idle.indexOf(worker);
      if (index >= 0) this.idle.splice(index, 1);
    });
    return worker;
  }

  /**
   * Serves the transmission phase of `io`'s connection on a thread; undefined, with nothing done,
   * when it is not to be (no file source, TLS, no descriptor, all threads busy): the caller runs
   * `transmission` on the event loop. Call after the handshake's replies have left (`drained`).
   */
  serve(io: ConnectionIo, session: Session, transmission: Transmission): ServedOnThread | undefined {
    const source = session.export.fileSource;
    const libc = loadLibc();
    const rawIo = libc?.rawIo;
    if (
      this.closed ||
      this.broken ||
      Atomics.load(this.busy, 0) >= this.max ||
      source === undefined ||
      libc?.fcntlInt === undefined ||
      rawIo === undefined
    ) {
      return undefined;
    }
    const detached = io.detachForThread();
    if (detached === undefined) return undefined;
    // The thread's own descriptor: closing it there never closes one the main thread reuses.
    const copy = libc.fcntlInt(detached.fd, F_DUPFD_CLOEXEC, 0);
    if (!copy.ok) {
      this.log(`connection thread: cannot duplicate the socket (${copy.code})`);
      io.destroy();
      return { done: Promise.resolve('closed'), stop: () => {} };
    }
    Atomics.add(this.busy, 0, 1);
    const worker = this.idle.pop() ?? this.start();
    const words = new Int32Array(new SharedArrayBuffer(SIGNAL_WORDS * 4));
    const job: ThreadJob = {
      socketFd: copy.value,
      fileFd: source.fd,
      fileWrites: source.writes === true,
      context: requestContext(session),
      leftover: new Uint8Array(detached.leftover),
      signal: words.buffer as SharedArrayBuffer,
      busy: this.busy.buffer as SharedArrayBuffer,
      spinLimit: availableParallelism(),
    };
    const done = new Promise<TransmissionEnd>((resolve) => {
      /** Why the main thread's side ended the connection (a forwarded request's verdict). */
      let ending: TransmissionEnd | undefined;
      const verdict = (value: number) => {
        Atomics.store(words, SIGNAL_VERDICT, value);
        Atomics.notify(words, SIGNAL_VERDICT);
      };
      const finish = (end: TransmissionEnd, reusable: boolean) => {
        worker.off('message', onMessage);
        worker.off('exit', onExit);
        Atomics.sub(this.busy, 0, 1);
        if (reusable && !this.closed && this.idle.length < MAX_IDLE) {
          worker.unref();
          this.idle.push(worker);
        } else {
          void worker.terminate();
        }
        // Bytes after the end are read and dropped, so the client's closing is seen.
        io.reattachAfterThread();
        resolve(end);
      };
      const onMessage = (message: ThreadMessage) => {
        if (message.type === 'ready') return;
        if (message.type === 'end') {
          const end = message.end;
          finish(
            end === 'disconnect' || end === 'shutdown'
              ? end
              : end === 'forwarded-end'
                ? (ending ?? 'protocol-error')
                : 'closed',
            end !== 'unavailable',
          );
          return;
        }
        const { request } = message;
        transmission.serveForwarded(Buffer.from(request.buffer, request.byteOffset, request.byteLength)).then(
          (goOn) => {
            if (!goOn) ending = transmission.ended ?? 'closed';
            verdict(goOn ? VERDICT_GO_ON : VERDICT_END);
          },
          (error: unknown) => {
            this.log(`request: internal failure: ${errorMessage(error)}`);
            ending = 'protocol-error';
            verdict(VERDICT_END);
          },
        );
      };
      const onExit = () => {
        // A worker that never took the job left its descriptor open. One that did closed it on
        // its way out (its loop's `finally`); closing it again could close another file's.
        if (Atomics.load(words, SIGNAL_TAKEN) === 0) rawIo.close(job.socketFd);
        this.log('connection thread: stopped while serving a connection');
        finish('protocol-error', false);
      };
      worker.on('message', onMessage);
      worker.once('exit', onExit);
    });
    worker.ref();
    worker.postMessage(job);
    return {
      done,
      stop: () => {
        transmission.stop();
        Atomics.store(words, SIGNAL_STOP, 1);
      },
    };
  }

  /** Stops the idle workers; busy ones finish their connection first (see `serve`'s `stop`). */
  close(): void {
    this.closed = true;
    for (const worker of this.idle.splice(0)) void worker.terminate();
  }
}
