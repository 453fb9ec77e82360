/**
 * Writes a planned image front to back: metadata first, then the data in host order. The data
 * itself comes from a callback, so the same emitter serves empty images and conversions.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import type { Qcow2Layout } from './layout.js';
import {
  encodeImageHeader,
  encodeL1Slice,
  encodeRefcountBlock,
  encodeRefcountTable,
  L2TableBuilder,
} from './metadata.js';
import type { OutputWriter } from './sink.js';

/** Writes the data following group `group`'s L2 table (uncompressed layout), from `hostOffset`. */
export type GroupDataWriter = (group: number, hostOffset: number) => Promise<void>;
/** Writes the compressed area (compressed layout), from `hostOffset`. */
export type AreaWriter = (hostOffset: number) => Promise<void>;

const L1_CHUNK = 1024 * 1024;

/** True when some L2 table is referenced from L1 bytes [from, to). */
function l1SliceHasEntries(layout: Qcow2Layout, from: number, to: number): boolean {
  const indexes = layout.groupL1Index;
  let low = 0;
  let high = indexes.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (indexes[middle]! < from / 8) low = middle + 1;
    else high = middle;
  }
  return low < indexes.length && indexes[low]! < to / 8;
}

export async function emitImage(
  layout: Qcow2Layout,
  out: OutputWriter,
  writers: { group?: GroupDataWriter; area?: AreaWriter; signal?: AbortSignal },
): Promise<void> {
  const clusterSize = layout.geometry.clusterSize;
  await out.writeAt(0, encodeImageHeader(layout));
  await out.writeAt(layout.reftableOffset, encodeRefcountTable(layout));
  for (let block = 0; block < layout.refblockCount; block++) {
    await out.writeAt(layout.refblockOffset + block * clusterSize, encodeRefcountBlock(layout, block));
  }
  for (let from = 0; from < layout.l1Bytes; from += L1_CHUNK) {
    writers.signal?.throwIfAborted();
    const to = Math.min(layout.l1Bytes, from + L1_CHUNK);
    if (!l1SliceHasEntries(layout, from, to)) {
      await out.zeroTo(layout.l1Offset + to); // a hole where the sink can skip
      continue;
    }
    await out.writeAt(
      layout.l1Offset + from,
      encodeL1Slice(layout, from, Math.min(layout.l1Bytes, from + L1_CHUNK)),
    );
  }
  const builder = new L2TableBuilder(layout);
  for (let group = 0; group < layout.groupL1Index.length; group++) {
    writers.signal?.throwIfAborted();
    const l2Offset = layout.groupL2Offset[group]!;
    await out.writeAt(l2Offset, builder.build(group));
    if (layout.compressed === undefined && layout.groupHostClusters[group]! > 0) {
      if (writers.group === undefined) throw new Error('emitImage: no data writer');
      await writers.group(group, l2Offset + clusterSize);
    }
  }
  if (layout.compressed !== undefined && layout.compressed.lengths.length > 0) {
    if (writers.area === undefined) throw new Error('emitImage: no area writer');
    await writers.area(layout.compressed.areaOffset);
  }
  await out.zeroTo(layout.fileSize);
  if (out.position !== layout.fileSize) {
    throw new BlockDeviceError(
      'EIO',
      `qcow2 writer: wrote ${out.position} bytes, the layout says ${layout.fileSize}`,
    );
  }
  await out.flushBuffer();
}
