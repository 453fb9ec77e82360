/**
 * Table entries as the check sees them: 64-bit big-endian words read as two 32-bit halves, so the
 * loops over millions of entries allocate nothing. Masks are the spec's (bits 9-55 hold offsets).
 */

// The masks, flag bits and classification are the format layer's (one definition each).
import { decodeCompressedDescriptor as decodeDescriptor } from '../format/compressed-descriptor.js';
import { L1E_OFFSET_MASK_LOW, l1EntryOffset } from '../format/l1-entry.js';
import { REFT_RESERVED_MASK_LOW } from '../format/refcount.js';

export { QCOW_OFLAG_COPIED_HIGH } from '../format/l1-entry.js';
export { QCOW_OFLAG_COMPRESSED_HIGH } from '../format/l2-entry.js';

export const TWO_POW_32 = 0x1_0000_0000;

/**
 * Bits 9-55 of an L1, L2, refcount table or bitmap table entry: a host offset (the same mask,
 * L1E_OFFSET_MASK = L2E_OFFSET_MASK, for all of them).
 */
export const entryOffset: (high: number, low: number) => number = l1EntryOffset;

/**
 * The block offset of a refcount table entry: REFT_OFFSET_MASK keeps bits 9-63 (not 9-55), so a
 * damaged top byte puts the block far outside the image. Inexact above 2^53, where only "past the
 * end" matters; test alignment with {@link reftableEntryAligned}.
 */
export function reftableEntryOffset(high: number, low: number): number {
  return (high >>> 0) * TWO_POW_32 + ((low & L1E_OFFSET_MASK_LOW) >>> 0);
}

/** Whether a refcount table entry's block offset is cluster aligned (exact at any size). */
export function reftableEntryAligned(low: number, clusterSize: number): boolean {
  return ((low & L1E_OFFSET_MASK_LOW) >>> 0) % clusterSize === 0;
}

export function reftableReservedBitsSet(low: number): boolean {
  return (low & REFT_RESERVED_MASK_LOW) !== 0;
}

/** The entry in hex without a prefix, as QEMU prints entries (`%lx`). */
export function entryHex(high: number, low: number): string {
  if (high === 0) return (low >>> 0).toString(16);
  return (high >>> 0).toString(16) + (low >>> 0).toString(16).padStart(8, '0');
}

/** Where a compressed cluster's bytes lie: host byte offset and length (to the end of its last sector). */
export interface CompressedExtent {
  /** Host byte offset; inexact above 2^53 (then far past any file end: see `hostOffsetHex`). */
  hostOffset: number;
  length: number;
  /** The exact host offset in hex, without a prefix. */
  hostOffsetHex(): string;
}

/**
 * Decodes a compressed cluster descriptor (the format layer's codec) and adds the exact host offset
 * in hex for messages: bits 0..x-1 hold the offset, x = 62 - (cluster_bits - 8) >= 49, so the
 * offset's top bits are in the high half.
 */
export function decodeCompressedDescriptor(high: number, low: number, clusterBits: number): CompressedExtent {
  const { hostOffset, sectors } = decodeDescriptor(high, low, clusterBits);
  const offsetHigh = high & ((1 << (62 - (clusterBits - 8) - 32)) - 1);
  return {
    hostOffset,
    // From the low half, exact even where hostOffset is not (above 2^53).
    length: sectors * 512 - ((low >>> 0) % 512),
    hostOffsetHex: () => ((BigInt(offsetHigh) << 32n) | BigInt(low >>> 0)).toString(16),
  };
}
