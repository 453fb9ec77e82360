/**
 * Encoding of the feature name table header extension (QCOW2_EXT_MAGIC_FEATURE_TABLE): 48-byte
 * entries of feature type (0 incompatible, 1 compatible, 2 autoclear), bit number and a name of at
 * most 46 bytes, NUL-padded.
 */
import { encodeText } from './binary.js';
import { FEATURE_KIND_NUMBER, type FeatureKind, knownFeatureName } from './feature-bits.js';
import {
  FEATURE_NAME_ENTRY_SIZE,
  QCOW2_EXT_MAGIC_FEATURE_TABLE,
  type Qcow2HeaderExtension,
} from './header-extensions.js';

/** The bits QEMU names in the tables it writes, in the order it writes them. */
export const QCOW2_KNOWN_FEATURES: readonly { kind: FeatureKind; bit: number }[] = [
  { kind: 'incompatible', bit: 0 },
  { kind: 'incompatible', bit: 1 },
  { kind: 'incompatible', bit: 2 },
  { kind: 'incompatible', bit: 3 },
  { kind: 'incompatible', bit: 4 },
  { kind: 'compatible', bit: 0 },
  { kind: 'autoclear', bit: 0 },
  { kind: 'autoclear', bit: 1 },
];

/** Encodes a feature name table extension; names default to QEMU's names of the known bits. */
export function encodeFeatureNameTable(
  entries: readonly { kind: FeatureKind; bit: number; name?: string }[] = QCOW2_KNOWN_FEATURES,
): Qcow2HeaderExtension {
  const data = new Uint8Array(entries.length * FEATURE_NAME_ENTRY_SIZE);
  entries.forEach((entry, index) => {
    const at = index * FEATURE_NAME_ENTRY_SIZE;
    data[at] = FEATURE_KIND_NUMBER[entry.kind];
    data[at + 1] = entry.bit;
    const name = encodeText(entry.name ?? knownFeatureName(entry.kind, entry.bit) ?? '');
    data.set(name.subarray(0, FEATURE_NAME_ENTRY_SIZE - 2), at + 2);
  });
  return { type: QCOW2_EXT_MAGIC_FEATURE_TABLE, data };
}
