/**
 * A bounded LRU cache of metadata tables (L2 slices, refcount blocks) keyed by host offset. It knows
 * nothing of what a table means. Concurrency-safe: concurrent misses of one key share one load,
 * and a failed load is not cached. Eviction is by total bytes, least recently used first; a table
 * in use by a caller stays valid (tables are immutable values here, the read side never writes).
 */
export class TableCache<T extends { readonly byteLength: number }> {
  readonly #maxBytes: number;
  readonly #entries = new Map<number, T>();
  readonly #loading = new Map<number, Promise<T>>();
  #bytes = 0;
  #hits = 0;
  #misses = 0;

  /** `maxBytes`: the budget; at least one table is always kept whatever its size. */
  constructor(maxBytes: number) {
    this.#maxBytes = Math.max(0, maxBytes);
  }

  /** The table at `key`, loading it with `load` on a miss. */
  get(key: number, load: (key: number) => Promise<T>): Promise<T> {
    const cached = this.#entries.get(key);
    if (cached !== undefined) {
      this.#hits++;
      // Move to the most recently used end.
      this.#entries.delete(key);
      this.#entries.set(key, cached);
      return Promise.resolve(cached);
    }
    const pending = this.#loading.get(key);
    if (pending !== undefined) {
      this.#hits++;
      return pending;
    }
    this.#misses++;
    const promise = load(key).then(
      (table) => {
        this.#loading.delete(key);
        this.#insert(key, table);
        return table;
      },
      (error: unknown) => {
        this.#loading.delete(key);
        throw error;
      },
    );
    this.#loading.set(key, promise);
    return promise;
  }

  /** The table at `key` when cached, without loading; does not change the LRU order. */
  peek(key: number): T | undefined {
    return this.#entries.get(key);
  }

  /** Stores `table` at `key` (a table just written by the write path), replacing any copy. */
  put(key: number, table: T): void {
    this.#insert(key, table);
  }

  /** Forgets `key`. */
  invalidate(key: number): void {
    const table = this.#entries.get(key);
    if (table !== undefined) {
      this.#entries.delete(key);
      this.#bytes -= table.byteLength;
    }
  }

  clear(): void {
    this.#entries.clear();
    this.#bytes = 0;
  }

  get stats(): { entries: number; bytes: number; maxBytes: number; hits: number; misses: number } {
    return {
      entries: this.#entries.size,
      bytes: this.#bytes,
      maxBytes: this.#maxBytes,
      hits: this.#hits,
      misses: this.#misses,
    };
  }

  #insert(key: number, table: T): void {
    const previous = this.#entries.get(key);
    if (previous !== undefined) this.#bytes -= previous.byteLength;
    this.#entries.delete(key);
    this.#entries.set(key, table);
    this.#bytes += table.byteLength;
    for (const [oldKey, oldTable] of this.#entries) {
      if (this.#bytes <= this.#maxBytes || this.#entries.size <= 1) break;
      this.#entries.delete(oldKey);
      this.#bytes -= oldTable.byteLength;
    }
  }
}
