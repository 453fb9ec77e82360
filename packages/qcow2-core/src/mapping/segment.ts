/**
 * A run of guest bytes that reads the same way: the unit the read path and blockStatus work on.
 */
import type { CompressedDescriptor } from '../format/compressed-descriptor.js';

export type SegmentKind =
  /** Stored uncompressed at `hostOffset` (in the data file when there is one). */
  | 'data'
  /** Reads as zeros; `hostOffset` is the preallocated cluster or -1. */
  | 'zero'
  /** Not allocated at this layer: the backing file answers, else zeros. */
  | 'unallocated'
  /** One compressed cluster (`compressed` says where); never merged with neighbours. */
  | 'compressed';

export interface Segment {
  readonly guestOffset: number;
  length: number;
  readonly kind: SegmentKind;
  /** Host offset of `guestOffset` for data and allocated zero runs (and unallocated subclusters
   * of an allocated cluster); -1 otherwise. */
  readonly hostOffset: number;
  /** Compressed runs: the descriptor and the offset of `guestOffset` in the decompressed cluster. */
  readonly compressed?: CompressedDescriptor;
  readonly offsetInCluster?: number;
}

/** Appends a run, merging it into the previous one when they continue each other. */
export function pushSegment(
  segments: Segment[],
  kind: SegmentKind,
  guestOffset: number,
  length: number,
  hostOffset: number,
): void {
  const last = segments[segments.length - 1];
  if (
    last !== undefined &&
    last.kind === kind &&
    kind !== 'compressed' &&
    last.guestOffset + last.length === guestOffset &&
    (hostOffset === -1
      ? last.hostOffset === -1
      : last.hostOffset !== -1 && last.hostOffset + last.length === hostOffset)
  ) {
    last.length += length;
    return;
  }
  segments.push({ guestOffset, length, kind, hostOffset });
}
