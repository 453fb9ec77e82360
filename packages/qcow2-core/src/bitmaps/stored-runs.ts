/**
 * A stored bitmap's runs of set bits, read one bitmap cluster at a time: what copying a bitmap into
 * another image needs (`qemu-img convert --bitmaps`), with memory bounded by the table and one
 * cluster whatever the guest size (readStoredBitmap holds every bit).
 */
import { BITMAP_TABLE_ONES, BITMAP_TABLE_ZEROS } from './bitmap-table.js';
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
  let start = -1;
  const at = (bit: number, set: boolean): void => {
    if (set && start < 0) start = bit;
    else if (!set && start >= 0) {
      onRun(start, bit);
      start = -1;
    }
  };
  for (let chunk = 0; chunk < needed; chunk++) {
    const chunkStart = chunk * chunkBits;
    const chunkEnd = Math.min(bitCount, chunkStart + chunkBits);
    const stored = table[chunk]!;
    if (stored === BITMAP_TABLE_ZEROS || stored === BITMAP_TABLE_ONES) {
      at(chunkStart, stored === BITMAP_TABLE_ONES);
      continue;
    }
    const bytes = await file.read(stored, clusterSize);
    const byteCount = Math.ceil((chunkEnd - chunkStart) / 8);
    for (let index = 0; index < byteCount; index++) {
      const byte = bytes[index]!;
      if ((byte === 0 && start < 0) || (byte === 0xff && start >= 0)) continue;
      const base = chunkStart + index * 8;
      for (let bit = 0; bit < 8 && base + bit < chunkEnd; bit++) at(base + bit, (byte & (1 << bit)) !== 0);
    }
  }
  if (start >= 0) onRun(start, bitCount);
  return { bitCount, granularity: entry.granularity };
}
