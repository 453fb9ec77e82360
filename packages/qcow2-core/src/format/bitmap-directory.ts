/**
 * The persistent dirty bitmap directory (pointed at by the bitmaps header extension). Entries:
 * bitmap_table_offset 0, bitmap_table_size 8, flags 12, type 16, granularity_bits 17,
 * name_size 18, extra_data_size 20, then extra data and the name, padded to 8 bytes.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { decodeText, encodeText, readU64, viewOf, writeU64 } from './binary.js';

/** QEMU's caps (QCOW2_MAX_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE). */
export const QCOW2_MAX_BITMAPS = 65535;
export const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;
export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
/** Flag bits the spec reserves (must be zero). */
export const BME_RESERVED_FLAGS = 0xffff_fffc;
/** The only bitmap type: a dirty tracking bitmap. */
export const BT_DIRTY_TRACKING_BITMAP = 1;
/** QEMU's caps on one bitmap: table entries, bytes of bitmap data, granularity, name. */
export const BME_MAX_TABLE_SIZE = 0x800_0000;
export const BME_MAX_PHYS_SIZE = 0x2000_0000;
export const BME_MAX_GRANULARITY_BITS = 31;
export const BME_MIN_GRANULARITY_BITS = 9;
export const BME_MAX_NAME_SIZE = 1023;
const BME_FIXED_SIZE = 24;

export interface Qcow2BitmapEntry {
  readonly name: string;
  readonly tableOffset: number;
  readonly tableSize: number;
  readonly flags: number;
  readonly type: number;
  readonly granularityBits: number;
  /** 1 << granularityBits. */
  readonly granularity: number;
  readonly inUse: boolean;
  readonly auto: boolean;
  /** Bytes of extra data (QEMU writes none and refuses entries with some). */
  readonly extraDataSize: number;
}

/** Decodes `count` directory entries from `bytes` (the directory, read from `directoryOffset`). */
export function decodeBitmapDirectory(
  bytes: Uint8Array,
  count: number,
  directoryOffset = 0,
): Qcow2BitmapEntry[] {
  const view = viewOf(bytes);
  const entries: Qcow2BitmapEntry[] = [];
  let at = 0;
  for (let index = 0; index < count; index++) {
    const where = directoryOffset + at;
    if (at + BME_FIXED_SIZE > bytes.length) {
      throw new BlockDeviceError('ECORRUPT', `bitmap directory: entry ${index} runs past the directory`, {
        offset: where,
      });
    }
    const nameSize = view.getUint16(at + 18);
    const extraSize = view.getUint32(at + 20);
    const end = at + BME_FIXED_SIZE + extraSize + nameSize;
    if (end > bytes.length) {
      throw new BlockDeviceError('ECORRUPT', `bitmap directory: entry ${index} runs past the directory`, {
        offset: where,
      });
    }
    const flags = view.getUint32(at + 12);
    const granularityBits = bytes[at + 17]!;
    const nameStart = at + BME_FIXED_SIZE + extraSize;
    entries.push({
      name: decodeText(bytes.subarray(nameStart, nameStart + nameSize)),
      tableOffset: readU64(view, at, `bitmap ${index}: table offset`, where),
      tableSize: view.getUint32(at + 8),
      flags,
      type: bytes[at + 16]!,
      granularityBits,
      granularity: 2 ** granularityBits,
      inUse: (flags & BME_FLAG_IN_USE) !== 0,
      auto: (flags & BME_FLAG_AUTO) !== 0,
      extraDataSize: extraSize,
    });
    at = Math.ceil(end / 8) * 8;
  }
  return entries;
}

/** What {@link encodeBitmapDirectory} needs of an entry (no extra data is written). */
export interface Qcow2BitmapEntryFields {
  readonly name: string;
  readonly tableOffset: number;
  readonly tableSize: number;
  readonly flags: number;
  readonly granularityBits: number;
}

/** Bytes of the directory entry of a bitmap named `name` (no extra data), padded to 8. */
export function bitmapEntrySize(name: string): number {
  return Math.ceil((BME_FIXED_SIZE + encodeText(name).length) / 8) * 8;
}

/** Bytes a directory of `entries` takes. */
export function bitmapDirectorySize(entries: readonly { name: string }[]): number {
  let size = 0;
  for (const entry of entries) size += bitmapEntrySize(entry.name);
  return size;
}

/** Encodes a bitmap directory (type 1, no extra data; the padding is zeros). */
export function encodeBitmapDirectory(entries: readonly Qcow2BitmapEntryFields[]): Uint8Array {
  const bytes = new Uint8Array(bitmapDirectorySize(entries));
  const view = viewOf(bytes);
  let at = 0;
  for (const entry of entries) {
    const name = encodeText(entry.name);
    writeU64(view, at, entry.tableOffset);
    view.setUint32(at + 8, entry.tableSize);
    view.setUint32(at + 12, entry.flags >>> 0);
    bytes[at + 16] = BT_DIRTY_TRACKING_BITMAP;
    bytes[at + 17] = entry.granularityBits;
    view.setUint16(at + 18, name.length);
    view.setUint32(at + 20, 0);
    bytes.set(name, at + BME_FIXED_SIZE);
    at += Math.ceil((BME_FIXED_SIZE + name.length) / 8) * 8;
  }
  return bytes;
}

/** Bitmap table entries a bitmap of `granularity` over `guestSize` bytes needs in `clusterSize` clusters. */
export function bitmapTableSize(guestSize: number, granularity: number, clusterSize: number): number {
  const bits = Math.ceil(guestSize / granularity);
  return Math.ceil(Math.ceil(bits / 8) / clusterSize);
}

/**
 * Why `entry` breaks the spec's or QEMU's constraints for an image of `clusterSize` clusters and
 * `guestSize` bytes (QEMU refuses to open such an image), or undefined when it is valid. A bitmap
 * marked in use may have a table too small for the guest (it was not stored after a resize).
 */
export function bitmapEntryProblem(
  entry: Qcow2BitmapEntry,
  clusterSize: number,
  guestSize: number,
): string | undefined {
  if (entry.tableSize === 0 || entry.tableOffset === 0) return 'it has no bitmap table';
  if (entry.tableOffset % clusterSize !== 0) return 'its bitmap table is not cluster-aligned';
  if (entry.tableSize > BME_MAX_TABLE_SIZE) return `its table of ${entry.tableSize} entries is too large`;
  if (entry.granularityBits < BME_MIN_GRANULARITY_BITS || entry.granularityBits > BME_MAX_GRANULARITY_BITS) {
    return `granularity bits ${entry.granularityBits} are outside ${BME_MIN_GRANULARITY_BITS}..${BME_MAX_GRANULARITY_BITS}`;
  }
  if ((entry.flags & BME_RESERVED_FLAGS) !== 0) return 'reserved flags are set';
  if (entry.type !== BT_DIRTY_TRACKING_BITMAP) return `type ${entry.type} is not a dirty tracking bitmap`;
  if (encodeText(entry.name).length > BME_MAX_NAME_SIZE) return 'its name is too long';
  if (entry.tableSize * clusterSize > BME_MAX_PHYS_SIZE) return 'its data would be larger than 512 MiB';
  if (!entry.inUse && guestSize > entry.tableSize * clusterSize * 8 * entry.granularity) {
    return 'its bitmap table is too small for the image';
  }
  return undefined;
}
