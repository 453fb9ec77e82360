/**
 * Reads an image's bitmap directory, when the bitmaps extension is present and valid: its autoclear
 * bit set (a clear bit means a program that does not know bitmaps wrote the image, and QEMU then
 * ignores them) and the directory within QEMU's caps and the file.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import {
  decodeBitmapDirectory,
  QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
  QCOW2_MAX_BITMAPS,
  type Qcow2BitmapEntry,
} from '../format/bitmap-directory.js';
import { QCOW2_AUTOCLEAR_BITMAPS } from '../format/feature-bits.js';
import type { Qcow2Header } from '../format/header.js';

export async function readBitmapDirectory(
  file: BlockDevice,
  header: Qcow2Header,
): Promise<Qcow2BitmapEntry[]> {
  const extension = header.extensions.bitmaps;
  if (extension === undefined || (header.autoclearFeatures.low & QCOW2_AUTOCLEAR_BITMAPS) === 0) return [];
  const { nbBitmaps, bitmapDirectoryOffset, bitmapDirectorySize } = extension;
  if (nbBitmaps === 0) return [];
  if (nbBitmaps > QCOW2_MAX_BITMAPS || bitmapDirectorySize > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
    throw new BlockDeviceError('ECORRUPT', 'bitmaps extension: too many bitmaps or too large a directory');
  }
  if (
    bitmapDirectoryOffset % header.clusterSize !== 0 ||
    bitmapDirectoryOffset + bitmapDirectorySize > file.size
  ) {
    throw new BlockDeviceError(
      'ECORRUPT',
      'bitmaps extension: the directory is unaligned or past the end of the file',
      { offset: bitmapDirectoryOffset },
    );
  }
  const bytes = await file.read(bitmapDirectoryOffset, bitmapDirectorySize);
  return decodeBitmapDirectory(bytes, nbBitmaps, bitmapDirectoryOffset);
}
