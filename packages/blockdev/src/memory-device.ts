/**
 * A sparse in-memory block device: a map of fixed-size chunks, where a chunk that was never
 * written, or that became all zeros, takes no memory. A 1 PiB device costs memory only for what
 * was written to it.
 */
import type {
  BlockDevice,
  BlockDeviceCapabilities,
  Extent,
  RequestOptions,
  WriteOptions,
  WriteZeroesOptions,
} from './block-device.js';
import { BlockDeviceError } from './errors.js';
import {
  appendExtent,
  assertOpen,
  assertWritable,
  throwIfAborted,
  validateRange,
  validateSize,
} from './range.js';

export interface MemoryBlockDeviceOptions {
  /** Refuse writes, zeroes, discards and resizes with `EROFS`. */
  readonly readOnly?: boolean;
  /** Bytes per chunk, a power of two between 512 B and 16 MiB (default 64 KiB). */
  readonly chunkSize?: number;
  /** Shown in error messages (default `memory`). */
  readonly description?: string;
}

const DEFAULT_CHUNK_SIZE = 64 * 1024;
const MIN_CHUNK_SIZE = 512;
const MAX_CHUNK_SIZE = 16 * 1024 * 1024;
const MAXIMUM_TRANSFER = 32 * 1024 * 1024;

function isPowerOfTwo(value: number): boolean {
  return Number.isSafeInteger(value) && value > 0 && (value & (value - 1)) === 0;
}

function isAllZero(bytes: Uint8Array): boolean {
  // Compare eight bytes at a time where the buffer is aligned for it.
  let index = 0;
  if (bytes.byteOffset % 8 === 0 && bytes.length >= 64) {
    const words = new BigUint64Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 3);
    for (const word of words) if (word !== 0n) return false;
    index = words.length * 8;
  }
  for (; index < bytes.length; index++) if (bytes[index] !== 0) return false;
  return true;
}

export class MemoryBlockDevice implements BlockDevice {
  readonly readOnly: boolean;
  readonly capabilities: BlockDeviceCapabilities;
  readonly description: string;
  readonly chunkSize: number;
  #size: number;
  #closed = false;
  /** chunkIndex -> chunk bytes (always `chunkSize` long). Absent chunks read as zeros. */
  readonly #chunks = new Map<number, Uint8Array>();

  constructor(size: number, options: MemoryBlockDeviceOptions = {}) {
    validateSize(size, 'MemoryBlockDevice size');
    const chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    if (!isPowerOfTwo(chunkSize) || chunkSize < MIN_CHUNK_SIZE || chunkSize > MAX_CHUNK_SIZE) {
      throw new BlockDeviceError(
        'EINVAL',
        `MemoryBlockDevice chunkSize: ${chunkSize} is not a power of two between ${MIN_CHUNK_SIZE} and ${MAX_CHUNK_SIZE}`,
      );
    }
    this.#size = size;
    this.chunkSize = chunkSize;
    this.readOnly = options.readOnly ?? false;
    this.description = options.description ?? 'memory';
    this.capabilities = {
      discard: true,
      writeZeroes: true,
      fastZero: true,
      blockStatus: true,
      flush: false,
      fua: false,
      resize: true,
      minimumAlignment: 1,
      preferredAlignment: chunkSize,
      maximumTransfer: MAXIMUM_TRANSFER,
    };
  }

  /** A device holding a copy of `bytes` (its size is `bytes.length`). */
  static from(bytes: Uint8Array, options: MemoryBlockDeviceOptions = {}): MemoryBlockDevice {
    const device = new MemoryBlockDevice(bytes.length, options);
    device.#store(0, bytes);
    return device;
  }

  get size(): number {
    return this.#size;
  }

  /** Bytes of memory held by chunks (a measure of sparseness). */
  get allocatedBytes(): number {
    return this.#chunks.size * this.chunkSize;
  }

  async read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    this.#check('read', options);
    validateRange(this.#size, offset, length, 'read');
    const buffer = new Uint8Array(length);
    this.#load(offset, buffer);
    return buffer;
  }

  async readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    this.#check('read', options);
    validateRange(this.#size, offset, buffer.length, 'read');
    this.#load(offset, buffer);
  }

  async write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    this.#check('write', options);
    assertWritable(this, 'write');
    validateRange(this.#size, offset, data.length, 'write');
    this.#store(offset, data);
  }

  async writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    this.#check('writeZeroes', options);
    assertWritable(this, 'writeZeroes');
    validateRange(this.#size, offset, length, 'writeZeroes');
    this.#zero(offset, length);
  }

  async discard(offset: number, length: number, options?: RequestOptions): Promise<void> {
    this.#check('discard', options);
    assertWritable(this, 'discard');
    validateRange(this.#size, offset, length, 'discard');
    this.#zero(offset, length);
  }

  async flush(options?: RequestOptions): Promise<void> {
    this.#check('flush', options);
  }

  async blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    this.#check('blockStatus', options);
    validateRange(this.#size, offset, length, 'blockStatus');
    const extents: Extent[] = [];
    const end = offset + length;
    let position = offset;
    for (const chunkIndex of this.#chunkIndexesIn(offset, end)) {
      const chunkStart = Math.max(chunkIndex * this.chunkSize, offset);
      if (chunkStart > position) appendExtent(extents, hole(position, chunkStart - position));
      const chunkEnd = Math.min((chunkIndex + 1) * this.chunkSize, end);
      appendExtent(extents, {
        offset: chunkStart,
        length: chunkEnd - chunkStart,
        zero: false,
        data: true,
        present: true,
        depth: 0,
      });
      position = chunkEnd;
    }
    if (position < end) appendExtent(extents, hole(position, end - position));
    return extents;
  }

  async resize(newSize: number): Promise<void> {
    this.#check('resize');
    assertWritable(this, 'resize');
    validateSize(newSize, 'resize');
    if (newSize < this.#size) {
      // Forget everything past the new end so that growing again reads zeros there.
      const lastChunk = Math.floor(newSize / this.chunkSize);
      for (const chunkIndex of [...this.#chunks.keys()]) {
        if (chunkIndex > lastChunk) this.#chunks.delete(chunkIndex);
      }
      const tail = this.#chunks.get(lastChunk);
      if (tail !== undefined) {
        tail.fill(0, newSize - lastChunk * this.chunkSize);
        if (isAllZero(tail)) this.#chunks.delete(lastChunk);
      }
    }
    this.#size = newSize;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#chunks.clear();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  #check(kind: string, options?: RequestOptions): void {
    assertOpen(this.#closed, this.description, kind);
    throwIfAborted(options?.signal);
  }

  /** Copies `[offset, offset + buffer.length)` into `buffer`. */
  #load(offset: number, buffer: Uint8Array): void {
    const end = offset + buffer.length;
    let position = offset;
    while (position < end) {
      const chunkIndex = Math.floor(position / this.chunkSize);
      const inChunk = position - chunkIndex * this.chunkSize;
      const count = Math.min(this.chunkSize - inChunk, end - position);
      const chunk = this.#chunks.get(chunkIndex);
      const target = position - offset;
      if (chunk === undefined) buffer.fill(0, target, target + count);
      else buffer.set(chunk.subarray(inChunk, inChunk + count), target);
      position += count;
    }
  }

  /** Copies `data` to `offset`, keeping all-zero chunks unallocated. */
  #store(offset: number, data: Uint8Array): void {
    const end = offset + data.length;
    let position = offset;
    while (position < end) {
      const chunkIndex = Math.floor(position / this.chunkSize);
      const inChunk = position - chunkIndex * this.chunkSize;
      const count = Math.min(this.chunkSize - inChunk, end - position);
      const piece = data.subarray(position - offset, position - offset + count);
      const chunk = this.#chunks.get(chunkIndex);
      if (isAllZero(piece)) {
        if (chunk !== undefined) {
          chunk.fill(0, inChunk, inChunk + count);
          if (isAllZero(chunk)) this.#chunks.delete(chunkIndex);
        }
      } else if (chunk === undefined) {
        const fresh = new Uint8Array(this.chunkSize);
        fresh.set(piece, inChunk);
        this.#chunks.set(chunkIndex, fresh);
      } else {
        chunk.set(piece, inChunk);
      }
      position += count;
    }
  }

  /** Zeroes `[offset, offset + length)`, dropping chunks that end up all zeros. */
  #zero(offset: number, length: number): void {
    const end = offset + length;
    for (const chunkIndex of this.#chunkIndexesIn(offset, end)) {
      const chunkStart = chunkIndex * this.chunkSize;
      const from = Math.max(offset, chunkStart) - chunkStart;
      const to = Math.min(end, chunkStart + this.chunkSize) - chunkStart;
      const chunk = this.#chunks.get(chunkIndex);
      if (chunk === undefined) continue;
      if (from === 0 && to === this.chunkSize) {
        this.#chunks.delete(chunkIndex);
      } else {
        chunk.fill(0, from, to);
        if (isAllZero(chunk)) this.#chunks.delete(chunkIndex);
      }
    }
  }

  /** Indexes of allocated chunks overlapping `[offset, end)`, ascending. Costs time in the number of
   * allocated chunks or of chunks in the range, whichever is smaller, never in the device size. */
  #chunkIndexesIn(offset: number, end: number): number[] {
    if (end <= offset) return [];
    const first = Math.floor(offset / this.chunkSize);
    const last = Math.floor((end - 1) / this.chunkSize);
    if (last - first + 1 <= this.#chunks.size) {
      const found: number[] = [];
      for (let chunkIndex = first; chunkIndex <= last; chunkIndex++) {
        if (this.#chunks.has(chunkIndex)) found.push(chunkIndex);
      }
      return found;
    }
    const found: number[] = [];
    for (const chunkIndex of this.#chunks.keys()) {
      if (chunkIndex >= first && chunkIndex <= last) found.push(chunkIndex);
    }
    return found.sort((a, b) => a - b);
  }
}

function hole(offset: number, length: number): Extent {
  return { offset, length, zero: true, data: false, present: false, depth: 0 };
}
