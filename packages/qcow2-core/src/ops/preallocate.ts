/**
 * `preallocation=falloc|full` for a new qcow2 image, as `qemu-img create` leaves it: the image
 * is first laid out with metadata preallocation (every L2 table and data cluster allocated); then
 * {@link preallocateData} gives every data cluster its storage in the file and turns the
 * preallocated-zero entries into plain data entries, as QEMU's falloc/full images have them
 * (`qemu-img map` shows `"zero": false, "data": true`). With extended L2 the subcluster bitmaps
 * are cleared (QEMU leaves the subclusters of a preallocated cluster unallocated, reading from the
 * backing file or as zeros); with compat 0.10 the entries are data entries already.
 *
 * Order: the data area is made durable as zeros first (fallocate for 'falloc', zeros written for
 * 'full'), then the L2 tables are rewritten, so no entry ever claims data that is not zeros.
 */
import { type BlockDevice, BlockDeviceError, type RequestOptions } from '@qcowkit/blockdev';
import { loadHeader } from '../check/check.js';
import { QCOW2_INCOMPAT_DATA_FILE, QCOW2_INCOMPAT_EXTL2 } from '../format/feature-bits.js';
import { decodeL1Table, l1EntryOffset } from '../format/l1-entry.js';
import { classifyL2Entry, l2EntryHostOffset, QCOW_OFLAG_ZERO } from '../format/l2-entry.js';

export type DataPreallocation = 'falloc' | 'full';

export interface PreallocateOptions {
  readonly signal?: AbortSignal;
  /** Called as host ranges are preallocated: bytes done and the total. */
  readonly onProgress?: (done: number, total: number) => void;
}

/** Bytes of zeros written at a time for 'full'. */
const ZERO_CHUNK = 4 * 1024 * 1024;

/** Gives the data clusters of a freshly created, metadata-preallocated image their storage. */
export async function preallocateData(
  file: BlockDevice,
  mode: DataPreallocation,
  options: PreallocateOptions = {},
): Promise<void> {
  if (mode !== 'falloc' && mode !== 'full') {
    throw new BlockDeviceError('EINVAL', `qcow2 preallocate: unknown mode ${String(mode)}`);
  }
  const request: RequestOptions = options.signal === undefined ? {} : { signal: options.signal };
  const header = await loadHeader(file, request);
  const incompatible = header.incompatibleFeatures.low;
  if ((incompatible & QCOW2_INCOMPAT_DATA_FILE) !== 0) {
    throw new BlockDeviceError('EUNSUPPORTED', 'qcow2 preallocate: images with an external data file');
  }
  const extendedL2 = (incompatible & QCOW2_INCOMPAT_EXTL2) !== 0;
  const { clusterSize } = header;
  const entryBytes = extendedL2 ? 16 : 8;
  const l1 = decodeL1Table(await file.read(header.l1TableOffset, header.l1Size * 8, request), header.l1Size);

  // Host ranges to preallocate (coalesced), and the L2 tables whose entries change.
  const ranges: Array<{ offset: number; length: number }> = [];
  const changed: Array<{ offset: number; table: Uint8Array }> = [];
  const addRange = (offset: number) => {
    const last = ranges[ranges.length - 1];
    if (last !== undefined && last.offset + last.length === offset) last.length += clusterSize;
    else ranges.push({ offset, length: clusterSize });
  };
  for (let l1Index = 0; l1Index < header.l1Size; l1Index++) {
    const l2Offset = l1EntryOffset(l1.high[l1Index]!, l1.low[l1Index]!);
    if (l2Offset === 0) continue;
    const table = await file.read(l2Offset, clusterSize, request);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    let dirty = false;
    for (let at = 0; at + entryBytes <= table.length; at += entryBytes) {
      const high = view.getUint32(at);
      const low = view.getUint32(at + 4);
      const type = classifyL2Entry(high, low, false, extendedL2);
      if (type !== 'normal' && type !== 'zero-alloc') continue;
      const hostOffset = l2EntryHostOffset(high, low);
      if (hostOffset + clusterSize > file.size) {
        throw new BlockDeviceError('ECORRUPT', 'qcow2 preallocate: data cluster past the end of the file', {
          offset: hostOffset,
        });
      }
      addRange(hostOffset);
      if (extendedL2) {
        if (view.getUint32(at + 8) !== 0 || view.getUint32(at + 12) !== 0) {
          view.setUint32(at + 8, 0);
          view.setUint32(at + 12, 0);
          dirty = true;
        }
      } else if (type === 'zero-alloc') {
        view.setUint32(at + 4, (low & ~QCOW_OFLAG_ZERO) >>> 0);
        dirty = true;
      }
    }
    if (dirty) changed.push({ offset: l2Offset, table });
  }

  const total = ranges.reduce((sum, range) => sum + range.length, 0);
  let done = 0;
  options.onProgress?.(0, total);
  const zeros =
    mode === 'full' ? new Uint8Array(Math.min(ZERO_CHUNK, Math.max(clusterSize, total))) : undefined;
  for (const range of ranges) {
    for (let at = range.offset; at < range.offset + range.length; ) {
      options.signal?.throwIfAborted();
      const length = Math.min(ZERO_CHUNK, range.offset + range.length - at);
      if (zeros === undefined) await file.writeZeroes(at, length, request);
      else await file.write(at, zeros.subarray(0, length), request);
      at += length;
      done += length;
      options.onProgress?.(done, total);
    }
  }
  await file.flush(request);
  for (const { offset, table } of changed) await file.write(offset, table, request);
  await file.flush(request);
}
