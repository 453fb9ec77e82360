/**
 * Format probing as qemu-img does it for the formats this library knows: the qcow magic with
 * version 1 is qcow, with version 2 or more qcow2; anything else is raw.
 */
import { QCOW_MAGIC } from './format/header.js';

export type ImageFormat = 'qcow2' | 'qcow' | 'raw';

/** Bytes {@link detectFormat} needs. */
export const DETECT_BYTES = 8;

export function detectFormat(firstBytes: Uint8Array): ImageFormat {
  if (firstBytes.length < DETECT_BYTES) return 'raw';
  const view = new DataView(firstBytes.buffer, firstBytes.byteOffset, firstBytes.byteLength);
  if (view.getUint32(0) !== QCOW_MAGIC) return 'raw';
  const version = view.getUint32(4);
  if (version === 1) return 'qcow';
  if (version >= 2) return 'qcow2';
  return 'raw';
}
