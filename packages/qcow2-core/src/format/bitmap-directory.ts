/**
 * The persistent dirty bitmap directory (pointed at by the bitmaps header extension). Entries:
 * bitmap_table_offset 0, bitmap_table_size 8, flags 12, type 16, granularity_bits 17,
 * name_size 18, extra_data_size 20, then extra data and the name, padded to 8 bytes.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { decodeText, readU64, viewOf } from './binary.js';

/** QEMU's caps (QCOW2_MAX_BITMAPS, QCOW2_MAX_BITMAP_DIRECTORY_SIZE). */
export const QCOW2_MAX_BITMAPS = 65535;
export const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;
export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
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
    });
    at = Math.ceil(end / 8) * 8;
  }
  return entries;
}
