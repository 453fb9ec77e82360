/**
 * Reads for the check: a range past the end of the file reads as zeros, as QEMU's block layer
 * does, so a table that points past the end shows up as empty (and the reference itself is
 * reported) instead of failing the whole check.
 */
import type { BlockDevice, RequestOptions } from '@qcowkit/blockdev';

export async function readZeroPadded(
  file: BlockDevice,
  hostOffset: number,
  length: number,
  options?: RequestOptions,
): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  if (hostOffset >= file.size || length === 0) return out;
  const available = Math.min(length, file.size - hostOffset);
  await file.readInto(out.subarray(0, available), hostOffset, options);
  return out;
}
