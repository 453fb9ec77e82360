/**
 * Refcount table entries and refcount block entries. Refcount widths are 1 << refcount_order bits
 * (1..64). Sub-byte widths pack the least significant bits first; wider ones are big-endian.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { readU64, viewOf, writeU64 } from './binary.js';

/** Reserved low bits of a refcount table entry (the offset is cluster-aligned). */
export const REFT_RESERVED_MASK_LOW = 0x1ff;

/** Number of refcount entries in one refcount block. */
export function refcountsPerBlock(clusterSize: number, refcountOrder: number): number {
  return (clusterSize * 8) / 2 ** refcountOrder;
}

/**
 * Refcount table and block clusters for an image of the header, themselves and `otherClusters`
 * more clusters: the smallest fixed point, each count at least 1.
 */
export function refcountClusters(
  clusterSize: number,
  refcountOrder: number,
  otherClusters: number,
): { reftableClusters: number; refblockCount: number } {
  const perBlock = refcountsPerBlock(clusterSize, refcountOrder);
  let reftableClusters = 1;
  let refblockCount = 1;
  for (;;) {
    const total = 1 + reftableClusters + refblockCount + otherClusters;
    const blocks = Math.ceil(total / perBlock);
    const table = Math.ceil((blocks * 8) / clusterSize);
    if (blocks <= refblockCount && table <= reftableClusters) break;
    refblockCount = Math.max(blocks, refblockCount);
    reftableClusters = Math.max(table, reftableClusters);
  }
  return { reftableClusters, refblockCount };
}

/** Largest refcount representable with `refcountOrder` (capped at MAX_SAFE_INTEGER for 64). */
export function maxRefcount(refcountOrder: number): number {
  return refcountOrder >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** refcountOrder) - 1;
}

/** Reads refcount `index` of a refcount block. */
export function decodeRefcount(block: Uint8Array, index: number, refcountOrder: number): number {
  switch (refcountOrder) {
    case 0:
      return (block[index >>> 3]! >>> (index & 7)) & 1;
    case 1:
      return (block[index >>> 2]! >>> ((index & 3) * 2)) & 3;
    case 2:
      return (block[index >>> 1]! >>> ((index & 1) * 4)) & 15;
    case 3:
      return block[index]!;
    case 4:
      return (block[index * 2]! << 8) | block[index * 2 + 1]!;
    case 5:
      return viewOf(block).getUint32(index * 4);
    case 6:
      return readU64(viewOf(block), index * 8, 'refcount block entry');
    default:
      throw new BlockDeviceError('EINVAL', `refcount_order ${refcountOrder} is not 0..6`);
  }
}

/** Writes refcount `index` of a refcount block. */
export function encodeRefcount(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0 || value > maxRefcount(refcountOrder)) {
    throw new BlockDeviceError('EINVAL', `refcount ${value} does not fit in ${2 ** refcountOrder} bits`);
  }
  switch (refcountOrder) {
    case 0:
    case 1:
    case 2: {
      const bits = 2 ** refcountOrder;
      const perByte = 8 / bits;
      const byte = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[byte] = (block[byte]! & ~mask) | (value << shift);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      block[index * 2] = value >>> 8;
      block[index * 2 + 1] = value & 0xff;
      return;
    case 5:
      viewOf(block).setUint32(index * 4, value);
      return;
    case 6:
      writeU64(viewOf(block), index * 8, value);
      return;
    default:
      throw new BlockDeviceError('EINVAL', `refcount_order ${refcountOrder} is not 0..6`);
  }
}

/** Decodes a refcount table: one host offset per entry (0 = no block). Reserved bits are reported. */
export function decodeRefcountTable(
  bytes: Uint8Array,
  tableOffset = 0,
): { offsets: number[]; reservedBitsSet: number[] } {
  const view = viewOf(bytes);
  const count = Math.floor(bytes.length / 8);
  const offsets = new Array<number>(count);
  const reservedBitsSet: number[] = [];
  for (let index = 0; index < count; index++) {
    const low = view.getUint32(index * 8 + 4);
    if ((low & REFT_RESERVED_MASK_LOW) !== 0) reservedBitsSet.push(index);
    offsets[index] =
      readU64(view, index * 8, 'refcount table entry', tableOffset + index * 8) -
      (low & REFT_RESERVED_MASK_LOW);
  }
  return { offsets, reservedBitsSet };
}
