/**
 * L2 table entries, standard (64 bits) and extended (128 bits: the standard entry then a 64-bit
 * subcluster bitmap: bits 0..31 allocated, bits 32..63 reads-as-zero).
 *
 * An entry is classified once into a {@link ClusterType} (or, with extended L2, per subcluster into
 * a {@link SubclusterType}); everything else switches on that type and never re-tests flag bits.
 */
import { L1E_OFFSET_MASK_HIGH, L1E_OFFSET_MASK_LOW, QCOW_OFLAG_COPIED_HIGH } from './l1-entry.js';

/** Bit 62: the cluster is compressed (high word). */
export const QCOW_OFLAG_COMPRESSED_HIGH = 0x40000000;
/** Bit 0: the cluster reads as zeros (v3, standard L2 entries). */
export const QCOW_OFLAG_ZERO = 0x1;
export const L2E_OFFSET_MASK_HIGH = L1E_OFFSET_MASK_HIGH;
export const L2E_OFFSET_MASK_LOW = L1E_OFFSET_MASK_LOW;
/** Reserved bits of a standard, uncompressed entry: 0x3f000000000001fe. */
export const L2E_STD_RESERVED_MASK_HIGH = 0x3f000000;
export const L2E_STD_RESERVED_MASK_LOW = 0x000001fe;

const TWO_POW_32 = 0x1_0000_0000;

/** What one L2 entry says about its cluster. */
export type ClusterType =
  /** Not allocated here: read the backing file, else zeros. */
  | 'unallocated'
  /** Reads as zeros, no host cluster. */
  | 'zero-plain'
  /** Reads as zeros; keeps a preallocated host cluster that must not be read. */
  | 'zero-alloc'
  /** Data at a host offset. */
  | 'normal'
  /** Compressed data (see compressed-descriptor.ts). */
  | 'compressed';

/** What one subcluster is (extended L2), or a cluster without subclusters. */
export type SubclusterType =
  | ClusterType
  /** Host cluster allocated but this subcluster unallocated: read the backing file, else zeros. */
  | 'unallocated-alloc'
  /** Both the allocated and the zero bit set, or allocated without a host cluster. */
  | 'invalid';

/** Host offset of a standard entry (bits 9..55); not meaningful for compressed entries. */
export function l2EntryHostOffset(high: number, low: number): number {
  return (high & L2E_OFFSET_MASK_HIGH) * TWO_POW_32 + ((low & L2E_OFFSET_MASK_LOW) >>> 0);
}

/**
 * Classifies a standard L2 entry (the first 64 bits of an extended one). `hasDataFile`: with an
 * external data file, an entry at host offset 0 with COPIED set is a normal cluster at offset 0.
 * `extendedL2`: bit 0 is not the zero flag then (subcluster bitmaps say it).
 */
export function classifyL2Entry(
  high: number,
  low: number,
  hasDataFile: boolean,
  extendedL2: boolean,
): ClusterType {
  if ((high & QCOW_OFLAG_COMPRESSED_HIGH) !== 0) return 'compressed';
  const hasOffset = (high & L2E_OFFSET_MASK_HIGH) !== 0 || (low & L2E_OFFSET_MASK_LOW) !== 0;
  if (!extendedL2 && (low & QCOW_OFLAG_ZERO) !== 0) return hasOffset ? 'zero-alloc' : 'zero-plain';
  if (hasOffset) return 'normal';
  if (hasDataFile && (high & QCOW_OFLAG_COPIED_HIGH) !== 0) return 'normal';
  return 'unallocated';
}

/**
 * Type of subcluster `index` (0..31) of an extended L2 entry whose standard part classified as
 * `clusterType`, with bitmap halves `zeroBits` (bits 32..63) and `allocBits` (bits 0..31).
 */
export function classifySubcluster(
  clusterType: ClusterType,
  zeroBits: number,
  allocBits: number,
  index: number,
): SubclusterType {
  if (clusterType === 'compressed') return 'compressed';
  const allocated = ((allocBits >>> index) & 1) === 1;
  const zero = ((zeroBits >>> index) & 1) === 1;
  if (allocated && zero) return 'invalid';
  if (clusterType === 'normal') {
    if (allocated) return 'normal';
    return zero ? 'zero-alloc' : 'unallocated-alloc';
  }
  // No host cluster (classifyL2Entry never returns a zero type for extended entries).
  if (allocated) return 'invalid';
  return zero ? 'zero-plain' : 'unallocated';
}

/** True when reserved bits of an uncompressed standard entry are set (the entry is corrupt). */
export function l2EntryReservedBitsSet(high: number, low: number, extendedL2: boolean): boolean {
  if ((high & QCOW_OFLAG_COMPRESSED_HIGH) !== 0) return false;
  const lowMask = extendedL2 ? L2E_STD_RESERVED_MASK_LOW | QCOW_OFLAG_ZERO : L2E_STD_RESERVED_MASK_LOW;
  return (high & L2E_STD_RESERVED_MASK_HIGH) !== 0 || (low & lowMask) !== 0;
}

/** A decoded L2 entry (for tools like check; the read path works on the halves directly). */
export interface L2Entry {
  readonly type: ClusterType;
  /** Host offset for normal and zero-alloc clusters; 0 otherwise. */
  readonly hostOffset: number;
  readonly copied: boolean;
  readonly reservedBitsSet: boolean;
  /** The raw halves of the standard part. */
  readonly high: number;
  readonly low: number;
  /** Extended L2: allocation bits (bits 0..31 of the bitmap) and zero bits (32..63). */
  readonly allocBits: number;
  readonly zeroBits: number;
}

/** Decodes entry `index` of an L2 table (or slice) held in `table`. */
export function decodeL2Entry(
  table: Uint8Array,
  index: number,
  options: { extendedL2: boolean; hasDataFile: boolean },
): L2Entry {
  const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
  const at = index * (options.extendedL2 ? 16 : 8);
  const high = view.getUint32(at);
  const low = view.getUint32(at + 4);
  const type = classifyL2Entry(high, low, options.hasDataFile, options.extendedL2);
  return {
    type,
    hostOffset: type === 'normal' || type === 'zero-alloc' ? l2EntryHostOffset(high, low) : 0,
    copied: (high & QCOW_OFLAG_COPIED_HIGH) !== 0,
    reservedBitsSet: l2EntryReservedBitsSet(high, low, options.extendedL2),
    high,
    low,
    allocBits: options.extendedL2 ? view.getUint32(at + 12) : 0,
    zeroBits: options.extendedL2 ? view.getUint32(at + 8) : 0,
  };
}

/** Encodes a standard L2 entry for a normal, zero or unallocated cluster into its two halves. */
export function encodeL2Entry(entry: {
  type: 'unallocated' | 'zero-plain' | 'zero-alloc' | 'normal';
  hostOffset?: number;
  copied?: boolean;
}): { high: number; low: number } {
  const offset = entry.type === 'normal' || entry.type === 'zero-alloc' ? (entry.hostOffset ?? 0) : 0;
  let high = Math.floor(offset / TWO_POW_32) & L2E_OFFSET_MASK_HIGH;
  let low = (offset & L2E_OFFSET_MASK_LOW) >>> 0;
  if (entry.copied) high = (high | QCOW_OFLAG_COPIED_HIGH) >>> 0;
  if (entry.type === 'zero-plain' || entry.type === 'zero-alloc') low = (low | QCOW_OFLAG_ZERO) >>> 0;
  return { high, low };
}
