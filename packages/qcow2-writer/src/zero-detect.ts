/** Zero detection on data read from a source. */

/** True when every byte of `bytes` is zero. Rejects most data after a few words. */
export function isAllZero(bytes: Uint8Array): boolean {
  const length = bytes.length;
  let at = 0;
  // Unaligned head.
  while (at < length && (bytes.byteOffset + at) % 4 !== 0) {
    if (bytes[at] !== 0) return false;
    at++;
  }
  const words = Math.floor((length - at) / 4);
  if (words > 0) {
    const ints = new Uint32Array(bytes.buffer, bytes.byteOffset + at, words);
    for (let index = 0; index < words; index++) if (ints[index] !== 0) return false;
    at += words * 4;
  }
  while (at < length) {
    if (bytes[at] !== 0) return false;
    at++;
  }
  return true;
}

/** True when `words[from..to)` are all zero (a view over a whole reusable buffer, no allocation). */
export function isZeroWords(words: Uint32Array, from: number, to: number): boolean {
  for (let index = from; index < to; index++) if (words[index] !== 0) return false;
  return true;
}

/** True when `a` and `b` hold the same bytes. */
export function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let index = 0; index < a.length; index++) if (a[index] !== b[index]) return false;
  return true;
}
