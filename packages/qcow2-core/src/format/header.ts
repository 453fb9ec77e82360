/**
 * The qcow2 header (versions 2 and 3): decode, validate, encode.
 *
 * Layout (big-endian): magic 0, version 4, backing_file_offset 8, backing_file_size 16,
 * cluster_bits 20, size 24, crypt_method 32, l1_size 36, l1_table_offset 40,
 * refcount_table_offset 48, refcount_table_clusters 56, nb_snapshots 60, snapshots_offset 64;
 * v3: incompatible_features 72, compatible_features 80, autoclear_features 88,
 * refcount_order 96, header_length 100, compression_type 104 (when header_length > 104).
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { decodeCString, encodeText, hex, readU64, viewOf, writeU64 } from './binary.js';
import {
  type FeatureWord,
  knownFeatureName,
  QCOW2_AUTOCLEAR_DATA_FILE_RAW,
  QCOW2_COMPAT_LAZY_REFCOUNTS,
  QCOW2_INCOMPAT_COMPRESSION,
  QCOW2_INCOMPAT_CORRUPT,
  QCOW2_INCOMPAT_DATA_FILE,
  QCOW2_INCOMPAT_DIRTY,
  QCOW2_INCOMPAT_EXTL2,
  QCOW2_INCOMPAT_MASK,
  setBits,
} from './feature-bits.js';
import {
  isAligned,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  MIN_EXTENDED_L2_CLUSTER_BITS,
  QCOW_MAX_L1_SIZE,
  QCOW_MAX_REFTABLE_SIZE,
  QCOW_MAX_SNAPSHOTS,
  sizeToL1,
} from './geometry.js';
import {
  decodeHeaderExtensions,
  encodedExtensionsSize,
  encodeHeaderExtensions,
  type Qcow2HeaderExtension,
  type Qcow2HeaderExtensions,
} from './header-extensions.js';

/** "QFI\xfb" */
export const QCOW_MAGIC = 0x514649fb;
export const QCOW2_V2_HEADER_LENGTH = 72;
export const QCOW2_V3_MIN_HEADER_LENGTH = 104;
/** The header length qemu-img writes for v3 (compression type plus padding). */
export const QCOW2_V3_HEADER_LENGTH = 112;
/** Longest backing file name QEMU accepts. */
export const QCOW2_MAX_BACKING_FILE_NAME = 1023;

export const QCOW_CRYPT_NONE = 0;
export const QCOW_CRYPT_AES = 1;
export const QCOW_CRYPT_LUKS = 2;

export const QCOW2_COMPRESSION_TYPE_ZLIB = 0;
export const QCOW2_COMPRESSION_TYPE_ZSTD = 1;

export type Qcow2CompressionTypeName = 'zlib' | 'zstd';

/** The decoded header. Field names are the spec's, camelCased. */
export interface Qcow2Header {
  readonly version: 2 | 3;
  readonly backingFileOffset: number;
  readonly backingFileSize: number;
  readonly clusterBits: number;
  /** 1 << clusterBits. */
  readonly clusterSize: number;
  /** Virtual (guest) size in bytes. */
  readonly size: number;
  readonly cryptMethod: number;
  readonly l1Size: number;
  readonly l1TableOffset: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  readonly nbSnapshots: number;
  readonly snapshotsOffset: number;
  readonly incompatibleFeatures: FeatureWord;
  readonly compatibleFeatures: FeatureWord;
  readonly autoclearFeatures: FeatureWord;
  readonly refcountOrder: number;
  readonly headerLength: number;
  readonly compressionType: number;
  /** The backing file name stored at backingFileOffset, when any. */
  readonly backingFileName: string | undefined;
  readonly extensions: Qcow2HeaderExtensions;
}

/** Convenience views of the feature bits. */
export function headerFlags(header: Qcow2Header): {
  dirty: boolean;
  corrupt: boolean;
  dataFile: boolean;
  extendedL2: boolean;
  lazyRefcounts: boolean;
  dataFileRaw: boolean;
  compressionType: Qcow2CompressionTypeName;
} {
  const incompatible = header.incompatibleFeatures.low;
  return {
    dirty: (incompatible & QCOW2_INCOMPAT_DIRTY) !== 0,
    corrupt: (incompatible & QCOW2_INCOMPAT_CORRUPT) !== 0,
    dataFile: (incompatible & QCOW2_INCOMPAT_DATA_FILE) !== 0,
    extendedL2: (incompatible & QCOW2_INCOMPAT_EXTL2) !== 0,
    lazyRefcounts: (header.compatibleFeatures.low & QCOW2_COMPAT_LAZY_REFCOUNTS) !== 0,
    dataFileRaw: (header.autoclearFeatures.low & QCOW2_AUTOCLEAR_DATA_FILE_RAW) !== 0,
    compressionType: header.compressionType === QCOW2_COMPRESSION_TYPE_ZSTD ? 'zstd' : 'zlib',
  };
}

function corrupt(message: string, offset: number): never {
  throw new BlockDeviceError('ECORRUPT', `qcow2 header: ${message}`, { offset });
}

/** Reads only magic, version and cluster_bits, to know how much of the file the header spans. */
export function peekClusterSize(bytes: Uint8Array): number {
  if (bytes.length < QCOW2_V2_HEADER_LENGTH) corrupt(`file too short (${bytes.length} bytes)`, 0);
  const view = viewOf(bytes);
  if (view.getUint32(0) !== QCOW_MAGIC) corrupt('bad magic', 0);
  const clusterBits = view.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    corrupt(`cluster_bits ${clusterBits} outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`, 20);
  }
  return 2 ** clusterBits;
}

/**
 * Decodes and validates the header from the image's first cluster (or the whole file when it is
 * shorter than a cluster). Every field is checked with QEMU's caps before anyone uses it:
 * structural errors are `ECORRUPT`, unknown incompatible features `EUNSUPPORTED`.
 */
export function decodeHeader(firstCluster: Uint8Array): Qcow2Header {
  const clusterSize = peekClusterSize(firstCluster);
  const view = viewOf(firstCluster);
  const version = view.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new BlockDeviceError('EUNSUPPORTED', `qcow2 header: version ${version} is not supported`, {
      offset: 4,
    });
  }
  const clusterBits = view.getUint32(20);
  const backingFileOffset = readU64(view, 8, 'qcow2 header: backing_file_offset');
  const backingFileSize = view.getUint32(16);
  const size = readU64(view, 24, 'qcow2 header: size');
  const cryptMethod = view.getUint32(32);
  const l1Size = view.getUint32(36);
  const l1TableOffset = readU64(view, 40, 'qcow2 header: l1_table_offset');
  const refcountTableOffset = readU64(view, 48, 'qcow2 header: refcount_table_offset');
  const refcountTableClusters = view.getUint32(56);
  const nbSnapshots = view.getUint32(60);
  const snapshotsOffset = readU64(view, 64, 'qcow2 header: snapshots_offset');

  let incompatibleFeatures: FeatureWord = { high: 0, low: 0 };
  let compatibleFeatures: FeatureWord = { high: 0, low: 0 };
  let autoclearFeatures: FeatureWord = { high: 0, low: 0 };
  let refcountOrder = 4;
  let headerLength = QCOW2_V2_HEADER_LENGTH;
  let compressionType = QCOW2_COMPRESSION_TYPE_ZLIB;
  if (version === 3) {
    if (firstCluster.length < QCOW2_V3_MIN_HEADER_LENGTH) corrupt('file too short for a v3 header', 0);
    incompatibleFeatures = { high: view.getUint32(72), low: view.getUint32(76) };
    compatibleFeatures = { high: view.getUint32(80), low: view.getUint32(84) };
    autoclearFeatures = { high: view.getUint32(88), low: view.getUint32(92) };
    refcountOrder = view.getUint32(96);
    headerLength = view.getUint32(100);
    if (headerLength < QCOW2_V3_MIN_HEADER_LENGTH) {
      corrupt(`header_length ${headerLength} is less than ${QCOW2_V3_MIN_HEADER_LENGTH}`, 100);
    }
    if (headerLength % 8 !== 0) corrupt(`header_length ${headerLength} is not a multiple of 8`, 100);
    if (headerLength > clusterSize) corrupt(`header_length ${headerLength} exceeds the cluster size`, 100);
    if (headerLength > firstCluster.length)
      corrupt(`header_length ${headerLength} runs past the file end`, 100);
    if (headerLength > QCOW2_V3_MIN_HEADER_LENGTH) compressionType = firstCluster[104]!;
  }

  if (refcountOrder > 6) corrupt(`refcount_order ${refcountOrder} is above 6`, 96);
  if (cryptMethod > QCOW_CRYPT_LUKS) corrupt(`crypt_method ${cryptMethod} is unknown`, 32);

  if (backingFileOffset !== 0) {
    if (backingFileSize > QCOW2_MAX_BACKING_FILE_NAME) {
      corrupt(`backing file name of ${backingFileSize} bytes is too long`, 16);
    }
    if (backingFileOffset + backingFileSize > clusterSize) {
      corrupt('backing file name runs past the first cluster', 8);
    }
    if (backingFileOffset + backingFileSize > firstCluster.length) {
      corrupt('backing file name runs past the file end', 8);
    }
    if (backingFileOffset < headerLength) corrupt('backing file name overlaps the header', 8);
  }

  // Tables: aligned, inside QEMU's caps, no overflow.
  const extendedL2 = (incompatibleFeatures.low & QCOW2_INCOMPAT_EXTL2) !== 0;
  if (extendedL2 && clusterBits < MIN_EXTENDED_L2_CLUSTER_BITS) {
    corrupt(`extended L2 entries need clusters of at least 16 KiB (cluster_bits ${clusterBits})`, 20);
  }
  if (l1Size > QCOW_MAX_L1_SIZE / 8) corrupt(`L1 table of ${l1Size} entries is too large`, 36);
  if (l1Size > 0 && !isAligned(l1TableOffset, clusterSize)) {
    corrupt(`l1_table_offset ${hex(l1TableOffset)} is not cluster-aligned`, 40);
  }
  if (l1TableOffset + l1Size * 8 > Number.MAX_SAFE_INTEGER) corrupt('L1 table offset overflows', 40);
  const neededL1 = sizeToL1(size, clusterSize, extendedL2);
  if (l1Size < neededL1) {
    corrupt(`L1 table is too small (${l1Size} entries, ${neededL1} needed for size ${size})`, 36);
  }
  if (refcountTableClusters * clusterSize > QCOW_MAX_REFTABLE_SIZE) {
    corrupt(`refcount table of ${refcountTableClusters} clusters is too large`, 56);
  }
  if (!isAligned(refcountTableOffset, clusterSize)) {
    corrupt(`refcount_table_offset ${hex(refcountTableOffset)} is not cluster-aligned`, 48);
  }
  if (refcountTableOffset === 0 || refcountTableClusters === 0) {
    corrupt('the image has no refcount table', 48);
  }
  if (nbSnapshots > QCOW_MAX_SNAPSHOTS) corrupt(`${nbSnapshots} snapshots exceed ${QCOW_MAX_SNAPSHOTS}`, 60);
  // Checked with no snapshot too, as QEMU checks the table's place whatever its length.
  if (!isAligned(snapshotsOffset, clusterSize)) {
    corrupt(`snapshots_offset ${hex(snapshotsOffset)} is not cluster-aligned`, 64);
  }

  // Compression type (validated as QEMU does).
  if (compressionType !== QCOW2_COMPRESSION_TYPE_ZLIB && compressionType !== QCOW2_COMPRESSION_TYPE_ZSTD) {
    throw new BlockDeviceError(
      'EUNSUPPORTED',
      `qcow2 header: compression type ${compressionType} is unknown`,
      {
        offset: 104,
      },
    );
  }
  const compressionBit = (incompatibleFeatures.low & QCOW2_INCOMPAT_COMPRESSION) !== 0;
  if (compressionType !== QCOW2_COMPRESSION_TYPE_ZLIB && !compressionBit) {
    corrupt('compression type is not zlib but the compression type feature bit is clear', 72);
  }

  const extensions = decodeHeaderExtensions(
    firstCluster,
    headerLength,
    backingFileOffset !== 0 ? Math.min(backingFileOffset, clusterSize) : clusterSize,
  );
  const backingFileName =
    backingFileOffset !== 0
      ? decodeCString(firstCluster.subarray(backingFileOffset, backingFileOffset + backingFileSize))
      : undefined;

  const header: Qcow2Header = {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    clusterSize,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    backingFileName,
    extensions,
  };
  validateHeaderFeatures(header);
  return header;
}

/** Refuses unknown incompatible features (EUNSUPPORTED), naming them from the feature name table. */
export function validateHeaderFeatures(header: Qcow2Header): void {
  const word = header.incompatibleFeatures;
  const unknownBits = setBits(word).filter((bit) => bit >= 32 || ((QCOW2_INCOMPAT_MASK >>> bit) & 1) === 0);
  if (unknownBits.length === 0) return;
  const names = unknownBits.map((bit) => {
    const entry = header.extensions.featureNames.find((f) => f.kind === 'incompatible' && f.bit === bit);
    return entry !== undefined ? `'${entry.name}'` : `unknown incompatible feature bit ${bit}`;
  });
  throw new BlockDeviceError('EUNSUPPORTED', `qcow2 header: unsupported feature: ${names.join(', ')}`, {
    offset: 72,
  });
}

/** Human name of a feature bit: the image's feature name table first, then QEMU's names. */
export function featureName(
  header: Qcow2Header,
  kind: 'incompatible' | 'compatible' | 'autoclear',
  bit: number,
): string {
  const entry = header.extensions.featureNames.find((f) => f.kind === kind && f.bit === bit);
  return entry?.name ?? knownFeatureName(kind, bit) ?? `${kind} bit ${bit}`;
}

/** Fields for {@link encodeHeader}; extensions are written in the order given. */
export interface Qcow2HeaderFields
  extends Omit<Qcow2Header, 'extensions' | 'clusterSize' | 'backingFileOffset' | 'backingFileSize'> {
  readonly extensions: readonly Qcow2HeaderExtension[];
}

/**
 * Encodes a header into a new buffer of `clusterSize` bytes: the fixed fields, the extensions, the
 * end marker and the backing file name right after them. backing_file_offset/size are computed.
 */
export function encodeHeader(fields: Qcow2HeaderFields): Uint8Array {
  const clusterSize = 2 ** fields.clusterBits;
  const out = new Uint8Array(clusterSize);
  const view = viewOf(out);
  const headerLength = fields.version === 2 ? QCOW2_V2_HEADER_LENGTH : fields.headerLength;
  const nameBytes = fields.backingFileName !== undefined ? encodeText(fields.backingFileName) : undefined;
  const extensionsEnd = headerLength + encodedExtensionsSize(fields.extensions);
  if (extensionsEnd + (nameBytes?.length ?? 0) > clusterSize) {
    throw new BlockDeviceError('EINVAL', 'qcow2 header: header and extensions do not fit in one cluster');
  }
  view.setUint32(0, QCOW_MAGIC);
  view.setUint32(4, fields.version);
  writeU64(view, 8, nameBytes !== undefined ? extensionsEnd : 0);
  view.setUint32(16, nameBytes?.length ?? 0);
  view.setUint32(20, fields.clusterBits);
  writeU64(view, 24, fields.size);
  view.setUint32(32, fields.cryptMethod);
  view.setUint32(36, fields.l1Size);
  writeU64(view, 40, fields.l1TableOffset);
  writeU64(view, 48, fields.refcountTableOffset);
  view.setUint32(56, fields.refcountTableClusters);
  view.setUint32(60, fields.nbSnapshots);
  writeU64(view, 64, fields.snapshotsOffset);
  if (fields.version === 3) {
    view.setUint32(72, fields.incompatibleFeatures.high);
    view.setUint32(76, fields.incompatibleFeatures.low);
    view.setUint32(80, fields.compatibleFeatures.high);
    view.setUint32(84, fields.compatibleFeatures.low);
    view.setUint32(88, fields.autoclearFeatures.high);
    view.setUint32(92, fields.autoclearFeatures.low);
    view.setUint32(96, fields.refcountOrder);
    view.setUint32(100, headerLength);
    if (headerLength > QCOW2_V3_MIN_HEADER_LENGTH) out[104] = fields.compressionType;
  }
  encodeHeaderExtensions(out, headerLength, fields.extensions);
  if (nameBytes !== undefined) out.set(nameBytes, extensionsEnd);
  return out;
}
