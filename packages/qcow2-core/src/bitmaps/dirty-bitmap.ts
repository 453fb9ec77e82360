/**
 * One persistent dirty bitmap while its image is open for writing, kept sparse: only the parts
 * (one bitmap data cluster each, a "chunk") that got a bit set since opening are in memory, as the
 * bits set since then. The stored bits stay on disk; storing merges the two
 * (see persistent-bitmaps.ts). Memory is bounded by what is written, not by the guest size: a 2 PiB
 * guest at 64 KiB granularity has 2^35 bits, and a write of a few bytes costs one chunk.
 *
 * Bit `i` covers guest bytes `[i * granularity, (i + 1) * granularity)`; in a chunk, bit `i` is
 * bit `i % 8` (least significant first) of byte `i / 8`, as the spec stores it.
 */

export class DirtyBitmap {
  readonly name: string;
  readonly granularityBits: number;
  readonly granularity: number;
  /** `auto`: writes set bits (a disabled bitmap keeps its bits unchanged). */
  enabled: boolean;
  /** Bits of one chunk (one cluster of bitmap data). */
  readonly chunkBits: number;
  readonly #chunkBytes: number;
  /** Bits of the bitmap for the current guest size. */
  #bits: number;
  /** Bits below this index of the stored bitmap are still valid (a shrink lowers it). */
  #storedValidBits: number;
  /** Chunk index -> bits set since opening (a cluster's worth of bytes). */
  readonly #touched = new Map<number, Uint8Array>();

  constructor(options: {
    name: string;
    granularityBits: number;
    enabled: boolean;
    clusterSize: number;
    guestSize: number;
    /** A new bitmap: nothing stored yet. */
    created?: boolean;
  }) {
    this.name = options.name;
    this.granularityBits = options.granularityBits;
    this.granularity = 2 ** options.granularityBits;
    this.enabled = options.enabled;
    this.#chunkBytes = options.clusterSize;
    this.chunkBits = options.clusterSize * 8;
    this.#bits = Math.ceil(options.guestSize / this.granularity);
    this.#storedValidBits = options.created === true ? 0 : this.#bits;
  }

  /** Bits of the bitmap. */
  get bits(): number {
    return this.#bits;
  }

  /** Bitmap table entries (chunks) the current size needs. */
  get tableSize(): number {
    return Math.ceil(this.#bits / this.chunkBits);
  }

  /** Chunks held in memory. */
  get touchedChunks(): number {
    return this.#touched.size;
  }

  /** Sets the bits of guest range `[guestOffset, guestOffset + length)` (when enabled). */
  mark(guestOffset: number, length: number): void {
    if (this.enabled) this.setGuestRange(guestOffset, length);
  }

  /** Sets the bits of guest range `[guestOffset, guestOffset + length)`, enabled or not (a merge). */
  setGuestRange(guestOffset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(guestOffset / this.granularity);
    const end = Math.min(this.#bits, Math.floor((guestOffset + length - 1) / this.granularity) + 1);
    if (first < end) this.setBits(first, end);
  }

  /** Sets bits `[first, end)`. */
  setBits(first: number, end: number): void {
    let bit = first;
    while (bit < end) {
      const chunk = Math.floor(bit / this.chunkBits);
      const chunkStart = chunk * this.chunkBits;
      const stop = Math.min(end, chunkStart + this.chunkBits);
      let bytes = this.#touched.get(chunk);
      if (bytes === undefined) {
        bytes = new Uint8Array(this.#chunkBytes);
        this.#touched.set(chunk, bytes);
      }
      setRange(bytes, bit - chunkStart, stop - chunkStart);
      bit = stop;
    }
  }

  /** Follows a guest size change: bits past a smaller size are dropped, a larger one adds clear bits. */
  resize(guestSize: number): void {
    const bits = Math.ceil(guestSize / this.granularity);
    if (bits < this.#bits) {
      const lastChunk = Math.floor(bits / this.chunkBits);
      for (const [chunk, bytes] of this.#touched) {
        if (chunk > lastChunk || (chunk === lastChunk && bits % this.chunkBits === 0)) {
          this.#touched.delete(chunk);
        } else if (chunk === lastChunk) {
          clearFrom(bytes, bits - chunk * this.chunkBits);
        }
      }
      this.#storedValidBits = Math.min(this.#storedValidBits, bits);
    }
    this.#bits = bits;
  }

  /**
   * Whether chunk `chunk`'s stored content changes: bits were set there, or a stored part (`stored`
   * is its table entry: 0 all zeros, anything else some bits) reaches past the still-valid bits.
   */
  chunkChanged(chunk: number, stored: number): boolean {
    if (this.#touched.has(chunk)) return true;
    return stored !== 0 && (chunk + 1) * this.chunkBits > this.#storedValidBits;
  }

  /**
   * Chunk `chunk`'s new content: the stored bits (`stored`: the data cluster read back, 'ones' for
   * an all-ones entry, undefined for all zeros) that are still valid, with the bits set since opening.
   * Undefined when every bit is clear.
   */
  compose(chunk: number, stored: Uint8Array | 'ones' | undefined): Uint8Array | undefined {
    const result = new Uint8Array(this.#chunkBytes);
    const chunkStart = chunk * this.chunkBits;
    const validEnd = Math.min(this.chunkBits, Math.max(0, this.#storedValidBits - chunkStart));
    if (stored === 'ones') {
      setRange(result, 0, validEnd);
    } else if (stored !== undefined) {
      result.set(stored.subarray(0, Math.ceil(validEnd / 8)));
      clearFrom(result, validEnd);
    }
    const touched = this.#touched.get(chunk);
    if (touched !== undefined) {
      for (let index = 0; index < result.length; index++) result[index]! |= touched[index]!;
    }
    const bitEnd = Math.min(this.chunkBits, this.#bits - chunkStart);
    clearFrom(result, Math.max(0, bitEnd));
    return result.some((byte) => byte !== 0) ? result : undefined;
  }

  /** Clears every bit (stored ones included). */
  clear(): void {
    this.#touched.clear();
    this.#storedValidBits = 0;
  }

  /** After storing: the stored bitmap is the whole truth again. */
  stored(): void {
    this.#touched.clear();
    this.#storedValidBits = this.#bits;
  }
}

/** Sets bits `[from, to)` of `bytes` (least significant bit first). */
function setRange(bytes: Uint8Array, from: number, to: number): void {
  let bit = from;
  while (bit < to && bit % 8 !== 0) {
    bytes[bit >> 3]! |= 1 << (bit & 7);
    bit++;
  }
  const wholeEnd = to - (to % 8);
  if (bit < wholeEnd) {
    bytes.fill(0xff, bit >> 3, wholeEnd >> 3);
    bit = wholeEnd;
  }
  for (; bit < to; bit++) bytes[bit >> 3]! |= 1 << (bit & 7);
}

/** Clears bits `[from, end)` of `bytes`. */
function clearFrom(bytes: Uint8Array, from: number): void {
  if (from >= bytes.length * 8) return;
  const byte = from >> 3;
  const keep = from & 7;
  if (keep !== 0) {
    bytes[byte]! &= (1 << keep) - 1;
    bytes.fill(0, byte + 1);
  } else {
    bytes.fill(0, byte);
  }
}
