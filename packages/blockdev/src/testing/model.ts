/**
 * The reference the conformance kit compares devices with: a sparse byte array in 4 KiB pages
 * (so a model of a 4 GiB device costs memory only for what was touched), plus, per byte, whether
 * it may also read as zero (after a discard on a device whose discard need not zero).
 *
 * Deliberately simple and independent of the devices it judges.
 */

const PAGE_SIZE = 4096;

class SparseBytes {
  readonly #pages = new Map<number, Uint8Array>();

  get(offset: number, length: number): Uint8Array {
    const out = new Uint8Array(length);
    for (let position = offset; position < offset + length; ) {
      const pageIndex = Math.floor(position / PAGE_SIZE);
      const inPage = position - pageIndex * PAGE_SIZE;
      const count = Math.min(PAGE_SIZE - inPage, offset + length - position);
      const page = this.#pages.get(pageIndex);
      if (page !== undefined) out.set(page.subarray(inPage, inPage + count), position - offset);
      position += count;
    }
    return out;
  }

  set(offset: number, data: Uint8Array): void {
    for (let position = offset; position < offset + data.length; ) {
      const pageIndex = Math.floor(position / PAGE_SIZE);
      const inPage = position - pageIndex * PAGE_SIZE;
      const count = Math.min(PAGE_SIZE - inPage, offset + data.length - position);
      let page = this.#pages.get(pageIndex);
      if (page === undefined) {
        page = new Uint8Array(PAGE_SIZE);
        this.#pages.set(pageIndex, page);
      }
      page.set(data.subarray(position - offset, position - offset + count), inPage);
      position += count;
    }
  }

  fill(offset: number, length: number, value: number): void {
    for (let position = offset; position < offset + length; ) {
      const pageIndex = Math.floor(position / PAGE_SIZE);
      const inPage = position - pageIndex * PAGE_SIZE;
      const count = Math.min(PAGE_SIZE - inPage, offset + length - position);
      let page = this.#pages.get(pageIndex);
      if (page === undefined && value !== 0) {
        page = new Uint8Array(PAGE_SIZE);
        this.#pages.set(pageIndex, page);
      }
      page?.fill(value, inPage, inPage + count);
      position += count;
    }
  }

  /** Forgets everything at or past `size`. */
  truncate(size: number): void {
    const lastPage = Math.floor(size / PAGE_SIZE);
    for (const pageIndex of [...this.#pages.keys()]) {
      if (pageIndex > lastPage) this.#pages.delete(pageIndex);
    }
    this.#pages.get(lastPage)?.fill(0, size - lastPage * PAGE_SIZE);
  }
}

/** What a device should contain. */
export class DeviceModel {
  size: number;
  readonly #bytes = new SparseBytes();
  /** 1 where the byte may read as its value, as zero, or as the initial content (after a discard
   * on a device whose discard need not zero, or that shows a lower layer through). */
  readonly #mayBeZero = new SparseBytes();
  readonly #initial = new SparseBytes();

  constructor(size: number, content?: Uint8Array) {
    this.size = size;
    if (content !== undefined) {
      this.#bytes.set(0, content);
      this.#initial.set(0, content);
    }
  }

  write(offset: number, data: Uint8Array): void {
    this.#bytes.set(offset, data);
    this.#mayBeZero.fill(offset, data.length, 0);
  }

  zero(offset: number, length: number): void {
    this.#bytes.fill(offset, length, 0);
    this.#mayBeZero.fill(offset, length, 0);
  }

  /** A discard whose range may keep its old bytes, read as zeros, or show the initial content. */
  discardMaybe(offset: number, length: number): void {
    this.#mayBeZero.fill(offset, length, 1);
  }

  resize(newSize: number): void {
    if (newSize < this.size) {
      this.#bytes.truncate(newSize);
      this.#mayBeZero.truncate(newSize);
      // The initial content is kept: a layered device's lower layer outlives a shrink, and a
      // discard after growing again may show it (where the device's discard does not zero).
    }
    this.size = newSize;
  }

  /** Index (relative to `offset`) of the first byte of `actual` the model does not allow, or -1. */
  firstMismatch(offset: number, actual: Uint8Array): number {
    const expected = this.#bytes.get(offset, actual.length);
    const mayBeZero = this.#mayBeZero.get(offset, actual.length);
    const initial = this.#initial.get(offset, actual.length);
    for (let index = 0; index < actual.length; index++) {
      const got = actual[index]!;
      if (got === expected[index]) continue;
      if (mayBeZero[index] === 1 && (got === 0 || got === initial[index])) continue;
      return index;
    }
    return -1;
  }

  expected(offset: number, length: number): Uint8Array {
    return this.#bytes.get(offset, length);
  }

  /** True when every byte in the range may read as zero (so a device may call it zero). */
  mayAllBeZero(offset: number, length: number): boolean {
    const bytes = this.#bytes.get(offset, length);
    const mayBeZero = this.#mayBeZero.get(offset, length);
    for (let index = 0; index < length; index++) {
      if (bytes[index] !== 0 && mayBeZero[index] !== 1) return false;
    }
    return true;
  }
}
