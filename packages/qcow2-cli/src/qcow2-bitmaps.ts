/**
 * The persistent dirty bitmaps a qcow2 image lists, as `qemu-img info` shows them (name,
 * granularity, flags), and the room they take in a new image, as `qemu-img measure` counts it. The
 * directory is read and decoded by qcow2-core (an open `Qcow2Image` holds it); never the bitmaps.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import {
  BME_MAX_GRANULARITY_BITS,
  BME_MAX_NAME_SIZE,
  BME_MIN_GRANULARITY_BITS,
  bitmapDirectorySize,
  bitmapTableBytes,
  bitmapTableSize,
  encodeText,
  type Qcow2BitmapEntry,
  type Qcow2Header,
  readBitmapDirectory,
} from '@qcowkit/qcow2-core';

export interface BitmapInfo {
  readonly name: string;
  readonly granularity: number;
  /** `in-use` and `auto`, in QEMU's order. */
  readonly flags: readonly string[];
}

/**
 * The bitmaps of the image whose header is `header`, read from `file`. An image without the
 * extension, or whose bitmaps were invalidated (the autoclear bit cleared by a program that does not
 * know bitmaps), has none, as in QEMU.
 */
export async function readBitmapList(file: BlockDevice, header: Qcow2Header): Promise<BitmapInfo[]> {
  return bitmapList(await readBitmapDirectory(file, header), header);
}

/**
 * The bitmaps `entries` (the directory of the image whose header is `header`, as qcow2-core decoded
 * it: `Qcow2Image.bitmapDirectory`) list, refusing a name or granularity QEMU would not show.
 */
export function bitmapList(entries: readonly Qcow2BitmapEntry[], header: Qcow2Header): BitmapInfo[] {
  return entries.map((entry, index) => {
    const where = header.extensions.bitmaps!.bitmapDirectoryOffset;
    if (encodeText(entry.name).length > BME_MAX_NAME_SIZE) {
      throw new BlockDeviceError('ECORRUPT', `qcow2 bitmap directory: entry ${index} has an invalid name`, {
        offset: where,
      });
    }
    if (
      entry.granularityBits < BME_MIN_GRANULARITY_BITS ||
      entry.granularityBits > BME_MAX_GRANULARITY_BITS
    ) {
      throw new BlockDeviceError(
        'ECORRUPT',
        `qcow2 bitmap directory: entry ${index} has granularity bits ${entry.granularityBits}`,
        { offset: where },
      );
    }
    return {
      name: entry.name,
      granularity: entry.granularity,
      flags: [...(entry.inUse ? ['in-use'] : []), ...(entry.auto ? ['auto'] : [])],
    };
  });
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
  if (bitmaps.length === 0) return 0;
  let total = 0;
  for (const bitmap of bitmaps) {
    const dataClusters = bitmapTableSize(guestSize, bitmap.granularity, clusterSize);
    total += dataClusters * clusterSize + bitmapTableBytes(dataClusters, clusterSize);
  }
  return total + Math.ceil(bitmapDirectorySize(bitmaps) / clusterSize) * clusterSize;
}
