/**
 * Keeps a long check from holding the event loop: between chunks of work it checks the abort
 * signal, reports progress, and yields a macrotask turn once enough time has passed (reads from a
 * memory device resolve as microtasks, so awaiting them alone never lets timers or I/O run).
 */

const YIELD_EVERY_MS = 10;

export class Pacer {
  private lastYield = performance.now();
  private done = 0;

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
    return performance.now() - this.lastYield >= YIELD_EVERY_MS;
  }

  /** Reports progress and yields a macrotask turn. */
  async pause(): Promise<void> {
    this.onProgress?.(Math.min(this.done, this.total), this.total);
    await new Promise<void>((resolve) => setTimeout(resolve, 0));
    this.lastYield = performance.now();
    this.signal?.throwIfAborted();
  }

  /** Records `units` of work done; may yield. Throws the abort reason when aborted. */
  async step(units: number): Promise<void> {
    this.done += units;
    this.signal?.throwIfAborted();
    const now = performance.now();
    if (now - this.lastYield >= YIELD_EVERY_MS) {
      this.onProgress?.(Math.min(this.done, this.total), this.total);
      await new Promise<void>((resolve) => setTimeout(resolve, 0));
      this.lastYield = performance.now();
      this.signal?.throwIfAborted();
    }
  }

  finish(): void {
    this.onProgress?.(this.total, this.total);
  }
}
