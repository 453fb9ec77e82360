/**
 * Findings of a check: counters plus the lines qemu-img check would print. The number of kept
 * lines is capped so a badly damaged image cannot make the message list grow without bound.
 */

export const MAX_CHECK_MESSAGES = 10_000;

/** A line, or a function making it: hot paths pass functions so lines past the cap cost nothing. */
export type CheckMessage = string | (() => string);

export class CheckLog {
  corruptions = 0;
  leaks = 0;
  checkErrors = 0;
  readonly messages: string[] = [];
  private dropped = 0;

  message(line: CheckMessage): void {
    if (this.messages.length < MAX_CHECK_MESSAGES)
      this.messages.push(typeof line === 'string' ? line : line());
    else this.dropped++;
  }

  corruption(line: CheckMessage): void {
    this.corruptions++;
    this.message(line);
  }

  leak(line: CheckMessage): void {
    this.leaks++;
    this.message(line);
  }

  checkError(line: CheckMessage): void {
    this.checkErrors++;
    this.message(line);
  }

  private readonly deferred: string[] = [];

  /** A corruption whose line is printed later (after the refcount comparison, where qemu-img
   * prints it) though it was found earlier. */
  deferredCorruption(line: CheckMessage): void {
    this.corruptions++;
    if (this.messages.length + this.deferred.length < MAX_CHECK_MESSAGES) {
      this.deferred.push(typeof line === 'string' ? line : line());
    } else {
      this.dropped++;
    }
  }

  /**
   * QEMU reports the first unreadable (misaligned) refcount block once, where it is met, as an
   * image corruption notice; later ones are suppressed. `deferred` notices are met during the
   * COPIED checks and are placed among their (deferred) lines.
   */
  private noticeGiven = false;
  private deferredNotice: number | undefined;

  corruptionNotice(line: CheckMessage, deferred: boolean): void {
    if (this.noticeGiven) return;
    if (!deferred) {
      this.noticeGiven = true;
      this.message(line);
    } else if (this.deferredNotice === undefined) {
      this.deferredNotice = this.deferred.length;
      this.deferred.push(typeof line === 'string' ? line : line());
    }
  }

  /** Appends the deferred lines. */
  flushDeferred(): void {
    this.deferred.forEach((line, index) => {
      if (index === this.deferredNotice && this.noticeGiven) return;
      this.message(line);
    });
    if (this.deferredNotice !== undefined) this.noticeGiven = true;
    this.deferred.length = 0;
    this.deferredNotice = undefined;
  }

  /** The kept lines, plus one line saying how many were left out. */
  finalMessages(): string[] {
    if (this.dropped === 0) return [...this.messages];
    return [...this.messages, `(${this.dropped} more messages not shown)`];
  }
}
