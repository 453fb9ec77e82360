/**
 * The legacy qcow (version 1) header, read-only. Layout (big-endian): magic 0, version 4,
 * backing_file_offset 8, backing_file_size 16, mtime 20, size 24, cluster_bits 32 (u8),
 * l2_bits 33 (u8), padding 34, crypt_method 36, l1_table_offset 40; 48 bytes.
 *
 * Its L1 entries are host offsets of L2 tables (2^l2_bits entries of 64 bits); an L2 entry is a
 * cluster's host offset, or, with bit 63 set, a compressed cluster: the low (63 - cluster_bits)
 * bits are the offset and the next cluster_bits bits the compressed size in bytes.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { decodeCString, readU64, viewOf } from './binary.js';
import { QCOW_MAGIC } from './header.js';

export const QCOW_V1_HEADER_LENGTH = 48;
/** Cluster bits QEMU accepts for qcow v1. */
export const QCOW_V1_MIN_CLUSTER_BITS = 9;
export const QCOW_V1_MAX_CLUSTER_BITS = 16;
export const QCOW_V1_MIN_L2_BITS = 6;
export const QCOW_V1_MAX_L2_BITS = 13;
/** Largest L1 table accepted here, in bytes (as for qcow2). */
export const QCOW_V1_MAX_L1_BYTES = 32 * 1024 * 1024;

export interface QcowV1Header {
  readonly version: 1;
  readonly backingFileOffset: number;
  readonly backingFileSize: number;
  readonly mtime: number;
  readonly size: number;
  readonly clusterBits: number;
  readonly l2Bits: number;
  readonly cryptMethod: number;
  readonly l1TableOffset: number;
  /** Number of L1 entries needed for `size`. */
  readonly l1Size: number;
  readonly backingFileName: string | undefined;
}

function corrupt(message: string, offset: number): never {
  throw new BlockDeviceError('ECORRUPT', `qcow header: ${message}`, { offset });
}

/** Decodes and validates a qcow v1 header from the file's first bytes (header and backing name). */
export function decodeQcowV1Header(bytes: Uint8Array): QcowV1Header {
  if (bytes.length < QCOW_V1_HEADER_LENGTH) corrupt(`file too short (${bytes.length} bytes)`, 0);
  const view = viewOf(bytes);
  if (view.getUint32(0) !== QCOW_MAGIC) corrupt('bad magic', 0);
  const version = view.getUint32(4);
  if (version !== 1) {
    throw new BlockDeviceError('EUNSUPPORTED', `qcow header: version ${version} is not 1`, { offset: 4 });
  }
  const backingFileOffset = readU64(view, 8, 'qcow header: backing_file_offset');
  const backingFileSize = view.getUint32(16);
  const size = readU64(view, 24, 'qcow header: size');
  const clusterBits = bytes[32]!;
  const l2Bits = bytes[33]!;
  const cryptMethod = view.getUint32(36);
  const l1TableOffset = readU64(view, 40, 'qcow header: l1_table_offset');
  if (clusterBits < QCOW_V1_MIN_CLUSTER_BITS || clusterBits > QCOW_V1_MAX_CLUSTER_BITS) {
    corrupt(
      `cluster_bits ${clusterBits} outside ${QCOW_V1_MIN_CLUSTER_BITS}..${QCOW_V1_MAX_CLUSTER_BITS}`,
      32,
    );
  }
  if (l2Bits < QCOW_V1_MIN_L2_BITS || l2Bits > QCOW_V1_MAX_L2_BITS) {
    corrupt(`l2_bits ${l2Bits} outside ${QCOW_V1_MIN_L2_BITS}..${QCOW_V1_MAX_L2_BITS}`, 33);
  }
  if (cryptMethod > 1) corrupt(`crypt_method ${cryptMethod} is unknown`, 36);
  const bytesPerL1 = 2 ** (clusterBits + l2Bits);
  const l1Size = Math.ceil(size / bytesPerL1);
  if (l1Size * 8 > QCOW_V1_MAX_L1_BYTES) corrupt(`image size ${size} needs too large an L1 table`, 24);
  if (l1TableOffset % 8 !== 0) corrupt('l1_table_offset is not 8-byte aligned', 40);
  let backingFileName: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileSize > 1023) corrupt(`backing file name of ${backingFileSize} bytes is too long`, 16);
    if (backingFileOffset + backingFileSize > bytes.length)
      corrupt('backing file name runs past the header area', 8);
    backingFileName = decodeCString(bytes.subarray(backingFileOffset, backingFileOffset + backingFileSize));
  }
  return {
    version: 1,
    backingFileOffset,
    backingFileSize,
    mtime: view.getUint32(20),
    size,
    clusterBits,
    l2Bits,
    cryptMethod,
    l1TableOffset,
    l1Size,
    backingFileName,
  };
}

/** A decoded qcow v1 L2 entry. */
export type QcowV1ClusterEntry =
  | { readonly type: 'unallocated' }
  | { readonly type: 'normal'; readonly hostOffset: number }
  | { readonly type: 'compressed'; readonly hostOffset: number; readonly compressedLength: number };

const TWO_POW_32 = 0x1_0000_0000;

/** Classifies a qcow v1 L2 entry given as two halves. */
export function decodeQcowV1L2Entry(high: number, low: number, clusterBits: number): QcowV1ClusterEntry {
  if ((high & 0x80000000) !== 0) {
    const offsetBits = 63 - clusterBits; // 47..54
    const highOffsetBits = offsetBits - 32;
    const hostOffset = (high & ((1 << highOffsetBits) - 1)) * TWO_POW_32 + (low >>> 0);
    const compressedLength = (high >>> highOffsetBits) & ((1 << clusterBits) - 1);
    return { type: 'compressed', hostOffset, compressedLength };
  }
  if (high === 0 && low === 0) return { type: 'unallocated' };
  return { type: 'normal', hostOffset: (high & 0x7fffffff) * TWO_POW_32 + (low >>> 0) };
}
