/**
 * Keeps a long check from holding the event loop: between chunks of work it checks the abort
 * signal, reports progress, and yields a macrotask turn once enough time has passed (reads from a
 * memory device resolve as microtasks, so awaiting them alone never lets timers or I/O run).
 */

const YIELD_EVERY_MS = 10;
/** Also yield after this much work, so even a fast check lets timers and I/O run (deterministically). */
const YIELD_EVERY_UNITS = 16_384;

export class Pacer {
  private lastYield = performance.now();
  private done = 0;
  private doneAtLastYield = 0;

  constructor(
    private total: number,
    private readonly signal: AbortSignal | undefined,
    private readonly onProgress: ((done: number, total: number) => void) | undefined,
  ) {}

  /** Adds `units` of work to the expected total. */
  grow(units: number): void {
    this.total += units;
  }

  /**
   * Records `units` of work done without yielding; true when it is time to {@link pause}.
   * Throws the abort reason when aborted.
   */
  advance(units: number): boolean {
    this.done += units;
    this.signal?.throwIfAborted();
    return this.#due();
  }

  /** Reports progress and yields a macrotask turn. */
  async pause(): Promise<void> {
    this.onProgress?.(Math.min(this.done, this.total), this.total);
    await new Promise<void>((resolve) => setTimeout(resolve, 0));
    this.lastYield = performance.now();
    this.doneAtLastYield = this.done;
    this.signal?.throwIfAborted();
  }

  /** Records `units` of work done; may yield. Throws the abort reason when aborted. */
  async step(units: number): Promise<void> {
    this.done += units;
    this.signal?.throwIfAborted();
    if (this.#due()) await this.pause();
  }

  #due(): boolean {
    return (
      this.done - this.doneAtLastYield >= YIELD_EVERY_UNITS ||
      performance.now() - this.lastYield >= YIELD_EVERY_MS
    );
  }

  finish(): void {
    this.onProgress?.(this.total, this.total);
  }
}
