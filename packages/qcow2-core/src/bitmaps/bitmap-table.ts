/**
 * A persistent bitmap's table: one 64-bit entry per cluster of bitmap data. Bits 9-55 hold the
 * host offset of the data cluster; with offset 0, bit 0 tells whether that part of the bitmap is
 * all ones (1) or all zeros (0). Bits 1-8 and 56-63 are reserved
 * (BME_TABLE_ENTRY_RESERVED_MASK 0xff000000000001fe).
 *
 * Decoded, an entry is one number: {@link BITMAP_TABLE_ZEROS}, {@link BITMAP_TABLE_ONES}, or the
 * data cluster's host offset (cluster-aligned, so never 0 or 1).
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { hex, viewOf } from '../format/binary.js';

export const BME_TABLE_ENTRY_SIZE = 8;
/** An entry for a part of the bitmap that is all zeros (no data cluster). */
export const BITMAP_TABLE_ZEROS = 0;
/** An entry for a part of the bitmap that is all ones (no data cluster). */
export const BITMAP_TABLE_ONES = 1;
const RESERVED_HIGH = 0xff00_0000;
const RESERVED_LOW = 0x1fe;
const FLAG_ALL_ONES = 0x1;
const TWO_POW_32 = 0x1_0000_0000;

/**
 * Decodes `count` entries from `bytes` (read at host offset `tableOffset`), validating each as QEMU
 * does: no reserved bit, a data offset cluster-aligned, without the all-ones flag, and (here also)
 * inside a file of `fileSize` bytes.
 */
export function decodeBitmapTable(
  bytes: Uint8Array,
  count: number,
  clusterSize: number,
  fileSize: number,
  tableOffset: number,
): Float64Array {
  const view = viewOf(bytes);
  const entries = new Float64Array(count);
  for (let index = 0; index < count; index++) {
    const high = view.getUint32(index * 8);
    const low = view.getUint32(index * 8 + 4);
    const offset = (high & 0x00ff_ffff) * TWO_POW_32 + (low - (low & 0x1ff));
    const bad = (why: string): never => {
      throw new BlockDeviceError('ECORRUPT', `bitmap table: entry ${index} ${why}`, {
        offset: tableOffset + index * 8,
      });
    };
    if ((high & RESERVED_HIGH) !== 0 || (low & RESERVED_LOW) !== 0) bad('has reserved bits set');
    if (offset === 0) {
      entries[index] = (low & FLAG_ALL_ONES) !== 0 ? BITMAP_TABLE_ONES : BITMAP_TABLE_ZEROS;
      continue;
    }
    if ((low & FLAG_ALL_ONES) !== 0) bad('has both a data offset and the all-ones flag');
    if (offset % clusterSize !== 0) bad(`points at ${hex(offset)}, not cluster-aligned`);
    if (offset + clusterSize > fileSize) bad(`points at ${hex(offset)}, past the end of the file`);
    entries[index] = offset;
  }
  return entries;
}

/** Encodes `entries` (as {@link decodeBitmapTable} returns them) into `bytes`. */
export function encodeBitmapTable(entries: ArrayLike<number>, bytes: Uint8Array): void {
  const view = viewOf(bytes);
  for (let index = 0; index < entries.length; index++) {
    const entry = entries[index]!;
    view.setUint32(index * 8, Math.floor(entry / TWO_POW_32));
    view.setUint32(index * 8 + 4, entry % TWO_POW_32);
  }
}

/** Bytes a table of `count` entries takes, rounded up to whole clusters. */
export function bitmapTableBytes(count: number, clusterSize: number): number {
  return Math.ceil((count * BME_TABLE_ENTRY_SIZE) / clusterSize) * clusterSize;
}
