/**
 * The persistent dirty bitmaps a qcow2 image lists, as `qemu-img info` shows them (name,
 * granularity, flags). Only the bitmap directory is read, never the bitmaps.
 *
 * This decodes a piece of the qcow2 format, which belongs in qcow2-core's `format/`; it lives here
 * until the engine exposes the bitmap directory, and should move there then.
 *
 * Directory entry (qcow2 spec): bitmap_table_offset u64 at 0, bitmap_table_size u32 at 8, flags
 * u32 at 12 (bit 0 in_use, bit 1 auto), type u8 at 16, granularity_bits u8 at 17, name_size u16
 * at 18, extra_data_size u32 at 20, then the extra data and the name, padded to 8 bytes.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { QCOW2_AUTOCLEAR_BITMAPS, type Qcow2Header } from '@qcowkit/qcow2-core';

export interface BitmapInfo {
  readonly name: string;
  readonly granularity: number;
  /** `in-use` and `auto`, in QEMU's order. */
  readonly flags: readonly string[];
}

/** QEMU's caps on the bitmap directory. */
const BME_MAX_DIRECTORY_SIZE = 64 * 1024 * 1024;
const BME_MAX_BITMAPS = 65535;
const BME_MAX_NAME_SIZE = 1023;
const BME_MAX_GRANULARITY_BITS = 31;
const BME_MIN_GRANULARITY_BITS = 9;
const BME_ENTRY_FIXED_SIZE = 24;
const BME_FLAG_IN_USE = 1 << 0;
const BME_FLAG_AUTO = 1 << 1;

/**
 * The bitmaps of the image whose header is `header`, read from `file`. An image without the
 * extension, or whose bitmaps were invalidated (the autoclear bit cleared by a program that does not
 * know bitmaps), has none, as in QEMU.
 */
export async function readBitmapList(file: BlockDevice, header: Qcow2Header): Promise<BitmapInfo[]> {
  const extension = header.extensions.bitmaps;
  if (extension === undefined || extension.nbBitmaps === 0) return [];
  if ((header.autoclearFeatures.low & QCOW2_AUTOCLEAR_BITMAPS) === 0) return [];
  const { nbBitmaps, bitmapDirectoryOffset, bitmapDirectorySize } = extension;
  if (nbBitmaps > BME_MAX_BITMAPS) corrupt(`${nbBitmaps} bitmaps is more than ${BME_MAX_BITMAPS}`, 0);
  if (
    bitmapDirectorySize > BME_MAX_DIRECTORY_SIZE ||
    bitmapDirectorySize < nbBitmaps * BME_ENTRY_FIXED_SIZE
  ) {
    corrupt(`directory size ${bitmapDirectorySize} is invalid`, bitmapDirectoryOffset);
  }
  if (bitmapDirectoryOffset + bitmapDirectorySize > file.size) {
    corrupt('directory ends past the end of the file', bitmapDirectoryOffset);
  }
  const directory = await file.read(bitmapDirectoryOffset, bitmapDirectorySize);
  const view = new DataView(directory.buffer, directory.byteOffset, directory.byteLength);
  const decoder = new TextDecoder('utf-8', { fatal: false });
  const bitmaps: BitmapInfo[] = [];
  let at = 0;
  for (let index = 0; index < nbBitmaps; index++) {
    if (at + BME_ENTRY_FIXED_SIZE > directory.length) {
      corrupt(`entry ${index} runs past the directory`, bitmapDirectoryOffset + at);
    }
    const flags = view.getUint32(at + 12);
    const granularityBits = view.getUint8(at + 17);
    const nameSize = view.getUint16(at + 18);
    const extraDataSize = view.getUint32(at + 20);
    const nameStart = at + BME_ENTRY_FIXED_SIZE + extraDataSize;
    if (nameSize > BME_MAX_NAME_SIZE || nameStart + nameSize > directory.length) {
      corrupt(`entry ${index} has an invalid name`, bitmapDirectoryOffset + at);
    }
    if (granularityBits < BME_MIN_GRANULARITY_BITS || granularityBits > BME_MAX_GRANULARITY_BITS) {
      corrupt(`entry ${index} has granularity bits ${granularityBits}`, bitmapDirectoryOffset + at);
    }
    const names: string[] = [];
    if ((flags & BME_FLAG_IN_USE) !== 0) names.push('in-use');
    if ((flags & BME_FLAG_AUTO) !== 0) names.push('auto');
    bitmaps.push({
      name: decoder.decode(directory.subarray(nameStart, nameStart + nameSize)),
      granularity: 2 ** granularityBits,
      flags: names,
    });
    at = Math.ceil((nameStart + nameSize) / 8) * 8;
  }
  return bitmaps;
}

function corrupt(message: string, offset: number): never {
  throw new BlockDeviceError('ECORRUPT', `qcow2 bitmap directory: ${message}`, { offset });
}

/** Bytes of one bitmap table entry. */
const BME_TABLE_ENTRY_SIZE = 8;

function roundUp(value: number, multiple: number): number {
  return Math.ceil(value / multiple) * multiple;
}

/**
 * The space `bitmaps` take in a new qcow2 image of `clusterSize` clusters for a guest of
 * `guestSize` bytes, as qemu-img measure's `bitmaps size` counts it: every bitmap's data fully
 * allocated, its bitmap table (clusters), and the directory (clusters).
 */
export function persistentBitmapsSize(
  bitmaps: readonly BitmapInfo[],
  guestSize: number,
  clusterSize: number,
): number {
  const encoder = new TextEncoder();
  let total = 0;
  let directoryBytes = 0;
  for (const bitmap of bitmaps) {
    const bits = Math.ceil(guestSize / bitmap.granularity);
    const clusters = Math.ceil(Math.ceil(bits / 8) / clusterSize);
    total += clusters * clusterSize;
    total += roundUp(clusters * BME_TABLE_ENTRY_SIZE, clusterSize);
    directoryBytes += roundUp(BME_ENTRY_FIXED_SIZE + encoder.encode(bitmap.name).length, 8);
  }
  return total + roundUp(directoryBytes, clusterSize);
}
