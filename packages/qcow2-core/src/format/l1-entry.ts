/**
 * L1 table entries: 64 bits, the L2 table's host offset in bits 9..55, bit 63 QCOW_OFLAG_COPIED.
 * Entries are handled as two 32-bit halves (`high`, `low`) to stay in plain numbers.
 */

/** Bit 63: refcount is exactly one (high word). */
export const QCOW_OFLAG_COPIED_HIGH = 0x80000000;
/** Bits 9..55 hold the offset: high word mask and low word mask. */
export const L1E_OFFSET_MASK_HIGH = 0x00ffffff;
export const L1E_OFFSET_MASK_LOW = 0xfffffe00;
/** Reserved bits 0x7f000000000001ff. */
export const L1E_RESERVED_MASK_HIGH = 0x7f000000;
export const L1E_RESERVED_MASK_LOW = 0x000001ff;

const TWO_POW_32 = 0x1_0000_0000;

export interface L1Entry {
  /** Host offset of the L2 table; 0 when unallocated. */
  readonly l2Offset: number;
  readonly copied: boolean;
  /** Reserved bits are set (the entry is corrupt). */
  readonly reservedBitsSet: boolean;
}

/** Host offset of the L2 table an L1 entry points at (0 = none). */
export function l1EntryOffset(high: number, low: number): number {
  return (high & L1E_OFFSET_MASK_HIGH) * TWO_POW_32 + ((low & L1E_OFFSET_MASK_LOW) >>> 0);
}

export function decodeL1Entry(high: number, low: number): L1Entry {
  return {
    l2Offset: l1EntryOffset(high, low),
    copied: (high & QCOW_OFLAG_COPIED_HIGH) !== 0,
    reservedBitsSet: (high & L1E_RESERVED_MASK_HIGH) !== 0 || (low & L1E_RESERVED_MASK_LOW) !== 0,
  };
}

/** Encodes an L1 entry into its two halves. */
export function encodeL1Entry(entry: { l2Offset: number; copied: boolean }): { high: number; low: number } {
  const high = Math.floor(entry.l2Offset / TWO_POW_32) & L1E_OFFSET_MASK_HIGH;
  return {
    high: (entry.copied ? (high | QCOW_OFLAG_COPIED_HIGH) >>> 0 : high) >>> 0,
    low: (entry.l2Offset & L1E_OFFSET_MASK_LOW) >>> 0,
  };
}

/** Decodes a whole L1 table (big-endian 64-bit entries) into an array of `l2Offset`s and a copied mask. */
export function decodeL1Table(bytes: Uint8Array, count: number): { high: Uint32Array; low: Uint32Array } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const high = new Uint32Array(count);
  const low = new Uint32Array(count);
  for (let index = 0; index < count; index++) {
    high[index] = view.getUint32(index * 8);
    low[index] = view.getUint32(index * 8 + 4);
  }
  return { high, low };
}
