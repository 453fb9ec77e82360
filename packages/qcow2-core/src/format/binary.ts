/**
 * Big-endian field access over a byte buffer. Every multi-byte qcow2 and qcow field is big-endian.
 * 64-bit fields are decoded as two 32-bit halves into a `number`; values above
 * `Number.MAX_SAFE_INTEGER` are rejected where they are read (see `readU64`).
 */
import { BlockDeviceError } from '@qcowkit/blockdev';

const TWO_POW_32 = 0x1_0000_0000;

/** A DataView over exactly `bytes`, honouring its byteOffset (pooled buffers). */
export function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Reads a big-endian unsigned 64-bit field as a number; throws ECORRUPT when it is not safe. */
export function readU64(view: DataView, at: number, what: string, errorOffset = at): number {
  const high = view.getUint32(at);
  const low = view.getUint32(at + 4);
  if (high > 0x1fffff) {
    throw new BlockDeviceError(
      'ECORRUPT',
      `${what}: value 0x${high.toString(16)}${low.toString(16).padStart(8, '0')} is too large`,
      { offset: errorOffset },
    );
  }
  return high * TWO_POW_32 + low;
}

/** Writes a safe non-negative integer as a big-endian unsigned 64-bit field. */
export function writeU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, Math.floor(value / TWO_POW_32));
  view.setUint32(at + 4, value >>> 0);
}

const utf8Decoder = new TextDecoder('utf-8', { fatal: false });
const utf8Encoder = new TextEncoder();

export function decodeText(bytes: Uint8Array): string {
  return utf8Decoder.decode(bytes);
}

/**
 * A name stored in the image (backing file, its format, the data file) read as QEMU reads it, a C
 * string: it ends at the first NUL byte, whatever length the header gives.
 */
export function decodeCString(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return utf8Decoder.decode(nul === -1 ? bytes : bytes.subarray(0, nul));
}

export function encodeText(text: string): Uint8Array {
  return utf8Encoder.encode(text);
}

/** A string naming `offset` in hex, for messages. */
export function hex(value: number): string {
  return `0x${value.toString(16)}`;
}
