/**
 * Executes a read plan: fills the caller's buffer from a list of segments, straight into the
 * buffer (no copies for data), with bounded parallel I/O.
 */
import { type BlockDevice, BlockDeviceError, type Extent, type RequestOptions } from '@qcowkit/blockdev';
import type { CompressedDescriptor } from '../format/compressed-descriptor.js';
import { runBounded } from '../limit.js';
import type { Segment } from './segment.js';

export interface SegmentSource {
  /** Where 'data' segments live (the image file or the external data file). */
  readonly dataDevice: BlockDevice | undefined;
  /** The backing device, or undefined (unallocated reads as zeros). */
  readonly backing: BlockDevice | undefined;
  /** The whole decompressed cluster a compressed segment points at. */
  readonly readCompressed: (descriptor: CompressedDescriptor) => Promise<Uint8Array>;
  /** Most host I/Os in flight for one request. */
  readonly concurrency: number;
}

/** Reads `target.length` bytes at `hostOffset` of `device`; bytes past the device end read as zeros. */
export async function readClipped(
  device: BlockDevice,
  hostOffset: number,
  target: Uint8Array,
  options?: RequestOptions,
): Promise<void> {
  const available = Math.max(0, Math.min(target.length, device.size - hostOffset));
  if (available > 0) await device.readInto(target.subarray(0, available), hostOffset, options);
  if (available < target.length) target.fill(0, available);
}

export async function readSegments(
  source: SegmentSource,
  buffer: Uint8Array,
  bufferGuestOffset: number,
  segments: readonly Segment[],
  options?: RequestOptions,
): Promise<void> {
  const tasks: (() => Promise<void>)[] = [];
  for (const segment of segments) {
    const target = buffer.subarray(
      segment.guestOffset - bufferGuestOffset,
      segment.guestOffset - bufferGuestOffset + segment.length,
    );
    switch (segment.kind) {
      case 'zero':
        target.fill(0);
        break;
      case 'data': {
        const device = source.dataDevice;
        if (device === undefined) {
          throw new BlockDeviceError('EUNSUPPORTED', 'read: the external data file is not open');
        }
        tasks.push(() => readClipped(device, segment.hostOffset, target, options));
        break;
      }
      case 'unallocated': {
        const backing = source.backing;
        if (backing === undefined) target.fill(0);
        else tasks.push(() => readClipped(backing, segment.guestOffset, target, options));
        break;
      }
      case 'compressed': {
        const descriptor = segment.compressed!;
        const start = segment.offsetInCluster!;
        tasks.push(async () => {
          const cluster = await source.readCompressed(descriptor);
          target.set(cluster.subarray(start, start + target.length));
        });
        break;
      }
    }
  }
  await runBounded(tasks, source.concurrency);
}

/**
 * Extents for segments; unallocated runs ask the backing device (depth + 1). With
 * `recurseIntoData` (QEMU does it for images it detects as metadata-preallocated), data runs ask
 * the device holding them whether the host range reads as zeros (a hole, or past its end): such
 * ranges are reported `zero: true, data: true`.
 */
export async function segmentsToExtents(
  segments: readonly Segment[],
  source: Pick<SegmentSource, 'backing' | 'dataDevice'> & { recurseIntoData?: boolean },
  options?: RequestOptions,
): Promise<Extent[]> {
  const extents: Extent[] = [];
  for (const segment of segments) {
    switch (segment.kind) {
      case 'data':
        await dataExtents(extents, segment, source.recurseIntoData ? source.dataDevice : undefined, options);
        break;
      case 'zero':
        extents.push({
          offset: segment.guestOffset,
          length: segment.length,
          zero: true,
          data: false,
          present: true,
          depth: 0,
          ...(segment.hostOffset >= 0 ? { hostOffset: segment.hostOffset } : {}),
        });
        break;
      case 'compressed':
        extents.push({
          offset: segment.guestOffset,
          length: segment.length,
          zero: false,
          data: true,
          present: true,
          depth: 0,
          compressed: true,
        });
        break;
      case 'unallocated':
        await backingExtents(extents, segment, source.backing, options);
        break;
    }
  }
  return extents;
}

async function dataExtents(
  extents: Extent[],
  segment: Segment,
  device: BlockDevice | undefined,
  options?: RequestOptions,
): Promise<void> {
  const push = (offset: number, length: number, zero: boolean): void => {
    extents.push({
      offset,
      length,
      zero,
      data: true,
      present: true,
      depth: 0,
      hostOffset: segment.hostOffset + (offset - segment.guestOffset),
    });
  };
  if (device === undefined || !device.capabilities.blockStatus) {
    push(segment.guestOffset, segment.length, false);
    return;
  }
  const hostEnd = Math.min(segment.hostOffset + segment.length, device.size);
  let host = segment.hostOffset;
  while (host < hostEnd) {
    const below = await device.blockStatus(host, hostEnd - host, options);
    if (below.length === 0) throw new BlockDeviceError('EIO', 'blockStatus: the file returned no extent');
    for (const extent of below) {
      const length = Math.min(extent.length, hostEnd - host);
      if (extent.offset !== host || length <= 0) {
        throw new BlockDeviceError('EIO', 'blockStatus: the file returned a bad extent', { offset: host });
      }
      push(segment.guestOffset + (host - segment.hostOffset), length, extent.zero);
      host += length;
      if (host >= hostEnd) break;
    }
  }
  const done = host - segment.hostOffset;
  if (done < segment.length)
    push(segment.guestOffset + Math.max(0, done), segment.length - Math.max(0, done), true);
}

async function backingExtents(
  extents: Extent[],
  segment: Segment,
  backing: BlockDevice | undefined,
  options?: RequestOptions,
): Promise<void> {
  const offset = segment.guestOffset;
  const end = offset + segment.length;
  let position = offset;
  if (backing !== undefined) {
    const backingEnd = Math.min(end, backing.size);
    while (position < backingEnd) {
      const below = await backing.blockStatus(position, backingEnd - position, options);
      if (below.length === 0)
        throw new BlockDeviceError('EIO', 'blockStatus: backing device returned no extent');
      for (const extent of below) {
        const length = Math.min(extent.length, backingEnd - position);
        if (extent.offset !== position || length <= 0) {
          throw new BlockDeviceError('EIO', 'blockStatus: backing device returned a bad extent', {
            offset: position,
          });
        }
        extents.push({ ...extent, length, depth: extent.depth + 1 });
        position += length;
        if (position >= backingEnd) break;
      }
    }
  }
  if (position < end) {
    // Nothing answers (no backing file, or past its end): qemu-img map says depth 0 there, and
    // keeps the offset of an allocated cluster's unallocated subclusters.
    extents.push({
      offset: position,
      length: end - position,
      zero: true,
      data: false,
      present: false,
      depth: 0,
      ...(backing === undefined && segment.hostOffset >= 0
        ? { hostOffset: segment.hostOffset + (position - offset) }
        : {}),
    });
  }
}
