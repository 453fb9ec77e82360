/**
 * A stored bitmap's runs of set bits, read one bitmap cluster at a time: what copying a bitmap into
 * another image needs (`qemu-img convert --bitmaps`), with memory bounded by the table and one
 * cluster whatever the guest size (readStoredBitmap holds every bit).
 */
import { BITMAP_TABLE_ONES, BITMAP_TABLE_ZEROS } from './bitmap-table.js';
import { SetBitRuns } from './set-bit-runs.js';
import { readStoredTable, type StoredBitmapImage } from './stored-table.js';

/**
 * Calls `onRun(firstBit, endBit)` for every run of set bits of stored bitmap `name`, in order,
 * merged across bitmap clusters. A bitmap in use (inconsistent) is refused (EINVAL), as by
 * readStoredBitmap.
 */
export async function forEachStoredRun(
  image: StoredBitmapImage,
  name: string,
  onRun: (firstBit: number, endBit: number) => void,
): Promise<{ bitCount: number; granularity: number }> {
  const { file, clusterSize } = image;
  const { entry, bitCount, table } = await readStoredTable(image, name);
  const chunkBits = clusterSize * 8;
  const needed = Math.ceil(bitCount / chunkBits);
  const runs = new SetBitRuns(onRun);
  for (let chunk = 0; chunk < needed; chunk++) {
    const chunkStart = chunk * chunkBits;
    const stored = table[chunk]!;
    if (stored === BITMAP_TABLE_ZEROS || stored === BITMAP_TABLE_ONES) {
      runs.uniform(chunkStart, stored === BITMAP_TABLE_ONES);
      continue;
    }
    runs.scan(await file.read(stored, clusterSize), chunkStart, Math.min(bitCount, chunkStart + chunkBits));
  }
  runs.end(bitCount);
  return { bitCount, granularity: entry.granularity };
}
