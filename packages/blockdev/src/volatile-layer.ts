/**
 * Changes held in memory above a device and not yet applied to it: what a disk's volatile write
 * cache holds. Byte ranges map to the latest change that covered them (data, zeroes or discard);
 * data bytes live in sparse 4 KiB pages. Recording is synchronous, so a change is either wholly
 * in a layer or not at all.
 */
import type { BlockDevice } from './block-device.js';
import { RunMap } from './run-map.js';

export type VolatileChangeKind = 'write' | 'writeZeroes' | 'writeZeroesUnmap' | 'discard';

const PAGE_SIZE = 4096;

export class VolatileLayer {
  readonly #kinds = new RunMap<VolatileChangeKind>();
  readonly #pages = new Map<number, Uint8Array>();
  #changes = 0;

  /** Changes recorded (not bytes, not ranges). */
  get changes(): number {
    return this.#changes;
  }

  write(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
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
    this.#kinds.set(offset, offset + data.length, 'write');
    this.#changes++;
  }

  /** Records a zeroing change (writeZeroes, with or without unmap, or discard). */
  zero(offset: number, length: number, kind: Exclude<VolatileChangeKind, 'write'>): void {
    if (length === 0) return;
    this.#kinds.set(offset, offset + length, kind);
    this.#changes++;
  }

  /** Lays the layer's bytes over `buffer`, which holds what lies below from `offset` on. */
  overlay(buffer: Uint8Array, offset: number): void {
    for (const run of this.#kinds.runs(offset, offset + buffer.length)) {
      if (run.value === undefined) continue;
      if (run.value === 'write') buffer.set(this.#read(run.start, run.end - run.start), run.start - offset);
      else buffer.fill(0, run.start - offset, run.end - offset);
    }
  }

  /** True when some change covers a byte of `[offset, end)`. */
  touches(offset: number, end: number): boolean {
    return this.#kinds.runs(offset, end).some((run) => run.value !== undefined);
  }

  /** Copies every change of `newer` over this layer (newer wins). */
  absorb(newer: VolatileLayer): void {
    for (const run of newer.#kinds.entries()) {
      if (run.value === 'write') this.write(run.start, newer.#read(run.start, run.end - run.start));
      else this.zero(run.start, run.end - run.start, run.value as Exclude<VolatileChangeKind, 'write'>);
    }
  }

  /** Applies the layer to `device` in address order, one request per run; `stop()` is asked
   * before each request and ends the walk early when true. Returns false when stopped. */
  async applyTo(device: BlockDevice, stop: () => boolean): Promise<boolean> {
    for (const run of this.#kinds.entries()) {
      if (stop()) return false;
      const length = run.end - run.start;
      switch (run.value) {
        case 'write':
          await device.write(run.start, this.#read(run.start, length));
          break;
        case 'writeZeroes':
          await device.writeZeroes(run.start, length);
          break;
        case 'writeZeroesUnmap':
          await device.writeZeroes(run.start, length, { mayUnmap: true });
          break;
        case 'discard':
          await device.discard(run.start, length);
          break;
      }
    }
    return !stop();
  }

  #read(offset: number, length: number): Uint8Array {
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
}
