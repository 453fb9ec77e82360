/**
 * What the main thread and a connection's worker thread (connection-worker.ts) send each other:
 * the job that hands a connection over, the worker's messages, and the shared words a worker
 * waits on while the main thread serves a request it forwarded.
 */
import type { RequestContext } from '../protocol/requests.js';
import type { ThreadLoopEnd } from './thread-loop.js';

/** The job the main thread posts. */
export interface ThreadJob {
  readonly socketFd: number;
  readonly fileFd: number;
  readonly fileWrites: boolean;
  readonly context: RequestContext;
  readonly leftover: Uint8Array;
  /** SIGNAL_WORDS Int32 words: [SIGNAL_VERDICT] the main thread's answer to a forwarded request,
   * [SIGNAL_STOP] non-zero once the server is stopping, [SIGNAL_TAKEN] set by the worker when it
   * takes the job (the socket's descriptor is its to close from then on). */
  readonly signal: SharedArrayBuffer;
  /** One Int32 word shared by every connection thread of the server: how many serve one now. */
  readonly busy: SharedArrayBuffer;
  /** Connection threads busy at once past which none spins (see thread-loop.ts): the CPUs. */
  readonly spinLimit: number;
}

export type ThreadMessage =
  | { readonly type: 'ready' }
  | { readonly type: 'forward'; readonly request: Uint8Array }
  | { readonly type: 'end'; readonly end: ThreadLoopEnd | 'unavailable' };

/** Indexes in ThreadJob.signal and the verdicts. */
export const SIGNAL_VERDICT = 0;
export const SIGNAL_STOP = 1;
export const SIGNAL_TAKEN = 2;
export const SIGNAL_WORDS = 3;
export const VERDICT_PENDING = 0;
export const VERDICT_GO_ON = 1;
export const VERDICT_END = 2;
