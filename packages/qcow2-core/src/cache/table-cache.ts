/**
 * A bounded LRU cache of metadata tables (L2 slices, refcount blocks) keyed by host offset. It knows
 * nothing of what a table means. Concurrency-safe: concurrent misses of one key share one load,
 * and a failed load is not cached. Eviction is by total bytes, least recently used first.
 *
 * Write-back: an entry marked dirty holds changes not on disk yet. It is never evicted; its owner
 * writes it (`dirtyEntries`, then `markClean`) before its changes may be lost, and keeps the number
 * of dirty bytes bounded (`dirtyBytes`). Clean entries are evicted around the dirty ones.
 */
export class TableCache<T extends { readonly byteLength: number }> {
  readonly #maxBytes: number;
  readonly #entries = new Map<number, T>();
  readonly #loading = new Map<number, Promise<T>>();
  readonly #dirty = new Set<number>();
  /** The most recently used key (the last of `#entries`), or undefined. */
  #newest: number | undefined;
  #bytes = 0;
  #dirtyBytes = 0;
  #hits = 0;
  #misses = 0;

  /** `maxBytes`: the budget; at least one table is always kept whatever its size. */
  constructor(maxBytes: number) {
    this.#maxBytes = Math.max(0, maxBytes);
  }

  /** The budget in bytes. */
  get maxBytes(): number {
    return this.#maxBytes;
  }

  /** The table at `key`, loading it with `load` on a miss. */
  get(key: number, load: (key: number) => Promise<T>): Promise<T> {
    const cached = this.lookup(key);
    if (cached !== undefined) return Promise.resolve(cached);
    const pending = this.#loading.get(key);
    if (pending !== undefined) {
      this.#hits++;
      return pending;
    }
    this.#misses++;
    const promise = load(key).then(
      (table) => {
        this.#loading.delete(key);
        // A table stored meanwhile (`put`, `markDirty`) is newer than what was read.
        const stored = this.#entries.get(key);
        if (stored !== undefined) return stored;
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

  /**
   * The table at `key` when cached (counted as a hit and made most recently used), without loading:
   * the synchronous fast path of {@link get}.
   */
  lookup(key: number): T | undefined {
    const cached = this.#entries.get(key);
    if (cached === undefined) return undefined;
    this.#hits++;
    // Move to the most recently used end (keeps the LRU order true), unless it is there already.
    if (this.#newest !== key) {
      this.#entries.delete(key);
      this.#entries.set(key, cached);
      this.#newest = key;
    }
    return cached;
  }

  /** The table at `key` when cached, without loading; does not change the LRU order. */
  peek(key: number): T | undefined {
    return this.#entries.get(key);
  }

  /** Stores `table` at `key` (a table just written by the write path), replacing any copy. */
  put(key: number, table: T): void {
    this.#insert(key, table);
  }

  /** Stores `table` at `key` (when not stored already) and marks it changed: it stays cached until
   * {@link markClean}. */
  markDirty(key: number, table: T): void {
    if (this.#entries.get(key) !== table) this.#insert(key, table);
    if (!this.#dirty.has(key)) {
      this.#dirty.add(key);
      this.#dirtyBytes += table.byteLength;
    }
  }

  /** `key`'s changes are on disk: it may be evicted again. */
  markClean(key: number): void {
    if (!this.#dirty.delete(key)) return;
    this.#dirtyBytes -= this.#entries.get(key)?.byteLength ?? 0;
    this.#evict();
  }

  isDirty(key: number): boolean {
    return this.#dirty.has(key);
  }

  /** The dirty entries, by ascending key. */
  dirtyEntries(): [number, T][] {
    return [...this.#dirty].sort((a, b) => a - b).map((key) => [key, this.#entries.get(key)!]);
  }

  /** Bytes held by dirty entries. */
  get dirtyBytes(): number {
    return this.#dirtyBytes;
  }

  get dirtyCount(): number {
    return this.#dirty.size;
  }

  /** Forgets `key` (its changes too, when dirty). */
  invalidate(key: number): void {
    const table = this.#entries.get(key);
    if (table !== undefined) {
      this.#entries.delete(key);
      if (this.#newest === key) this.#newest = undefined;
      this.#bytes -= table.byteLength;
      if (this.#dirty.delete(key)) this.#dirtyBytes -= table.byteLength;
    }
  }

  /** Forgets every entry (dirty ones too). */
  clear(): void {
    this.#entries.clear();
    this.#newest = undefined;
    this.#dirty.clear();
    this.#bytes = 0;
    this.#dirtyBytes = 0;
  }

  get stats(): {
    entries: number;
    bytes: number;
    maxBytes: number;
    hits: number;
    misses: number;
    dirty: number;
  } {
    return {
      entries: this.#entries.size,
      bytes: this.#bytes,
      maxBytes: this.#maxBytes,
      hits: this.#hits,
      misses: this.#misses,
      dirty: this.#dirty.size,
    };
  }

  #insert(key: number, table: T): void {
    const previous = this.#entries.get(key);
    if (previous !== undefined) {
      this.#bytes -= previous.byteLength;
      if (this.#dirty.has(key)) this.#dirtyBytes += table.byteLength - previous.byteLength;
    }
    this.#entries.delete(key);
    this.#entries.set(key, table);
    this.#newest = key;
    this.#bytes += table.byteLength;
    this.#evict();
  }

  /** Drops least recently used clean entries while over budget (the newest entry always stays). */
  #evict(): void {
    if (this.#bytes <= this.#maxBytes) return;
    let remaining = this.#entries.size;
    for (const [oldKey, oldTable] of this.#entries) {
      if (this.#bytes <= this.#maxBytes || remaining <= 1) break;
      remaining--;
      if (this.#dirty.has(oldKey)) continue;
      this.#entries.delete(oldKey);
      this.#bytes -= oldTable.byteLength;
    }
  }
}
