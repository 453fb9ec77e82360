/**
 * The first step of reading a stored bitmap of an image: its directory entry, checked as QEMU
 * checks it before use, and its table, read once and validated.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { bitmapEntryProblem, type Qcow2BitmapEntry } from '../format/bitmap-directory.js';
import { decodeBitmapTable } from './bitmap-table.js';

/** What reading a stored bitmap needs of an image (a Qcow2Image has it). */
export interface StoredBitmapImage {
  readonly file: BlockDevice;
  readonly size: number;
  readonly clusterSize: number;
  readonly bitmapDirectory: readonly Qcow2BitmapEntry[];
}

/**
 * The entry, bit count and decoded table of stored bitmap `name`. A missing bitmap is ENOENT; one
 * marked in use is inconsistent and refused (EINVAL), as QEMU refuses to use it.
 */
export async function readStoredTable(
  image: StoredBitmapImage,
  name: string,
): Promise<{ entry: Qcow2BitmapEntry; bitCount: number; table: Float64Array }> {
  const entry = image.bitmapDirectory.find((candidate) => candidate.name === name);
  if (entry === undefined) throw new BlockDeviceError('ENOENT', `bitmap '${name}': no such bitmap`);
  if (entry.inUse) {
    throw new BlockDeviceError('EINVAL', `bitmap '${name}': it is in use (inconsistent) and cannot be read`);
  }
  const { file, clusterSize } = image;
  // The entry comes from the file as it was read (a read-only image's directory is not validated
  // at open): QEMU's caps bound the table read and what the caller reads through it.
  const problem = bitmapEntryProblem(entry, clusterSize, image.size);
  if (problem !== undefined) {
    throw new BlockDeviceError('ECORRUPT', `bitmap '${name}': ${problem}`, { offset: entry.tableOffset });
  }
  const table = decodeBitmapTable(
    await file.read(entry.tableOffset, entry.tableSize * 8),
    entry.tableSize,
    clusterSize,
    file.size,
    entry.tableOffset,
  );
  return { entry, bitCount: Math.ceil(image.size / entry.granularity), table };
}
