/**
 * The mapper's fast scan of standard L2 entries (unallocated runs, host-contiguous data runs)
 * against a reference that classifies every cluster on its own, over random tables.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { TableCache } from '../src/cache/table-cache.js';
import { classifyL2Entry, l2EntryHostOffset } from '../src/format/l2-entry.js';
import { LOOKUP_GENERAL, LOOKUP_UNALLOCATED, LOOKUP_ZERO, Qcow2Mapper } from '../src/mapping/qcow2-mapper.js';
import { pushSegment, type Segment } from '../src/mapping/segment.js';

const CLUSTER_BITS = 9;
const CLUSTER = 1 << CLUSTER_BITS;
const ENTRIES = CLUSTER / 8;
const L1_ENTRIES = 4;
const BYTES_PER_L1 = ENTRIES * CLUSTER;
const FILE_SIZE = 1 << 30;

/** An L2 entry: unallocated, data (next to the previous data or elsewhere), zero, compressed. */
const entryArbitrary = fc.oneof(
  { weight: 4, arbitrary: fc.constant({ kind: 'unallocated' as const }) },
  { weight: 6, arbitrary: fc.constant({ kind: 'next' as const }) },
  { weight: 2, arbitrary: fc.integer({ min: 1, max: 1000 }).map((c) => ({ kind: 'jump' as const, c })) },
  { weight: 1, arbitrary: fc.constant({ kind: 'zero' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'compressed' as const }) },
);

function buildTables(entries: readonly { kind: string; c?: number }[], copied: boolean) {
  const bytes = new Uint8Array(L1_ENTRIES * CLUSTER);
  const view = new DataView(bytes.buffer);
  let host = 4096 * CLUSTER;
  entries.forEach((entry, index) => {
    const at = index * 8;
    switch (entry.kind) {
      case 'unallocated':
        return;
      case 'next':
      case 'jump': {
        if (entry.kind === 'jump') host += entry.c! * CLUSTER;
        view.setUint32(at, Math.floor(host / 2 ** 32) | (copied ? 0x80000000 : 0));
        view.setUint32(at + 4, host >>> 0);
        host += CLUSTER;
        return;
      }
      case 'zero':
        view.setUint32(at + 4, 1);
        return;
      case 'compressed':
        view.setUint32(at, 0x40000000);
        view.setUint32(at + 4, 0x10000 + index * 64);
        return;
      case 'reserved-high':
        view.setUint32(at, 0x01000000);
        view.setUint32(at + 4, host);
        return;
      case 'zero-alloc':
        view.setUint32(at + 4, host | 1);
        return;
      case 'reserved-low':
        view.setUint32(at + 4, host | 0x2);
        return;
    }
  });
  return bytes;
}

/** Entries the general path rejects as corrupt, beside the ordinary ones. */
const entryOrDamageArbitrary = fc.oneof(
  { weight: 12, arbitrary: entryArbitrary },
  { weight: 1, arbitrary: fc.constant({ kind: 'zero-alloc' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'reserved-high' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'reserved-low' as const }) },
);

/** One segment per cluster through the general classification, merged as the mapper merges. */
function reference(tables: Uint8Array, guestOffset: number, length: number): Segment[] {
  const view = new DataView(tables.buffer);
  const segments: Segment[] = [];
  for (let position = guestOffset; position < guestOffset + length; ) {
    const cluster = Math.floor(position / CLUSTER);
    const clusterEnd = Math.min(guestOffset + length, (cluster + 1) * CLUSTER);
    const high = view.getUint32(cluster * 8);
    const low = view.getUint32(cluster * 8 + 4);
    const type = classifyL2Entry(high, low, false, false);
    const inCluster = position - cluster * CLUSTER;
    if (type === 'normal') {
      pushSegment(
        segments,
        'data',
        position,
        clusterEnd - position,
        l2EntryHostOffset(high, low) + inCluster,
      );
    } else if (type === 'unallocated') {
      pushSegment(segments, 'unallocated', position, clusterEnd - position, -1);
    } else if (type === 'zero-plain') {
      pushSegment(segments, 'zero', position, clusterEnd - position, -1);
    } else {
      segments.push({
        guestOffset: position,
        length: clusterEnd - position,
        kind: 'compressed',
        hostOffset: -1,
      });
    }
    position = clusterEnd;
  }
  return segments;
}

function mapperOver(
  tables: Uint8Array,
  l1Present: readonly boolean[],
  readAhead = false,
  cacheBytes = 1 << 20,
  reads: number[] = [],
  concurrency = { now: 0, most: 0 },
) {
  const l1High = new Uint32Array(L1_ENTRIES);
  const l1Low = new Uint32Array(L1_ENTRIES);
  const l2Base = 1024 * CLUSTER;
  l1Present.forEach((present, index) => {
    if (present) l1Low[index] = l2Base + index * CLUSTER;
  });
  return new Qcow2Mapper({
    readMetadata: async (hostOffset, length) => {
      reads.push(hostOffset);
      concurrency.now++;
      concurrency.most = Math.max(concurrency.most, concurrency.now);
      await new Promise((resolve) => setTimeout(resolve, 1));
      concurrency.now--;
      const start = hostOffset - l2Base;
      return tables.slice(start, start + length);
    },
    fileSize: FILE_SIZE,
    l1High,
    l1Low,
    clusterBits: CLUSTER_BITS,
    extendedL2: false,
    hasDataFile: false,
    cache: new TableCache<DataView>(cacheBytes),
    sliceBytes: CLUSTER / 2,
    readAhead,
  });
}

/** The parts of segments the comparison looks at (compressed descriptors are checked elsewhere). */
const shape = (segments: readonly Segment[]) =>
  segments.map(({ guestOffset, length, kind, hostOffset }) => ({ guestOffset, length, kind, hostOffset }));

describe('Qcow2Mapper runs of standard L2 entries', () => {
  it('match a cluster-by-cluster classification', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(entryArbitrary, { minLength: L1_ENTRIES * ENTRIES, maxLength: L1_ENTRIES * ENTRIES }),
        fc.array(fc.boolean(), { minLength: L1_ENTRIES, maxLength: L1_ENTRIES }),
        fc.boolean(),
        fc.integer({ min: 0, max: L1_ENTRIES * BYTES_PER_L1 - 1 }),
        fc.integer({ min: 1, max: L1_ENTRIES * BYTES_PER_L1 }),
        fc.boolean(),
        fc.constantFrom(CLUSTER / 2, 2 * CLUSTER, 1 << 20),
        async (entries, l1Present, copied, start, wanted, readAhead, cacheBytes) => {
          const length = Math.min(wanted, L1_ENTRIES * BYTES_PER_L1 - start);
          const tables = buildTables(entries, copied);
          // An absent L1 entry reads as a table of unallocated entries.
          l1Present.forEach((present, index) => {
            if (!present) tables.fill(0, index * CLUSTER, (index + 1) * CLUSTER);
          });
          const segments = await mapperOver(tables, l1Present, readAhead, cacheBytes).map(start, length);
          expect(shape(segments)).toEqual(shape(reference(tables, start, length)));
        },
      ),
      { numRuns: 200 },
    );
  });

  it('stop after maxEntries entries with a prefix of the same segments', async () => {
    const tables = buildTables(
      Array.from({ length: L1_ENTRIES * ENTRIES }, (_, index) => ({
        kind: index % 50 < 30 ? 'next' : 'unallocated',
      })),
      false,
    );
    const mapper = mapperOver(tables, [true, true, true, true]);
    const segments = await mapper.map(100, L1_ENTRIES * BYTES_PER_L1 - 100, 40);
    const end = segments.at(-1)!.guestOffset + segments.at(-1)!.length;
    expect(end).toBe(40 * CLUSTER);
    expect(shape(segments)).toEqual(shape(reference(tables, 100, end - 100)));
  });

  it('read ahead loads the slices of a long lookup, each once, and stops at a bad L1 entry', async () => {
    const tables = buildTables(
      Array.from({ length: L1_ENTRIES * ENTRIES }, () => ({ kind: 'next' })),
      false,
    );
    const reads: number[] = [];
    const concurrency = { now: 0, most: 0 };
    const mapper = mapperOver(tables, [true, true, false, true], true, 1 << 20, reads, concurrency);
    await mapper.map(0, L1_ENTRIES * BYTES_PER_L1);
    // Two slices per table, three tables; the absent one is skipped; all loading at once.
    expect(reads.length).toBe(6);
    expect(new Set(reads).size).toBe(6);
    expect(concurrency.most).toBe(6);

    // A corrupt L1 entry past where a lookup stops is not reported by it.
    const damaged = mapperOver(tables, [true, true, true, true], true);
    damaged.l1.low[2] = 1024 * CLUSTER + 3;
    const segments = await damaged.map(0, L1_ENTRIES * BYTES_PER_L1, ENTRIES);
    expect(segments.at(-1)!.guestOffset + segments.at(-1)!.length).toBe(BYTES_PER_L1);
    await expect(damaged.map(0, L1_ENTRIES * BYTES_PER_L1)).rejects.toMatchObject({ code: 'ECORRUPT' });
  });

  it('lookupCached answers only what map answers, for one cluster known without waiting', async () => {
    const answered = { data: 0, zero: 0, unallocated: 0 };
    await fc.assert(
      fc.asyncProperty(
        fc.array(entryOrDamageArbitrary, {
          minLength: L1_ENTRIES * ENTRIES,
          maxLength: L1_ENTRIES * ENTRIES,
        }),
        fc.array(fc.boolean(), { minLength: L1_ENTRIES, maxLength: L1_ENTRIES }),
        fc.boolean(),
        fc.integer({ min: 0, max: L1_ENTRIES * BYTES_PER_L1 - 1 }),
        fc.integer({ min: 1, max: 2 * CLUSTER }),
        async (entries, l1Present, copied, start, wanted) => {
          const length = Math.min(wanted, L1_ENTRIES * BYTES_PER_L1 - start);
          const mapper = mapperOver(buildTables(entries, copied), l1Present);
          // Nothing cached yet: only a cluster without an L2 table is known.
          const before = mapper.lookupCached(start, length);
          // map loads the slice (and keeps it even when it reports an entry as corrupt).
          const mapped = await mapper.map(start, length).catch((error: unknown) => error);
          const fast = mapper.lookupCached(start, length);
          if (!Array.isArray(mapped)) {
            expect(mapped).toMatchObject({ code: 'ECORRUPT' });
            expect(fast).toBe(LOOKUP_GENERAL);
            expect(before).toBe(LOOKUP_GENERAL);
            return;
          }
          const oneCluster = (start % CLUSTER) + length <= CLUSTER;
          const only: Segment | undefined = mapped.length === 1 && oneCluster ? mapped[0] : undefined;
          let expected = LOOKUP_GENERAL;
          if (only?.kind === 'data') expected = only.hostOffset;
          else if (only?.kind === 'zero') expected = LOOKUP_ZERO;
          else if (only?.kind === 'unallocated') expected = LOOKUP_UNALLOCATED;
          expect(fast).toBe(expected);
          if (only?.kind === 'data' || only?.kind === 'zero' || only?.kind === 'unallocated')
            answered[only.kind]++;
          const l1Absent = !l1Present[Math.floor(start / BYTES_PER_L1)];
          expect(before).toBe(l1Absent && oneCluster ? LOOKUP_UNALLOCATED : LOOKUP_GENERAL);
        },
      ),
      // 400 runs met about 12 zero answers on average, and 5 or fewer about once in a hundred CI
      // runs (seen once): 1000 keep the coverage check below far from chance.
      { numRuns: 1000 },
    );
    // The property above met each kind of answer often enough to mean something.
    expect(answered.data).toBeGreaterThan(20);
    expect(answered.zero).toBeGreaterThan(5);
    expect(answered.unallocated).toBeGreaterThan(20);
  });
});
