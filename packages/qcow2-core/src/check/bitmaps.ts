/**
 * References held by persistent dirty bitmaps: the bitmap directory, each bitmap's table, and
 * each data cluster a table entry points at. Directory entries: bitmap_table_offset 0,
 * bitmap_table_size 8 (entries), flags 12, type 16, granularity_bits 17, name_size 18,
 * extra_data_size 20, then extra data and name, padded to 8 bytes.
 */
import type { BlockDevice, RequestOptions } from '@qcowkit/blockdev';
import {
  BME_MAX_GRANULARITY_BITS,
  BME_MAX_TABLE_SIZE,
  BME_MIN_GRANULARITY_BITS,
  BME_RESERVED_FLAGS,
  BT_DIRTY_TRACKING_BITMAP,
  QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
} from '../format/bitmap-directory.js';
import type { CheckLog } from './check-log.js';
import type { ComputedRefcounts } from './computed-refcounts.js';
import { entryOffset, TWO_POW_32 } from './entries.js';
import { readZeroPadded } from './read-padded.js';

const BME_ENTRY_FIXED_SIZE = 24;
/** BME_TABLE_ENTRY_RESERVED_MASK 0xff000000000001fe, and the all-ones flag (bit 0). */
const BME_RESERVED_HIGH = 0xff00_0000;
const BME_RESERVED_LOW = 0x1fe;
const BME_FLAG_ALL_ONES = 0x1;
/** Bitmap table bytes read at a time. */
const TABLE_CHUNK_BYTES = 1024 * 1024;

export async function countBitmapReferences(
  file: BlockDevice,
  bitmaps: { nbBitmaps: number; bitmapDirectoryOffset: number; bitmapDirectorySize: number },
  clusterSize: number,
  refcounts: ComputedRefcounts,
  log: CheckLog,
  request?: RequestOptions,
): Promise<void> {
  if (bitmaps.nbBitmaps === 0) return;
  refcounts.add(bitmaps.bitmapDirectoryOffset, bitmaps.bitmapDirectorySize);
  if (bitmaps.bitmapDirectorySize > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
    log.corruption('ERROR bitmap directory is too large');
    return;
  }
  const directory = await readZeroPadded(
    file,
    bitmaps.bitmapDirectoryOffset,
    bitmaps.bitmapDirectorySize,
    request,
  );
  const view = new DataView(directory.buffer, directory.byteOffset, directory.byteLength);
  let at = 0;
  for (let index = 0; index < bitmaps.nbBitmaps; index++) {
    if (at + BME_ENTRY_FIXED_SIZE > directory.length) {
      log.corruption('ERROR bitmap directory entry runs past the directory');
      return;
    }
    const tableHigh = view.getUint32(at);
    const tableOffset = (tableHigh & 0x00ff_ffff) * TWO_POW_32 + view.getUint32(at + 4);
    const tableSize = view.getUint32(at + 8);
    const flags = view.getUint32(at + 12);
    const type = view.getUint8(at + 16);
    const granularityBits = view.getUint8(at + 17);
    const nameSize = view.getUint16(at + 18);
    const extraSize = view.getUint32(at + 20);
    at = Math.ceil((at + BME_ENTRY_FIXED_SIZE + extraSize + nameSize) / 8) * 8;
    // Fields QEMU refuses to open an image over (`doesn't satisfy the constraints`): reported, and
    // the bitmap's clusters still counted.
    if ((flags & BME_RESERVED_FLAGS) !== 0) log.corruption(`ERROR bitmap ${index} has reserved flags set`);
    if (type !== BT_DIRTY_TRACKING_BITMAP) log.corruption(`ERROR bitmap ${index} has type ${type}`);
    if (granularityBits < BME_MIN_GRANULARITY_BITS || granularityBits > BME_MAX_GRANULARITY_BITS) {
      log.corruption(`ERROR bitmap ${index} has granularity bits ${granularityBits}`);
    }
    if (tableSize > BME_MAX_TABLE_SIZE || tableOffset % clusterSize !== 0) {
      log.corruption(`ERROR bitmap ${index} has an invalid bitmap table`);
      continue;
    }
    refcounts.add(tableOffset, tableSize * 8);
    const entriesPerChunk = TABLE_CHUNK_BYTES / 8;
    for (let first = 0; first < tableSize; first += entriesPerChunk) {
      const count = Math.min(entriesPerChunk, tableSize - first);
      const table = await readZeroPadded(file, tableOffset + first * 8, count * 8, request);
      const tableView = new DataView(table.buffer, table.byteOffset, table.byteLength);
      for (let i = 0; i < count; i++) {
        const high = tableView.getUint32(i * 8);
        const low = tableView.getUint32(i * 8 + 4);
        const hostOffset = entryOffset(high, low);
        const invalid =
          (high & BME_RESERVED_HIGH) !== 0 ||
          (low & BME_RESERVED_LOW) !== 0 ||
          (hostOffset !== 0 && ((low & BME_FLAG_ALL_ONES) !== 0 || hostOffset % clusterSize !== 0));
        if (invalid) {
          log.corruption(`ERROR bitmap ${index} table entry ${first + i} is invalid`);
          continue;
        }
        if (hostOffset !== 0) refcounts.add(hostOffset, clusterSize);
      }
    }
  }
}
