/**
 * Finds the runs of set bits of a bitmap fed to it in order, a piece at a time (a whole bitmap, or
 * one bitmap cluster after another), merging runs across pieces. Scans a byte at a time, skipping
 * whole clear bytes outside a run and whole set bytes inside one, so a sparse bitmap of 2^32 bits
 * takes a few seconds at most.
 */
export class SetBitRuns {
  readonly #onRun: (firstBit: number, endBit: number) => void;
  /** The first bit of the open run, or -1. */
  #start = -1;

  /** `onRun(firstBit, endBit)` is called for every run `[firstBit, endBit)`, in order. */
  constructor(onRun: (firstBit: number, endBit: number) => void) {
    this.#onRun = onRun;
  }

  /** Bits from `firstBit` up to the next piece are all set (`set`) or all clear. */
  uniform(firstBit: number, set: boolean): void {
    this.#at(firstBit, set);
  }

  /** Bits `[firstBit, endBit)` are the bits of `bytes` (bit `i` is byte `i >> 3`, bit `i & 7`). */
  scan(bytes: Uint8Array, firstBit: number, endBit: number): void {
    const byteCount = Math.ceil((endBit - firstBit) / 8);
    for (let index = 0; index < byteCount; index++) {
      const byte = bytes[index]!;
      if ((byte === 0 && this.#start < 0) || (byte === 0xff && this.#start >= 0)) continue;
      const base = firstBit + index * 8;
      for (let bit = 0; bit < 8 && base + bit < endBit; bit++)
        this.#at(base + bit, (byte & (1 << bit)) !== 0);
    }
  }

  /** The bitmap ends at `bitCount`: closes the open run. */
  end(bitCount: number): void {
    if (this.#start >= 0) this.#onRun(this.#start, bitCount);
    this.#start = -1;
  }

  #at(bit: number, set: boolean): void {
    if (set && this.#start < 0) this.#start = bit;
    else if (!set && this.#start >= 0) {
      this.#onRun(this.#start, bit);
      this.#start = -1;
    }
  }
}
