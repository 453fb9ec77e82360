/**
 * `qemu-img resize` on a qcow2 file: grow (the L1 table moved to a larger place when it must
 * grow), or shrink when asked (clusters past the new end freed, the file truncated after the last
 * cluster in use). A v2 image with internal snapshots keeps its size, as QEMU refuses to
 * resize one.
 */

import type { BlockDevice } from '@qcowkit/blockdev';
import { BlockDeviceError } from '@qcowkit/blockdev';
import { hasPersistentBitmaps, resizeWithBitmaps } from '../bitmaps/resize-with-bitmaps.js';
import { loadHeader } from '../check/check.js';
import { decodeCompressedDescriptor, entryOffset } from '../check/entries.js';
import { QCOW2_INCOMPAT_DATA_FILE } from '../format/feature-bits.js';
import { QCOW_MAX_L1_SIZE, sizeToL1 } from '../format/geometry.js';
import { QCOW_OFLAG_COPIED_HIGH } from '../format/l1-entry.js';
import { classifyL2Entry } from '../format/l2-entry.js';
import { ImageEdit, type ImageEditOptions, setU64 } from './image-edit.js';

export interface ResizeOptions extends ImageEditOptions {
  /** Allow a smaller size (qemu-img's --shrink); data past the new end is lost. */
  readonly shrink?: boolean;
}

/** Header fields 24..48: size, crypt_method, l1_size, l1_table_offset (one write). */
const SIZE_FIELD = 24;

/** Resizes the image to `newSize` bytes, a multiple of 512 (as QEMU requires). */
export async function resizeImage(
  file: BlockDevice,
  newSize: number,
  options: ResizeOptions = {},
): Promise<void> {
  if (!Number.isSafeInteger(newSize) || newSize < 0) {
    throw new BlockDeviceError('EINVAL', `qcow2 resize: ${newSize} is not a valid size`);
  }
  if (newSize % 512 !== 0) {
    throw new BlockDeviceError('EINVAL', `qcow2 resize: the new size must be a multiple of 512 (${newSize})`);
  }
  const size = newSize;
  const head = await loadHeader(file, options.signal === undefined ? {} : { signal: options.signal });
  if (size < head.size) {
    if (options.shrink !== true) {
      throw new BlockDeviceError(
        'EINVAL',
        'qcow2 resize: use the shrink option to shrink the image (data past the new end is lost)',
      );
    }
  }
  // As QEMU: a v2 snapshot records no disk size of its own, so the image keeps its size.
  if (head.nbSnapshots > 0 && head.version < 3) {
    throw new BlockDeviceError('EUNSUPPORTED', "qcow2 resize: Can't resize a v2 image which has snapshots");
  }
  // Persistent bitmaps follow the size: the engine resizes and stores them (or refuses, as QEMU),
  // so the offline edit's opening check is not run for them.
  if (hasPersistentBitmaps(head)) return resizeWithBitmaps(file, size);
  if ((head.incompatibleFeatures.low & QCOW2_INCOMPAT_DATA_FILE) !== 0) {
    // The data file must follow the size (truncated; a raw one's grown range mapped), and only the
    // engine has it open: this offline edit would leave it behind.
    throw new BlockDeviceError(
      'EUNSUPPORTED',
      'qcow2 resize: an image with an external data file is resized through Qcow2Image.resize (the data file open)',
    );
  }
  const edit = await ImageEdit.open(file, options);
  const { header, clusterSize } = edit;
  if (size < header.size) {
    await shrink(edit, size);
    return;
  }
  const l1Needed = sizeToL1(size, clusterSize, edit.extendedL2);
  if (l1Needed * 8 > QCOW_MAX_L1_SIZE) {
    throw new BlockDeviceError('EINVAL', `qcow2 resize: ${size} bytes need an L1 table larger than 32 MiB`);
  }
  let l1Size = header.l1Size;
  let l1TableOffset = header.l1TableOffset;
  if (l1Needed > header.l1Size) {
    // A new, larger L1 table: written and refcounted before the header names it.
    l1Size = l1Needed;
    l1TableOffset = edit.allocate(Math.ceil((l1Size * 8) / clusterSize));
    const l1 = new Uint8Array(Math.ceil((l1Size * 8) / clusterSize) * clusterSize);
    if (header.l1Size > 0) l1.set(await file.read(header.l1TableOffset, header.l1Size * 8));
    await edit.write(l1TableOffset, l1);
    await edit.flush();
    await edit.commitRefcounts();
  }
  await writeSizeAndL1(edit, size, l1Size, l1TableOffset);
  if (l1TableOffset !== header.l1TableOffset && header.l1Size > 0) {
    edit.addReferences(header.l1TableOffset, header.l1Size * 8, -1);
    await edit.commitRefcounts();
  }
}

async function writeSizeAndL1(
  edit: ImageEdit,
  size: number,
  l1Size: number,
  l1TableOffset: number,
): Promise<void> {
  const field = new Uint8Array(24);
  const view = new DataView(field.buffer);
  setU64(view, 0, size);
  view.setUint32(8, edit.header.cryptMethod);
  view.setUint32(12, l1Size);
  setU64(view, 16, l1TableOffset);
  await edit.writeHeader(SIZE_FIELD, field);
}

/**
 * Drops every mapping past the new end, then the size, then the refcounts; truncates the file.
 *
 * An L2 table an internal snapshot shares (refcount above 1) is never edited in place: the
 * snapshot still reads through it. When some of its entries stay, the active L1 gets a copy
 * without the dropped ones (counted and written before the L1 table names it, as QEMU copies a
 * shared table before its first change), and the shared table loses the active L1's reference.
 * Either way every dropped entry's cluster loses one reference (the active L1's path to it): a
 * cluster the snapshot holds keeps its data.
 */
async function shrink(edit: ImageEdit, size: number): Promise<void> {
  const { header, clusterSize, file, extendedL2, hasDataFile } = edit;
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const entriesPerL2 = clusterSize / l2EntryBytes;
  const firstDroppedCluster = Math.ceil(size / clusterSize);
  const l1 =
    header.l1Size === 0 ? new Uint8Array(0) : await file.read(header.l1TableOffset, header.l1Size * 8);
  const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  let l1Dirty = false;
  // Where the copies of shared tables go (by L1 index); their clusters counted on disk first.
  const copies = new Map<number, number>();
  for (let l1Index = 0; l1Index < header.l1Size; l1Index++) {
    const firstGuestCluster = l1Index * entriesPerL2;
    if (firstGuestCluster + entriesPerL2 <= firstDroppedCluster || firstGuestCluster >= firstDroppedCluster) {
      continue;
    }
    const l2Offset = entryOffset(l1View.getUint32(l1Index * 8), l1View.getUint32(l1Index * 8 + 4));
    if (l2Offset !== 0 && (edit.counts[l2Offset / clusterSize] ?? 0) > 1) {
      copies.set(l1Index, edit.allocate(1));
    }
  }
  if (copies.size > 0) await edit.commitRefcounts();
  for (let l1Index = 0; l1Index < header.l1Size; l1Index++) {
    const firstGuestCluster = l1Index * entriesPerL2;
    if (firstGuestCluster + entriesPerL2 <= firstDroppedCluster) continue;
    const l2Offset = entryOffset(l1View.getUint32(l1Index * 8), l1View.getUint32(l1Index * 8 + 4));
    if (l2Offset === 0) continue;
    const table = await file.read(l2Offset, clusterSize);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const keepFrom = Math.max(0, firstDroppedCluster - firstGuestCluster);
    for (let index = keepFrom; index < entriesPerL2; index++) {
      const at = index * l2EntryBytes;
      const high = view.getUint32(at);
      const low = view.getUint32(at + 4);
      switch (classifyL2Entry(high, low, hasDataFile, extendedL2)) {
        case 'normal':
        case 'zero-alloc':
          if (!hasDataFile) edit.addReferences(entryOffset(high, low), clusterSize, -1);
          break;
        case 'compressed': {
          const extent = decodeCompressedDescriptor(high, low, header.clusterBits);
          edit.addReferences(extent.hostOffset, extent.length, -1);
          break;
        }
        default:
          break;
      }
      table.fill(0, at, at + l2EntryBytes);
    }
    if (keepFrom === 0) {
      // The whole table falls off: unhook it from the L1 table and free it.
      l1View.setUint32(l1Index * 8, 0);
      l1View.setUint32(l1Index * 8 + 4, 0);
      l1Dirty = true;
      edit.addReferences(l2Offset, clusterSize, -1);
    } else if (copies.has(l1Index)) {
      const copy = copies.get(l1Index)!;
      await edit.write(copy, table);
      // Refcount 1: COPIED, as QEMU sets it on a table it just copied.
      l1View.setUint32(l1Index * 8, (Math.floor(copy / 2 ** 32) | QCOW_OFLAG_COPIED_HIGH) >>> 0);
      l1View.setUint32(l1Index * 8 + 4, copy >>> 0);
      l1Dirty = true;
      edit.addReferences(l2Offset, clusterSize, -1);
    } else {
      await file.write(l2Offset, table);
    }
  }
  // The copies are on disk before the L1 table names them.
  if (copies.size > 0) await edit.flush();
  if (l1Dirty) await file.write(header.l1TableOffset, l1);
  await edit.flush();
  await writeSizeAndL1(edit, size, header.l1Size, header.l1TableOffset);
  await edit.commitRefcounts();
  // The file ends after the last cluster in use.
  let last = edit.counts.length - 1;
  while (last >= 0 && (edit.counts[last] ?? 0) === 0) last--;
  const end = (last + 1) * clusterSize;
  if (end < file.size && file.capabilities.resize) await file.resize(end);
}
