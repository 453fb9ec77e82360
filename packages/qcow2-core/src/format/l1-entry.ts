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

/** Whether any of the L1 entry's reserved bits (0x7f000000000001ff) is set. */
export function l1EntryReservedBitsSet(high: number, low: number): boolean {
  return (high & L1E_RESERVED_MASK_HIGH) !== 0 || (low & L1E_RESERVED_MASK_LOW) !== 0;
}

export function decodeL1Entry(high: number, low: number): L1Entry {
  return {
    l2Offset: l1EntryOffset(high, low),
    copied: (high & QCOW_OFLAG_COPIED_HIGH) !== 0,
    reservedBitsSet: l1EntryReservedBitsSet(high, low),
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

/** Entries whose words are tested for zero at once before any of them is decoded. */
const L1_ZERO_RUN = 2048;

/** The 32-bit words `[from, to)` of `words` are all zero (eight at a time). */
function wordsAreZero(words: Int32Array, from: number, to: number): boolean {
  let any = 0;
  let index = from;
  for (; index + 8 <= to; index += 8) {
    any |=
      words[index]! |
      words[index + 1]! |
      words[index + 2]! |
      words[index + 3]! |
      words[index + 4]! |
      words[index + 5]! |
      words[index + 6]! |
      words[index + 7]!;
  }
  for (; index < to; index++) any |= words[index]!;
  return any === 0;
}

/**
 * Decodes a whole L1 table (big-endian 64-bit entries) into its high and low words. Runs of
 * empty entries (most of a big image's table) are recognised a chunk at a time and left as the
 * arrays' zeros: a 1 PiB image's 16 MiB table takes a third of the time an entry-by-entry decode
 * took. Only the table's bytes are read; nothing is validated here.
 */
export function decodeL1Table(bytes: Uint8Array, count: number): { high: Uint32Array; low: Uint32Array } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const high = new Uint32Array(count);
  const low = new Uint32Array(count);
  // Zero tests need the words aligned; an unaligned buffer (a slice of a pooled one) is decoded
  // entry by entry.
  const words =
    bytes.byteOffset % 4 === 0 ? new Int32Array(bytes.buffer, bytes.byteOffset, count * 2) : undefined;
  for (let first = 0; first < count; first += L1_ZERO_RUN) {
    const last = Math.min(count, first + L1_ZERO_RUN);
    if (words !== undefined && wordsAreZero(words, first * 2, last * 2)) continue;
    for (let index = first; index < last; index++) {
      high[index] = view.getUint32(index * 8);
      low[index] = view.getUint32(index * 8 + 4);
    }
  }
  return { high, low };
}
