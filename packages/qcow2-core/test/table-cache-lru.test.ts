/**
 * TableCache against a model LRU over random operations: what stays cached after each step
 * (least recently used clean entries go first, dirty ones never, the newest always stays), with
 * repeated lookups of the newest entry (which the cache does not move again) mixed in.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { TableCache } from '../src/cache/table-cache.js';

type Op =
  | { kind: 'lookup' | 'invalidate' | 'markClean'; key: number }
  | { kind: 'put' | 'markDirty'; key: number; size: number }
  | { kind: 'clear' };

const key = fc.integer({ min: 0, max: 3 });
const size = fc.integer({ min: 1, max: 400 });
const opArbitrary: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: key.map((k) => ({ kind: 'lookup' as const, key: k })) },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('put' as const), key, size }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('markDirty' as const), key, size }) },
  { weight: 2, arbitrary: key.map((k) => ({ kind: 'markClean' as const, key: k })) },
  { weight: 1, arbitrary: key.map((k) => ({ kind: 'invalidate' as const, key: k })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'clear' as const }) },
);

/** The model: keys oldest first, with their sizes and dirtiness. */
class ModelLru {
  order: { key: number; size: number; dirty: boolean }[] = [];
  constructor(readonly maxBytes: number) {}

  #find(k: number): number {
    return this.order.findIndex((entry) => entry.key === k);
  }

  touch(k: number): boolean {
    const index = this.#find(k);
    if (index < 0) return false;
    this.order.push(...this.order.splice(index, 1));
    return true;
  }

  insert(k: number, size: number, dirty: boolean): void {
    const index = this.#find(k);
    const wasDirty = index >= 0 && this.order[index]!.dirty;
    if (index >= 0) this.order.splice(index, 1);
    this.order.push({ key: k, size, dirty: dirty || wasDirty });
    this.evict();
  }

  evict(): void {
    const bytes = () => this.order.reduce((sum, entry) => sum + entry.size, 0);
    for (const entry of [...this.order]) {
      if (bytes() <= this.maxBytes || this.order.length <= 1) return;
      if (entry === this.order.at(-1)) return;
      if (!entry.dirty) this.order.splice(this.order.indexOf(entry), 1);
    }
  }
}

describe('TableCache LRU', () => {
  it('keeps what a model LRU keeps, step by step', () => {
    fc.assert(
      fc.property(
        fc.array(opArbitrary, { maxLength: 60 }),
        fc.integer({ min: 200, max: 800 }),
        (ops, max) => {
          const cache = new TableCache<Uint8Array>(max);
          const model = new ModelLru(max);
          const tables = new Map<number, Uint8Array>();
          for (const op of ops) {
            switch (op.kind) {
              case 'lookup': {
                const found = cache.lookup(op.key);
                expect(found !== undefined).toBe(model.touch(op.key));
                if (found !== undefined) expect(found).toBe(tables.get(op.key));
                break;
              }
              case 'put':
              case 'markDirty': {
                // markDirty of the table already stored keeps it (and its place); of a new one stores it.
                const current = cache.peek(op.key);
                const table =
                  op.kind === 'markDirty' && current !== undefined ? current : new Uint8Array(op.size);
                tables.set(op.key, table);
                if (op.kind === 'put') {
                  cache.put(op.key, table);
                  model.insert(op.key, table.byteLength, false);
                } else {
                  cache.markDirty(op.key, table);
                  if (current === undefined) model.insert(op.key, table.byteLength, true);
                  else model.order.find((entry) => entry.key === op.key)!.dirty = true;
                }
                break;
              }
              case 'markClean': {
                cache.markClean(op.key);
                const entry = model.order.find((candidate) => candidate.key === op.key);
                if (entry?.dirty) {
                  entry.dirty = false;
                  model.evict();
                }
                break;
              }
              case 'invalidate':
                cache.invalidate(op.key);
                model.order = model.order.filter((entry) => entry.key !== op.key);
                break;
              case 'clear':
                cache.clear();
                model.order = [];
                break;
            }
            const cached = [...Array(4).keys()].filter((k) => cache.peek(k) !== undefined);
            expect(cached).toEqual(model.order.map((entry) => entry.key).sort((a, b) => a - b));
            expect(cache.stats.bytes).toBe(model.order.reduce((sum, entry) => sum + entry.size, 0));
            expect(cache.dirtyCount).toBe(model.order.filter((entry) => entry.dirty).length);
          }
        },
      ),
      { numRuns: 500 },
    );
  });

  it('a lookup after storing another table makes the looked-up one the newest again', () => {
    const cache = new TableCache<Uint8Array>(250);
    cache.put(1, new Uint8Array(100));
    cache.lookup(1);
    cache.put(2, new Uint8Array(100));
    cache.lookup(1);
    cache.lookup(1);
    cache.put(3, new Uint8Array(100));
    expect([1, 2, 3].map((k) => cache.peek(k) !== undefined)).toEqual([true, false, true]);
    cache.invalidate(3);
    cache.lookup(1);
    cache.put(4, new Uint8Array(100));
    cache.put(5, new Uint8Array(100));
    expect([1, 4, 5].map((k) => cache.peek(k) !== undefined)).toEqual([false, true, true]);
  });
});
