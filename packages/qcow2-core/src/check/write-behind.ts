/**
 * Writes started and not yet awaited, at most `limit` at once: table walks that fix tables write
 * them behind the walk instead of waiting for each write.
 */
export class WriteBehind {
  private readonly pending: Promise<void>[] = [];

  constructor(private readonly limit: number) {}

  /** Takes a started write; waits for the oldest when `limit` are in flight (throws its failure). */
  async add(write: Promise<void>): Promise<void> {
    write.catch(() => undefined); // awaited in add(), drain() or settle()
    this.pending.push(write);
    if (this.pending.length >= this.limit) await this.pending.shift();
  }

  /** Waits for every write; throws the first failure. */
  async drain(): Promise<void> {
    while (this.pending.length > 0) await this.pending.shift();
  }

  /** Waits for every write, failed or not (after a failure elsewhere, before giving up). */
  async settle(): Promise<void> {
    const pending = this.pending.splice(0);
    await Promise.allSettled(pending);
  }
}
