import { RangeLock, RunMap } from '@qcowkit/blockdev';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

describe('RunMap', () => {
  it('agrees with a plain array under random sets and clears', () => {
    const SPAN = 64;
    const step = fc.record({
      start: fc.integer({ min: 0, max: SPAN }),
      length: fc.integer({ min: 0, max: 20 }),
      value: fc.constantFrom<'a' | 'b' | undefined>('a', 'b', undefined),
    });
    fc.assert(
      fc.property(fc.array(step, { maxLength: 40 }), (steps) => {
        const map = new RunMap<'a' | 'b'>();
        const naive: ('a' | 'b' | undefined)[] = new Array(SPAN + 20).fill(undefined);
        for (const { start, length, value } of steps) {
          map.set(start, start + length, value);
          naive.fill(value, start, start + length);
        }
        for (let key = 0; key < naive.length; key++) expect(map.get(key)).toBe(naive[key]);
        // runs() covers the range exactly, in order, and neighbours differ (runs are merged).
        const runs = map.runs(3, SPAN);
        let position = 3;
        for (const [index, run] of runs.entries()) {
          expect(run.start).toBe(position);
          expect(run.end).toBeGreaterThan(run.start);
          for (let key = run.start; key < run.end; key++) expect(naive[key]).toBe(run.value);
          if (index > 0) expect(runs[index - 1]!.value).not.toBe(run.value);
          position = run.end;
        }
        expect(position).toBe(SPAN);
        const stored = map.entries();
        for (let index = 1; index < stored.length; index++) {
          const previous = stored[index - 1]!;
          expect(previous.end <= stored[index]!.start).toBe(true);
          if (previous.end === stored[index]!.start) expect(previous.value).not.toBe(stored[index]!.value);
        }
      }),
      { numRuns: 200 },
    );
  });

  it('stores a huge range as one run', () => {
    const map = new RunMap<number>();
    map.set(0, 2 ** 40, 1);
    map.set(5, 6, 2);
    expect(map.runCount).toBe(3);
    expect(map.get(2 ** 40 - 1)).toBe(1);
    expect(map.get(2 ** 40)).toBeUndefined();
  });
});

describe('RangeLock', () => {
  it('runs overlapping holders one at a time, in arrival order, and disjoint ones together', async () => {
    const lock = new RangeLock();
    const events: string[] = [];
    const hold = (name: string, start: number, end: number, ticks: number) =>
      lock.with(start, end, async () => {
        events.push(`${name}+`);
        for (let tick = 0; tick < ticks; tick++) await Promise.resolve();
        events.push(`${name}-`);
      });
    await Promise.all([hold('a', 0, 10, 5), hold('b', 5, 15, 1), hold('c', 20, 30, 1), hold('d', 9, 21, 1)]);
    // c does not wait for a; b waits for a; d waits for b (arrived earlier, overlapping) and c.
    expect(events.indexOf('c+')).toBeLessThan(events.indexOf('a-'));
    expect(events.indexOf('b+')).toBeGreaterThan(events.indexOf('a-'));
    expect(events.indexOf('d+')).toBeGreaterThan(events.indexOf('b-'));
    expect(events.indexOf('d+')).toBeGreaterThan(events.indexOf('c-'));
    expect(lock.pending).toBe(0);
  });
});
