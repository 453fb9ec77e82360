/**
 * Reads a persistent bitmap's bits as stored (what an incremental backup tool needs, and the test
 * oracle's view of a bitmap QEMU wrote). The result holds every bit, so it costs
 * ceil(guest size / granularity / 8) bytes: QEMU caps that at 512 MiB (BME_MAX_PHYS_SIZE).
 */
import { BITMAP_TABLE_ONES, BITMAP_TABLE_ZEROS } from './bitmap-table.js';
import { SetBitRuns } from './set-bit-runs.js';
import { readStoredTable, type StoredBitmapImage } from './stored-table.js';

export interface StoredBitmap {
  /** Bit `i` (byte `i >> 3`, bit `i & 7`) covers guest bytes `[i * granularity, (i + 1) * granularity)`. */
  readonly bits: Uint8Array;
  readonly bitCount: number;
  readonly granularity: number;
}

/**
 * The bits of bitmap `name` of an image (its `file`, guest `size` and `bitmapDirectory`, as a
 * Qcow2Image exposes them). A bitmap marked in use is inconsistent: reading it is refused (EINVAL),
 * as QEMU refuses to use it (see readStoredTable).
 */
export async function readStoredBitmap(image: StoredBitmapImage, name: string): Promise<StoredBitmap> {
  const { file, clusterSize } = image;
  const { entry, bitCount, table } = await readStoredTable(image, name);
  const byteCount = Math.ceil(bitCount / 8);
  const needed = Math.ceil(byteCount / clusterSize);
  const bits = new Uint8Array(byteCount);
  for (let chunk = 0; chunk < needed; chunk++) {
    const at = chunk * clusterSize;
    const length = Math.min(clusterSize, byteCount - at);
    const stored = table[chunk]!;
    if (stored === BITMAP_TABLE_ZEROS) continue;
    if (stored === BITMAP_TABLE_ONES) bits.fill(0xff, at, at + length);
    else bits.set((await file.read(stored, clusterSize)).subarray(0, length), at);
  }
  // Bits past the guest's end are not part of the bitmap.
  if (bitCount % 8 !== 0) bits[byteCount - 1]! &= (1 << (bitCount % 8)) - 1;
  return { bits, bitCount, granularity: entry.granularity };
}

/** The guest ranges `[offset, offset + length)` whose bits are set, merged, in order. */
export function dirtyRanges(bitmap: StoredBitmap, guestSize: number): { offset: number; length: number }[] {
  const { bits, bitCount, granularity } = bitmap;
  const ranges: { offset: number; length: number }[] = [];
  const runs = new SetBitRuns((firstBit, endBit) => {
    const offset = firstBit * granularity;
    ranges.push({ offset, length: Math.min(guestSize, endBit * granularity) - offset });
  });
  runs.scan(bits, 0, bitCount);
  runs.end(bitCount);
  return ranges;
}
