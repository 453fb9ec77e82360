/**
 * A worker thread serving connections handed to it one at a time (see connection-threads.ts):
 * each job is a socket descriptor, the export's file and the session's terms; the thread runs the
 * transmission loop (thread-loop.ts) until the connection ends, closes its copy of the descriptor
 * and reports why it ended. It says when it is ready, its binding loaded. Requests it does not serve itself go to the main thread as messages,
 * the thread waiting on a shared word for the verdict.
 */
import { closeSync } from 'node:fs';
import { parentPort } from 'node:worker_threads';
import { loadLibc } from '@qcowkit/blockdev/node';
import { runThreadLoop, type ThreadLoopEnd } from './thread-loop.js';
import {
  SIGNAL_STOP,
  SIGNAL_TAKEN,
  SIGNAL_VERDICT,
  type ThreadJob,
  type ThreadMessage,
  VERDICT_GO_ON,
  VERDICT_PENDING,
} from './thread-messages.js';

const port = parentPort;
if (port !== null) {
  // Ready to serve once the binding is loaded (a server starts listening after that).
  loadLibc();
  port.postMessage({ type: 'ready' } satisfies ThreadMessage);
  port.on('message', (job: ThreadJob) => {
    const post = (message: ThreadMessage, transfer?: ArrayBuffer[]) => port.postMessage(message, transfer);
    const signal = new Int32Array(job.signal);
    const busy = new Int32Array(job.busy);
    Atomics.store(signal, SIGNAL_TAKEN, 1);
    const io = loadLibc()?.rawIo;
    if (io === undefined) {
      // Cannot happen where the main thread could load it.
      closeSync(job.socketFd);
      post({ type: 'end', end: 'unavailable' });
      return;
    }
    let end: ThreadLoopEnd;
    try {
      end = runThreadLoop({
        io,
        socketFd: job.socketFd,
        fileFd: job.fileFd,
        fileWrites: job.fileWrites,
        context: job.context,
        leftover: job.leftover,
        maySpin: () => Atomics.load(busy, 0) < job.spinLimit,
        stopping: () => Atomics.load(signal, SIGNAL_STOP) !== 0,
        forward: (request) => {
          // A copy of its own: posting a view would copy the whole buffer behind it.
          const copy = new Uint8Array(request);
          Atomics.store(signal, SIGNAL_VERDICT, VERDICT_PENDING);
          post({ type: 'forward', request: copy }, [copy.buffer]);
          Atomics.wait(signal, SIGNAL_VERDICT, VERDICT_PENDING);
          return Atomics.load(signal, SIGNAL_VERDICT) === VERDICT_GO_ON;
        },
      });
    } finally {
      io.close(job.socketFd);
    }
    post({ type: 'end', end });
  });
}
