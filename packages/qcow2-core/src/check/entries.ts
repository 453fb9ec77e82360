/**
 * Table entries as the check sees them: 64-bit big-endian words read as two 32-bit halves, so the
 * loops over millions of entries allocate nothing. Masks are the spec's (bits 9-55 hold offsets).
 */

// The flag bits and the classification are the format layer's (one definition each).
export { QCOW_OFLAG_COPIED_HIGH } from '../format/l1-entry.js';
export { QCOW_OFLAG_COMPRESSED_HIGH } from '../format/l2-entry.js';

export const TWO_POW_32 = 0x1_0000_0000;

/** L1E_OFFSET_MASK / L2E_OFFSET_MASK (0x00fffffffffffe00) split in halves. */
const OFFSET_MASK_HIGH = 0x00ff_ffff;
const OFFSET_MASK_LOW = 0xffff_fe00;

/** L1E_RESERVED_MASK 0x7f000000000001ff. */
const L1E_RESERVED_HIGH = 0x7f00_0000;
const L1E_RESERVED_LOW = 0x1ff;
/** L2E_STD_RESERVED_MASK 0x3f000000000001fe. */
const L2E_STD_RESERVED_HIGH = 0x3f00_0000;
const L2E_STD_RESERVED_LOW = 0x1fe;
/** REFT_RESERVED_MASK 0x1ff. */
const REFT_RESERVED_LOW = 0x1ff;

/** Bits 9-55 of an L1, L2, refcount table or bitmap table entry: a host offset. */
export function entryOffset(high: number, low: number): number {
  return (high & OFFSET_MASK_HIGH) * TWO_POW_32 + ((low & OFFSET_MASK_LOW) >>> 0);
}

export function l1ReservedBitsSet(high: number, low: number): boolean {
  return (high & L1E_RESERVED_HIGH) !== 0 || (low & L1E_RESERVED_LOW) !== 0;
}

export function l2ReservedBitsSet(high: number, low: number): boolean {
  return (high & L2E_STD_RESERVED_HIGH) !== 0 || (low & L2E_STD_RESERVED_LOW) !== 0;
}

/**
 * The block offset of a refcount table entry: REFT_OFFSET_MASK keeps bits 9-63 (not 9-55), so a
 * damaged top byte puts the block far outside the image. Inexact above 2^53, where only "past the
 * end" matters; test alignment with {@link reftableEntryAligned}.
 */
export function reftableEntryOffset(high: number, low: number): number {
  return (high >>> 0) * TWO_POW_32 + ((low & OFFSET_MASK_LOW) >>> 0);
}

/** Whether a refcount table entry's block offset is cluster aligned (exact at any size). */
export function reftableEntryAligned(low: number, clusterSize: number): boolean {
  return ((low & OFFSET_MASK_LOW) >>> 0) % clusterSize === 0;
}

export function reftableReservedBitsSet(low: number): boolean {
  return (low & REFT_RESERVED_LOW) !== 0;
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
 * Decodes a compressed cluster descriptor. With x = 62 - (cluster_bits - 8), bits 0..x-1 are the
 * host offset and bits x..61 the number of additional 512-byte sectors. x is at least 49, so the
 * offset's top bits and the sector count are both in the high half.
 */
export function decodeCompressedDescriptor(high: number, low: number, clusterBits: number): CompressedExtent {
  const csizeShift = 62 - (clusterBits - 8);
  const highOffsetBits = csizeShift - 32;
  const hostOffset = (high & ((1 << highOffsetBits) - 1)) * TWO_POW_32 + (low >>> 0);
  const csizeMask = (1 << (clusterBits - 8)) - 1;
  const sectors = ((high >>> highOffsetBits) & csizeMask) + 1;
  const offsetHigh = high & ((1 << highOffsetBits) - 1);
  return {
    hostOffset,
    length: sectors * 512 - ((low >>> 0) % 512),
    hostOffsetHex: () => ((BigInt(offsetHigh) << 32n) | BigInt(low >>> 0)).toString(16),
  };
}
