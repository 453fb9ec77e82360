/**
 * Keeps a long check from holding the event loop: between chunks of work it checks the abort
 * signal, reports progress, and yields a macrotask turn once enough time has passed (reads from a
 * memory device resolve as microtasks, so awaiting them alone never lets timers or I/O run).
 * Time is `Date.now()`: milliseconds are fine enough here, and Node loads its `performance`
 * object (perf_hooks) at its first use, about a millisecond of a short check.
 */

const YIELD_EVERY_MS = 10;

/** A macrotask turn without a timer's delay: `setImmediate` where the platform has it (Node). */
const nextTurn: ((resolve: () => void) => void) | undefined =
  typeof globalThis.setImmediate === 'function' ? (resolve) => globalThis.setImmediate(resolve) : undefined;
/** Also yield after this much work, so even a fast check lets timers and I/O run (deterministically). */
const YIELD_EVERY_UNITS = 16_384;

export class Pacer {
  private lastYield = Date.now();
  private done = 0;
  private doneAtLastYield = 0;

  constructor(
    private readonly total: number,
    private readonly signal: AbortSignal | undefined,
    private readonly onProgress: ((done: number, total: number) => void) | undefined,
  ) {}

  /**
   * Records `units` of work done without yielding; true when it is time to {@link pause}.
   * Throws the abort reason when aborted.
   */
  advance(units: number): boolean {
    this.done += units;
    this.signal?.throwIfAborted();
    return this.#due();
  }

  /**
   * Reports progress and yields a macrotask turn. A timer turn costs about a millisecond, so only
   * the first pause and those due by time wait for one (then every timer already due runs, those
   * set before the check began included); the pauses due by work done take an immediate turn
   * (I/O callbacks and due timers still run), where the platform has one.
   */
  async pause(): Promise<void> {
    this.onProgress?.(Math.min(this.done, this.total), this.total);
    const now = Date.now();
    if (!this.timerTurnTaken || now - this.lastTimerTurn >= YIELD_EVERY_MS || nextTurn === undefined) {
      await new Promise<void>((resolve) => setTimeout(resolve, 0));
      this.timerTurnTaken = true;
      this.lastTimerTurn = Date.now();
    } else {
      await new Promise<void>(nextTurn);
    }
    this.lastYield = Date.now();
    this.doneAtLastYield = this.done;
    this.signal?.throwIfAborted();
  }

  private timerTurnTaken = false;
  private lastTimerTurn = 0;

  /** Records `units` of work done; may yield. Throws the abort reason when aborted. */
  async step(units: number): Promise<void> {
    this.done += units;
    this.signal?.throwIfAborted();
    if (this.#due()) await this.pause();
  }

  #due(): boolean {
    return (
      this.done - this.doneAtLastYield >= YIELD_EVERY_UNITS || Date.now() - this.lastYield >= YIELD_EVERY_MS
    );
  }

  finish(): void {
    this.onProgress?.(this.total, this.total);
  }
}
