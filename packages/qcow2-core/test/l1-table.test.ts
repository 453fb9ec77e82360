/**
 * decodeL1Table skips runs of empty entries a chunk at a time; whatever the table holds and
 * wherever its bytes sit in their buffer (aligned or not), it must give what an entry-by-entry
 * decode gives.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { decodeL1Table } from '../src/format/l1-entry.js';

function naive(bytes: Uint8Array, count: number): { high: number[]; low: number[] } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const high: number[] = [];
  const low: number[] = [];
  for (let index = 0; index < count; index++) {
    high.push(view.getUint32(index * 8));
    low.push(view.getUint32(index * 8 + 4));
  }
  return { high, low };
}

describe('decodeL1Table', () => {
  it('matches an entry-by-entry decode for sparse tables, aligned or not', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 9000 }),
        fc.array(fc.tuple(fc.nat(), fc.nat(7), fc.integer({ min: 1, max: 255 })), { maxLength: 12 }),
        fc.integer({ min: 0, max: 7 }),
        (count, bytesSet, shift) => {
          const backing = new Uint8Array(count * 8 + shift);
          const bytes = backing.subarray(shift);
          for (const [entry, byte, value] of bytesSet) {
            if (count > 0) bytes[(entry % count) * 8 + byte] = value;
          }
          const decoded = decodeL1Table(bytes, count);
          const expected = naive(bytes, count);
          expect(Array.from(decoded.high)).toEqual(expected.high);
          expect(Array.from(decoded.low)).toEqual(expected.low);
        },
      ),
      { numRuns: 150 },
    );
  });

  it('finds a lone entry at either end of a zero chunk and a lone COPIED bit', () => {
    const count = 4096 + 3;
    const bytes = new Uint8Array(count * 8);
    const view = new DataView(bytes.buffer);
    view.setUint32(2047 * 8 + 4, 0x30000);
    view.setUint32(2048 * 8, 0x80000000);
    view.setUint32((count - 1) * 8 + 4, 0x50000);
    const { high, low } = decodeL1Table(bytes, count);
    expect([low[2047], high[2048], low[count - 1]]).toEqual([0x30000, 0x80000000, 0x50000]);
    expect(high.reduce((sum, word) => sum + word, 0)).toBe(0x80000000);
    expect(low.reduce((sum, word) => sum + word, 0)).toBe(0x30000 + 0x50000);
  });
});
