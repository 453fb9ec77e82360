/**
 * qcow2 header extensions: a list of (type, length, data padded to 8 bytes) records starting at
 * header_length and ending with a type-0 record, all inside the first cluster.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { decodeCString, hex, readU64, viewOf } from './binary.js';
import type { FeatureKind } from './feature-bits.js';

export const QCOW2_EXT_MAGIC_END = 0;
export const QCOW2_EXT_MAGIC_BACKING_FORMAT = 0xe2792aca;
export const QCOW2_EXT_MAGIC_FEATURE_TABLE = 0x6803f857;
export const QCOW2_EXT_MAGIC_CRYPTO_HEADER = 0x0537be77;
export const QCOW2_EXT_MAGIC_BITMAPS = 0x23852875;
export const QCOW2_EXT_MAGIC_DATA_FILE = 0x44415441;

/** One feature name table entry is 48 bytes: type, bit number, 46 bytes of name. */
export const FEATURE_NAME_ENTRY_SIZE = 48;

/** A header extension as stored (data without padding). Unknown ones are kept for rewriting. */
export interface Qcow2HeaderExtension {
  readonly type: number;
  readonly data: Uint8Array;
}

export interface Qcow2FeatureName {
  readonly kind: FeatureKind | number;
  readonly bit: number;
  readonly name: string;
}

export interface Qcow2BitmapsExtension {
  readonly nbBitmaps: number;
  readonly bitmapDirectorySize: number;
  readonly bitmapDirectoryOffset: number;
}

export interface Qcow2CryptoHeaderExtension {
  readonly offset: number;
  readonly length: number;
}

/** The decoded header extensions. */
export interface Qcow2HeaderExtensions {
  /** Every extension in file order, known and unknown (the source of truth for rewriting). */
  readonly list: readonly Qcow2HeaderExtension[];
  readonly backingFormat: string | undefined;
  readonly featureNames: readonly Qcow2FeatureName[];
  readonly bitmaps: Qcow2BitmapsExtension | undefined;
  readonly dataFileName: string | undefined;
  readonly cryptoHeader: Qcow2CryptoHeaderExtension | undefined;
  /** Extensions of a type this library does not know. */
  readonly unknown: readonly Qcow2HeaderExtension[];
}

const KINDS: readonly FeatureKind[] = ['incompatible', 'compatible', 'autoclear'];

/**
 * Decodes the extension area of `firstCluster` (the image's first cluster, or the whole file when
 * shorter) starting at `headerLength`. Every length is checked to stay inside `limit` (the first
 * cluster). A file that ends before the end marker ends the list, as in QEMU.
 */
export function decodeHeaderExtensions(
  firstCluster: Uint8Array,
  headerLength: number,
  limit: number,
): Qcow2HeaderExtensions {
  const view = viewOf(firstCluster);
  const end = Math.min(limit, firstCluster.length);
  const list: Qcow2HeaderExtension[] = [];
  const unknown: Qcow2HeaderExtension[] = [];
  const featureNames: Qcow2FeatureName[] = [];
  let backingFormat: string | undefined;
  let bitmaps: Qcow2BitmapsExtension | undefined;
  let dataFileName: string | undefined;
  let cryptoHeader: Qcow2CryptoHeaderExtension | undefined;
  let at = headerLength;
  while (at + 8 <= end) {
    const type = view.getUint32(at);
    const length = view.getUint32(at + 4);
    const dataStart = at + 8;
    // The end marker's length is checked too, as QEMU checks every record's before its type.
    if (length > end - dataStart) {
      throw new BlockDeviceError(
        'ECORRUPT',
        `header extension ${hex(type)}: length ${length} runs past the first cluster`,
        { offset: at },
      );
    }
    if (type === QCOW2_EXT_MAGIC_END) break;
    const data = firstCluster.slice(dataStart, dataStart + length);
    list.push({ type, data });
    const dataView = viewOf(data);
    switch (type) {
      case QCOW2_EXT_MAGIC_BACKING_FORMAT:
        backingFormat = decodeCString(data);
        break;
      case QCOW2_EXT_MAGIC_FEATURE_TABLE:
        for (let entry = 0; entry + FEATURE_NAME_ENTRY_SIZE <= length; entry += FEATURE_NAME_ENTRY_SIZE) {
          const kindNumber = data[entry]!;
          featureNames.push({
            kind: KINDS[kindNumber] ?? kindNumber,
            bit: data[entry + 1]!,
            name: decodeCString(data.subarray(entry + 2, entry + FEATURE_NAME_ENTRY_SIZE)),
          });
        }
        break;
      case QCOW2_EXT_MAGIC_BITMAPS:
        if (length !== 24) {
          throw new BlockDeviceError('ECORRUPT', `bitmaps extension: length ${length} is not 24`, {
            offset: at,
          });
        }
        bitmaps = {
          nbBitmaps: dataView.getUint32(0),
          bitmapDirectorySize: readU64(dataView, 8, 'bitmaps extension: directory size', dataStart + 8),
          bitmapDirectoryOffset: readU64(dataView, 16, 'bitmaps extension: directory offset', dataStart + 16),
        };
        break;
      case QCOW2_EXT_MAGIC_DATA_FILE:
        dataFileName = decodeCString(data);
        break;
      case QCOW2_EXT_MAGIC_CRYPTO_HEADER:
        if (length !== 16) {
          throw new BlockDeviceError('ECORRUPT', `crypto header extension: length ${length} is not 16`, {
            offset: at,
          });
        }
        cryptoHeader = {
          offset: readU64(dataView, 0, 'crypto header extension: offset', dataStart),
          length: readU64(dataView, 8, 'crypto header extension: length', dataStart + 8),
        };
        break;
      default:
        unknown.push({ type, data });
    }
    at = dataStart + Math.ceil(length / 8) * 8;
  }
  return { list, backingFormat, featureNames, bitmaps, dataFileName, cryptoHeader, unknown };
}

/** Bytes `extensions` take when encoded, end marker included. */
export function encodedExtensionsSize(extensions: readonly Qcow2HeaderExtension[]): number {
  let size = 8;
  for (const extension of extensions) size += 8 + Math.ceil(extension.data.length / 8) * 8;
  return size;
}

/** Encodes `extensions` and the end marker into `target` at `at`; returns the end offset. */
export function encodeHeaderExtensions(
  target: Uint8Array,
  at: number,
  extensions: readonly Qcow2HeaderExtension[],
): number {
  const view = viewOf(target);
  let position = at;
  for (const extension of extensions) {
    view.setUint32(position, extension.type);
    view.setUint32(position + 4, extension.data.length);
    target.set(extension.data, position + 8);
    const padded = Math.ceil(extension.data.length / 8) * 8;
    target.fill(0, position + 8 + extension.data.length, position + 8 + padded);
    position += 8 + padded;
  }
  view.setUint32(position, QCOW2_EXT_MAGIC_END);
  view.setUint32(position + 4, 0);
  return position + 8;
}
