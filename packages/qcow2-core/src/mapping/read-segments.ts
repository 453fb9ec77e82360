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
  /**
   * The whole decompressed cluster a compressed segment points at. `compressedBytes`, when given,
   * are the descriptor's bytes already read (by a coalesced read of neighbouring clusters).
   */
  readonly readCompressed: (
    descriptor: CompressedDescriptor,
    compressedBytes?: Uint8Array,
    /** A buffer of exactly one cluster to decompress into (no copy, no caching). */
    into?: Uint8Array,
  ) => Promise<Uint8Array>;
  /** Bytes per (decompressed) cluster. */
  readonly clusterSize: number;
  /** Where compressed data lives (the image file). */
  readonly compressedDevice: BlockDevice;
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
  const compressedRuns: CompressedRun[] = [];
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
      case 'compressed':
        addToCompressedRun(compressedRuns, segment, target);
        break;
    }
  }
  for (const run of compressedRuns) {
    if (run.members.length === 1) {
      const [{ segment, target }] = run.members as [CompressedMember];
      tasks.push(async () => {
        const into = wholeCluster(source, segment, target);
        const cluster = await source.readCompressed(segment.compressed!, undefined, into);
        if (into === undefined) copyFromCluster(cluster, segment, target);
      });
    } else {
      tasks.push(() => readCompressedRun(source, run, options));
    }
  }
  await runBounded(tasks, source.concurrency);
}

interface CompressedMember {
  readonly segment: Segment;
  readonly target: Uint8Array;
}

/** Compressed clusters whose data lie next to each other in the file: read with one I/O. */
interface CompressedRun {
  hostStart: number;
  hostEnd: number;
  readonly members: CompressedMember[];
}

/** Most bytes of compressed data read at once for a run of compressed clusters. */
const MAX_COMPRESSED_RUN_BYTES = 4 * 1024 * 1024;

function addToCompressedRun(runs: CompressedRun[], segment: Segment, target: Uint8Array): void {
  const { hostOffset, compressedLength } = segment.compressed!;
  const end = hostOffset + compressedLength;
  const last = runs[runs.length - 1];
  // Compressed clusters are byte-packed: the next one starts inside or right after the sector
  // where the previous one ends.
  if (
    last !== undefined &&
    hostOffset >= last.hostStart &&
    hostOffset <= last.hostEnd &&
    Math.max(end, last.hostEnd) - last.hostStart <= MAX_COMPRESSED_RUN_BYTES
  ) {
    last.hostEnd = Math.max(last.hostEnd, end);
    last.members.push({ segment, target });
    return;
  }
  runs.push({ hostStart: hostOffset, hostEnd: end, members: [{ segment, target }] });
}

async function readCompressedRun(
  source: SegmentSource,
  run: CompressedRun,
  options?: RequestOptions,
): Promise<void> {
  const bytes = new Uint8Array(run.hostEnd - run.hostStart);
  await readClipped(source.compressedDevice, run.hostStart, bytes, options);
  await Promise.all(
    run.members.map(async ({ segment, target }) => {
      const descriptor = segment.compressed!;
      const start = descriptor.hostOffset - run.hostStart;
      const into = wholeCluster(source, segment, target);
      const cluster = await source.readCompressed(
        descriptor,
        bytes.subarray(start, start + descriptor.compressedLength),
        into,
      );
      if (into === undefined) copyFromCluster(cluster, segment, target);
    }),
  );
}

/** `target` when it is exactly the segment's whole cluster (decompress straight into it). */
function wholeCluster(source: SegmentSource, segment: Segment, target: Uint8Array): Uint8Array | undefined {
  return segment.offsetInCluster === 0 && target.length === source.clusterSize ? target : undefined;
}

function copyFromCluster(cluster: Uint8Array, segment: Segment, target: Uint8Array): void {
  const start = segment.offsetInCluster!;
  target.set(cluster.subarray(start, start + target.length));
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
