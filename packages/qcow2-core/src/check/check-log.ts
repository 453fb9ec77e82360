/**
 * Findings of a check: counters plus the lines qemu-img check would print. The number of kept
 * lines is capped so a badly damaged image cannot make the message list grow without bound.
 */

export const MAX_CHECK_MESSAGES = 10_000;

export class CheckLog {
  corruptions = 0;
  leaks = 0;
  checkErrors = 0;
  readonly messages: string[] = [];
  private dropped = 0;

  message(line: string): void {
    if (this.messages.length < MAX_CHECK_MESSAGES) this.messages.push(line);
    else this.dropped++;
  }

  corruption(line: string): void {
    this.corruptions++;
    this.message(line);
  }

  leak(line: string): void {
    this.leaks++;
    this.message(line);
  }

  checkError(line: string): void {
    this.checkErrors++;
    this.message(line);
  }

  private readonly deferred: string[] = [];

  /** A corruption whose line is printed later (after the refcount comparison, where qemu-img
   * prints it) though it was found earlier. */
  deferredCorruption(line: string): void {
    this.corruptions++;
    if (this.messages.length + this.deferred.length < MAX_CHECK_MESSAGES) this.deferred.push(line);
    else this.dropped++;
  }

  /** Appends the deferred lines. */
  flushDeferred(): void {
    for (const line of this.deferred) this.message(line);
    this.deferred.length = 0;
  }

  /** The kept lines, plus one line saying how many were left out. */
  finalMessages(): string[] {
    if (this.dropped === 0) return [...this.messages];
    return [...this.messages, `(${this.dropped} more messages not shown)`];
  }
}
