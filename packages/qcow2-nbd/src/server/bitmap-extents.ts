/**
 * Runs of a dirty bitmap held as bits: bit `i` (byte `i >> 3`, bit `i & 7`, least significant first,
 * as qcow2 stores it) covers guest bytes `[i * granularity, (i + 1) * granularity)`. Whole clear or
 * whole set bytes are skipped a byte at a time.
 */
import type { DirtyExtent } from './export.js';

export interface BitmapWindow {
  readonly bits: Uint8Array;
  /** The bitmap bit that `bits`' first bit is (a window into a larger bitmap). Default 0. */
  readonly firstBit?: number;
  /** Bits in `bits` that belong to the bitmap (from firstBit). */
  readonly bitCount: number;
  readonly granularity: number;
}

/**
 * The runs over guest range `[offset, end)`, at most `limit` of them; they stop early where the
 * window's bits end.
 */
export function bitmapExtents(
  window: BitmapWindow,
  offset: number,
  end: number,
  limit: number,
): DirtyExtent[] {
  const { bits, granularity } = window;
  const firstBit = window.firstBit ?? 0;
  const windowEnd = firstBit + window.bitCount;
  const out: DirtyExtent[] = [];
  let position = offset;
  while (position < end && out.length < limit) {
    const bit = Math.floor(position / granularity);
    if (bit < firstBit || bit >= windowEnd) break;
    const dirty = testBit(bits, bit - firstBit);
    const next = firstBit + nextDifferent(bits, bit - firstBit + 1, windowEnd - firstBit, dirty);
    const runEnd = Math.min(end, next * granularity);
    out.push({ length: runEnd - position, dirty });
    position = runEnd;
  }
  return out;
}

function testBit(bits: Uint8Array, index: number): boolean {
  return (bits[index >> 3]! & (1 << (index & 7))) !== 0;
}

/** The first index in `[from, count)` whose bit is not `dirty`, or `count`. */
function nextDifferent(bits: Uint8Array, from: number, count: number, dirty: boolean): number {
  const same = dirty ? 0xff : 0;
  let index = from;
  while (index < count) {
    if ((index & 7) === 0 && index + 8 <= count && bits[index >> 3] === same) {
      index += 8;
      continue;
    }
    if (testBit(bits, index) !== dirty) return index;
    index++;
  }
  return count;
}
