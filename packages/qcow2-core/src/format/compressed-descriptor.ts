/**
 * Compressed cluster descriptors (qcow2). With x = 62 - (cluster_bits - 8): bits 0..x-1 are the
 * host byte offset (not aligned), bits x..61 the number of additional 512-byte sectors. The
 * compressed data may start mid-sector: the bytes to read run from the offset to the end of the
 * last sector.
 */
import { QCOW_OFLAG_COMPRESSED_HIGH } from './l2-entry.js';

const TWO_POW_32 = 0x1_0000_0000;

export interface CompressedDescriptor {
  /** Host byte offset of the compressed data. */
  readonly hostOffset: number;
  /** Number of 512-byte sectors the data touches (additional sectors + 1). */
  readonly sectors: number;
  /** Bytes to read from hostOffset: sectors * 512 - (hostOffset % 512). */
  readonly compressedLength: number;
}

/** Decodes the descriptor of a compressed L2 entry given as two halves. */
export function decodeCompressedDescriptor(
  high: number,
  low: number,
  clusterBits: number,
): CompressedDescriptor {
  const offsetBits = 62 - (clusterBits - 8); // 49..61, so the offset's top part is in `high`
  const highOffsetBits = offsetBits - 32;
  const hostOffset = (high & ((1 << highOffsetBits) - 1)) * TWO_POW_32 + (low >>> 0);
  const sectors = ((high >>> highOffsetBits) & ((1 << (clusterBits - 8)) - 1)) + 1;
  return { hostOffset, sectors, compressedLength: sectors * 512 - (hostOffset % 512) };
}

/** Encodes a compressed descriptor (with the compressed flag) into its two halves. */
export function encodeCompressedDescriptor(
  hostOffset: number,
  compressedLength: number,
  clusterBits: number,
): { high: number; low: number } {
  const offsetBits = 62 - (clusterBits - 8);
  const highOffsetBits = offsetBits - 32;
  const endSector = Math.floor((hostOffset + compressedLength - 1) / 512);
  const additional = endSector - Math.floor(hostOffset / 512);
  const high = (Math.floor(hostOffset / TWO_POW_32) | (additional << highOffsetBits)) >>> 0;
  return { high: (high | QCOW_OFLAG_COMPRESSED_HIGH) >>> 0, low: hostOffset >>> 0 };
}
