/**
 * qcow2 v3 feature bits: incompatible (refuse to open when unknown), compatible (ignore and keep)
 * and autoclear (clear when writing). Names follow the spec.
 */

export const QCOW2_INCOMPAT_DIRTY = 1 << 0;
export const QCOW2_INCOMPAT_CORRUPT = 1 << 1;
export const QCOW2_INCOMPAT_DATA_FILE = 1 << 2;
export const QCOW2_INCOMPAT_COMPRESSION = 1 << 3;
export const QCOW2_INCOMPAT_EXTL2 = 1 << 4;
/** Every incompatible bit this library understands. */
export const QCOW2_INCOMPAT_MASK =
  QCOW2_INCOMPAT_DIRTY |
  QCOW2_INCOMPAT_CORRUPT |
  QCOW2_INCOMPAT_DATA_FILE |
  QCOW2_INCOMPAT_COMPRESSION |
  QCOW2_INCOMPAT_EXTL2;

export const QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0;

export const QCOW2_AUTOCLEAR_BITMAPS = 1 << 0;
export const QCOW2_AUTOCLEAR_DATA_FILE_RAW = 1 << 1;

export type FeatureKind = 'incompatible' | 'compatible' | 'autoclear';

/** Feature type numbers of the feature name table. */
export const FEATURE_KIND_NUMBER: Record<FeatureKind, number> = {
  incompatible: 0,
  compatible: 1,
  autoclear: 2,
};

/** Names QEMU gives the known bits (used when an image has no feature name table). */
const KNOWN_NAMES: Record<FeatureKind, Record<number, string>> = {
  incompatible: {
    0: 'dirty bit',
    1: 'corrupt bit',
    2: 'external data file',
    3: 'compression type',
    4: 'extended L2 entries',
  },
  compatible: { 0: 'lazy refcounts' },
  autoclear: { 0: 'bitmaps', 1: 'raw external data' },
};

/**
 * Feature bits are 64-bit words; they are held as two 32-bit halves (`high`, `low`) because bits
 * above 31 exist and a JS number cannot be safely bit-masked above 32 bits.
 */
export interface FeatureWord {
  readonly high: number;
  readonly low: number;
}

/** Bit numbers (0..63) set in `word`. */
export function setBits(word: FeatureWord): number[] {
  const bits: number[] = [];
  for (let bit = 0; bit < 32; bit++) if ((word.low >>> bit) & 1) bits.push(bit);
  for (let bit = 0; bit < 32; bit++) if ((word.high >>> bit) & 1) bits.push(bit + 32);
  return bits;
}

export function hasBit(word: FeatureWord, bit: number): boolean {
  return bit < 32 ? ((word.low >>> bit) & 1) === 1 : ((word.high >>> (bit - 32)) & 1) === 1;
}

/** Default name of a known feature bit, or undefined. */
export function knownFeatureName(kind: FeatureKind, bit: number): string | undefined {
  return KNOWN_NAMES[kind][bit];
}
