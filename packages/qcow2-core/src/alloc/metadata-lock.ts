/**
 * A readers-writer lock for an image's metadata. Reads and writes into clusters that are already
 * allocated share it; anything that changes the mapping (allocation, zeroing, discard, resize,
 * flush of metadata) holds it alone. Writers are preferred, so a stream of reads cannot starve them.
 */
export class MetadataLock {
  #readers = 0;
  #writer = false;
  #waitingWriters: (() => void)[] = [];
  #waitingReaders: (() => void)[] = [];

  /** Runs `task` holding the lock shared. */
  async shared<T>(task: () => Promise<T>): Promise<T> {
    if (this.#writer || this.#waitingWriters.length > 0) {
      await new Promise<void>((resolve) => this.#waitingReaders.push(resolve));
    } else {
      this.#readers++;
    }
    try {
      return await task();
    } finally {
      this.#readers--;
      this.#wake();
    }
  }

  /**
   * Takes the lock shared at once when nobody holds or waits for it alone (then returns true; the
   * caller must {@link releaseShared}); returns false otherwise. The hot path of small in-place
   * writes and reads: no closure, no extra async frame.
   */
  tryShared(): boolean {
    if (this.#writer || this.#waitingWriters.length > 0) return false;
    this.#readers++;
    return true;
  }

  /** Releases a shared hold taken by {@link tryShared}. */
  releaseShared(): void {
    this.#readers--;
    this.#wake();
  }

  /** Runs `task` holding the lock alone. */
  async exclusive<T>(task: () => Promise<T>): Promise<T> {
    if (this.#writer || this.#readers > 0) {
      await new Promise<void>((resolve) => this.#waitingWriters.push(resolve));
    } else {
      this.#writer = true;
    }
    try {
      return await task();
    } finally {
      this.#writer = false;
      this.#wake();
    }
  }

  #wake(): void {
    if (this.#writer || this.#readers > 0) return;
    const writer = this.#waitingWriters.shift();
    if (writer !== undefined) {
      this.#writer = true;
      writer();
      return;
    }
    const readers = this.#waitingReaders;
    this.#waitingReaders = [];
    this.#readers += readers.length;
    for (const reader of readers) reader();
  }
}
