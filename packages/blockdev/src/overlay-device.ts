/**
 * A copy-on-write overlay: reads fall through to a lower device, writes land in an upper device.
 * The lower device is never written (except by an explicit `commit()`).
 *
 * The overlay works in granules (64 KiB by default). Each granule is either:
 * - unallocated: it reads from the lower device (zeros past the lower device's end);
 * - `data`: the whole granule lives in the upper device;
 * - `zero`: it was zeroed or discarded in the overlay and reads as zeros; the lower device no
 *   longer shows through.
 * A write covering part of an unallocated or zeroed granule first copies the rest of that granule
 * into the upper device, so a granule in the upper device is always complete. Writers that touch
 * the same granules take turns (a range lock in granule units); readers never wait.
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
import { MemoryBlockDevice } from './memory-device.js';
import {
  appendExtent,
  assertOpen,
  assertWritable,
  throwIfAborted,
  validateRange,
  validateSize,
} from './range.js';
import { RangeLock } from './range-lock.js';
import { RunMap } from './run-map.js';

export interface OverlayBlockDeviceOptions {
  /** Where writes go; at least as large as the lower device. Its previous content is ignored.
   * Default: a new sparse {@link MemoryBlockDevice}. */
  readonly upper?: BlockDevice;
  /** Copy-on-write unit in bytes, a power of two between 512 B and 16 MiB (default 64 KiB). */
  readonly granularity?: number;
  /** Refuse writes with `EROFS` (the overlay is then only a view of the lower device). */
  readonly readOnly?: boolean;
  /** Close the lower device when the overlay is closed (default false). */
  readonly closeLower?: boolean;
  /** Close the upper device when the overlay is closed (default: only when the overlay made it). */
  readonly closeUpper?: boolean;
}

type GranuleState = 'data' | 'zero';

const DEFAULT_GRANULARITY = 64 * 1024;
const COMMIT_PIECE = 4 * 1024 * 1024;
/** The whole device in granule units, for operations that lock everything. */
const EVERYTHING = Number.MAX_SAFE_INTEGER;

export class OverlayBlockDevice implements BlockDevice {
  readonly lower: BlockDevice;
  readonly upper: BlockDevice;
  readonly granularity: number;
  readonly readOnly: boolean;
  readonly capabilities: BlockDeviceCapabilities;
  readonly description: string;
  #size: number;
  /** Bytes below this offset may show the lower device; above it unallocated granules read zeros.
   * Starts at the lower device's size and only ever shrinks (a shrink hides the lower's tail). */
  #lowerLimit: number;
  /** granuleIndex -> state; gaps are unallocated. */
  readonly #granules = new RunMap<GranuleState>();
  /** Serializes writers per granule. */
  readonly #lock = new RangeLock();
  readonly #inFlight = new Set<Promise<unknown>>();
  /** Reads in flight (commit waits for them before it empties the upper device). */
  readonly #reads = new Set<Promise<void>>();
  readonly #closeLower: boolean;
  readonly #closeUpper: boolean;
  #closed = false;

  constructor(lower: BlockDevice, options: OverlayBlockDeviceOptions = {}) {
    const granularity = options.granularity ?? DEFAULT_GRANULARITY;
    if (!Number.isSafeInteger(granularity) || granularity < 512 || granularity > 16 * 1024 * 1024) {
      throw new BlockDeviceError('EINVAL', `overlay granularity: ${granularity} is out of range`);
    }
    if ((granularity & (granularity - 1)) !== 0) {
      throw new BlockDeviceError('EINVAL', `overlay granularity: ${granularity} is not a power of two`);
    }
    const upper = options.upper ?? new MemoryBlockDevice(lower.size, { description: 'overlay-upper' });
    if (upper.size < lower.size) {
      throw new BlockDeviceError(
        'EINVAL',
        `overlay upper: ${upper.description} (${upper.size} bytes) is smaller than the lower device (${lower.size} bytes)`,
      );
    }
    this.readOnly = options.readOnly ?? false;
    if (!this.readOnly && upper.readOnly) {
      throw new BlockDeviceError('EROFS', `overlay upper: ${upper.description} is read-only`);
    }
    this.lower = lower;
    this.upper = upper;
    this.granularity = granularity;
    this.#size = lower.size;
    this.#lowerLimit = lower.size;
    this.#closeLower = options.closeLower ?? false;
    this.#closeUpper = options.closeUpper ?? options.upper === undefined;
    this.description = `overlay(${lower.description})`;
    this.capabilities = {
      discard: true,
      writeZeroes: true,
      fastZero: true,
      blockStatus: true,
      flush: upper.capabilities.flush,
      fua: upper.capabilities.fua,
      resize: upper.capabilities.resize,
      minimumAlignment: 1,
      preferredAlignment: granularity,
      maximumTransfer: Math.min(lower.capabilities.maximumTransfer, upper.capabilities.maximumTransfer),
    };
  }

  get size(): number {
    return this.#size;
  }

  /** Bytes of the overlay held in the upper device (granules in state `data`). */
  get allocatedBytes(): number {
    let total = 0;
    for (const run of this.#granules.entries()) {
      if (run.value === 'data') {
        total += Math.min(run.end * this.granularity, this.#size) - run.start * this.granularity;
      }
    }
    return total;
  }

  read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    return this.#run('read', options, async () => {
      validateRange(this.#size, offset, length, 'read');
      const buffer = new Uint8Array(length);
      await this.#load(offset, buffer, options);
      return buffer;
    });
  }

  readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    return this.#run('read', options, async () => {
      validateRange(this.#size, offset, buffer.length, 'read');
      await this.#load(offset, buffer, options);
    });
  }

  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    return this.#run('write', options, async () => {
      assertWritable(this, 'write');
      validateRange(this.#size, offset, data.length, 'write');
      if (data.length === 0) return;
      const end = offset + data.length;
      const firstGranule = Math.floor(offset / this.granularity);
      const endGranule = Math.ceil(end / this.granularity);
      const release = await this.#lock.acquire(firstGranule, endGranule);
      try {
        const upperOptions: WriteOptions = { fua: options?.fua ?? false, signal: options?.signal };
        let directStart = offset;
        let directEnd = end;
        const copies: Promise<void>[] = [];
        if (this.#needsCopy(firstGranule, offset, end)) {
          copies.push(this.#copyOnWrite(firstGranule, offset, data, upperOptions));
          directStart = Math.min(end, this.#granuleEnd(firstGranule));
        }
        const lastGranule = endGranule - 1;
        if (lastGranule !== firstGranule && this.#needsCopy(lastGranule, offset, end)) {
          copies.push(this.#copyOnWrite(lastGranule, offset, data, upperOptions));
          directEnd = lastGranule * this.granularity;
        }
        if (directStart < directEnd) {
          copies.push(
            this.upper.write(
              directStart,
              data.subarray(directStart - offset, directEnd - offset),
              upperOptions,
            ),
          );
        }
        await Promise.all(copies);
        this.#granules.set(firstGranule, endGranule, 'data');
      } finally {
        release();
      }
    });
  }

  writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    return this.#run('writeZeroes', options, async () => {
      assertWritable(this, 'writeZeroes');
      validateRange(this.#size, offset, length, 'writeZeroes');
      await this.#zero(offset, length, options?.fua ?? false);
    });
  }

  /** Discarding in the overlay hides the lower device: the range reads as zeros afterwards. */
  discard(offset: number, length: number, options?: RequestOptions): Promise<void> {
    return this.#run('discard', options, async () => {
      assertWritable(this, 'discard');
      validateRange(this.#size, offset, length, 'discard');
      await this.#zero(offset, length, false);
    });
  }

  flush(options?: RequestOptions): Promise<void> {
    return this.#run('flush', options, async () => {
      await this.upper.flush(options);
    });
  }

  blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    return this.#run('blockStatus', options, async () => {
      validateRange(this.#size, offset, length, 'blockStatus');
      const extents: Extent[] = [];
      if (length === 0) return extents;
      const end = offset + length;
      const g = this.granularity;
      for (const run of this.#granules.runs(Math.floor(offset / g), Math.ceil(end / g))) {
        const from = Math.max(offset, run.start * g);
        const to = Math.min(end, run.end * g);
        if (run.value === 'data') {
          appendExtent(extents, {
            offset: from,
            length: to - from,
            zero: false,
            data: true,
            present: true,
            depth: 0,
          });
          continue;
        }
        if (run.value === 'zero') {
          appendExtent(extents, {
            offset: from,
            length: to - from,
            zero: true,
            data: false,
            present: true,
            depth: 0,
          });
          continue;
        }
        const lowerEnd = Math.min(to, this.#lowerLimit);
        if (from < lowerEnd) {
          const lowerExtents = await this.lower.blockStatus(from, lowerEnd - from, options);
          let position = from;
          for (const extent of lowerExtents) {
            if (extent.offset !== position || extent.length <= 0 || position + extent.length > lowerEnd) {
              throw new BlockDeviceError(
                'EIO',
                `blockStatus: ${this.lower.description} returned a bad extent`,
                {
                  offset: position,
                },
              );
            }
            appendExtent(extents, { ...extent, depth: extent.depth + 1 });
            position += extent.length;
          }
          // The lower device answered part of the range: report what is known, callers loop.
          if (position < lowerEnd || lowerExtents.length === 0) return extents;
        }
        const zerosFrom = Math.max(from, this.#lowerLimit);
        if (zerosFrom < to) {
          appendExtent(extents, {
            offset: zerosFrom,
            length: to - zerosFrom,
            zero: true,
            data: false,
            present: false,
            depth: 1,
          });
        }
      }
      return extents;
    });
  }

  /** Grows (new bytes read as zeros) or shrinks (bytes past the new end are forgotten, and the
   * lower device never shows through there again). Needs an upper device that can resize to grow
   * beyond its size. */
  resize(newSize: number): Promise<void> {
    return this.#run('resize', undefined, async () => {
      assertWritable(this, 'resize');
      validateSize(newSize, 'resize');
      if (!this.capabilities.resize) {
        throw new BlockDeviceError('ENOTSUP', `resize: ${this.upper.description} cannot resize`);
      }
      const release = await this.#lock.acquire(0, EVERYTHING);
      try {
        const g = this.granularity;
        if (newSize < this.#size) {
          const boundary = Math.floor(newSize / g);
          if (newSize % g !== 0 && this.#granules.get(boundary) === 'data') {
            const tailEnd = Math.min(this.#granuleEnd(boundary), this.upper.size);
            await this.upper.writeZeroes(newSize, tailEnd - newSize, { mayUnmap: true });
          }
          this.#granules.set(Math.ceil(newSize / g), EVERYTHING, undefined);
          this.#lowerLimit = Math.min(this.#lowerLimit, newSize);
          this.#size = newSize;
        } else {
          if (this.upper.size < newSize) await this.upper.resize(newSize);
          this.#size = newSize;
        }
      } finally {
        release();
      }
    });
  }

  /**
   * Writes the overlay's changes into the lower device (resizing it when the overlay's size
   * differs), flushes it, and empties the overlay. Needs a writable lower device.
   */
  commit(): Promise<void> {
    return this.#run('commit', undefined, async () => {
      assertWritable(this.lower, 'commit');
      const release = await this.#lock.acquire(0, EVERYTHING);
      try {
        const g = this.granularity;
        if (this.lower.size > this.#size) await this.lower.resize(this.#size);
        const hiddenEnd = Math.min(this.#size, this.lower.size);
        if (this.#lowerLimit < hiddenEnd) {
          await this.lower.writeZeroes(this.#lowerLimit, hiddenEnd - this.#lowerLimit);
        }
        if (this.lower.size < this.#size) await this.lower.resize(this.#size);
        for (const run of this.#granules.entries()) {
          const from = run.start * g;
          const to = Math.min(run.end * g, this.#size);
          if (from >= to) continue;
          if (run.value === 'zero') {
            await this.lower.writeZeroes(from, to - from);
            continue;
          }
          for (let position = from; position < to; position += COMMIT_PIECE) {
            const piece = await this.upper.read(position, Math.min(COMMIT_PIECE, to - position));
            await this.lower.write(position, piece);
          }
        }
        await this.lower.flush();
        this.#granules.clear();
        this.#lowerLimit = this.#size;
        // Reads that started before may still be reading the upper device: let them finish.
        await Promise.allSettled([...this.#reads]);
        if (this.upper.capabilities.discard && this.upper.size > 0)
          await this.upper.discard(0, this.upper.size);
      } finally {
        release();
      }
    });
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await Promise.allSettled([...this.#inFlight]);
    if (this.#closeUpper) await this.upper.close();
    else await this.upper.flush();
    if (this.#closeLower) await this.lower.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Runs one request: rejects after close, counts it in flight so close() can wait for it. */
  async #run<T>(kind: string, options: RequestOptions | undefined, task: () => Promise<T>): Promise<T> {
    assertOpen(this.#closed, this.description, kind);
    throwIfAborted(options?.signal);
    const promise = task();
    this.#inFlight.add(promise);
    try {
      return await promise;
    } finally {
      this.#inFlight.delete(promise);
    }
  }

  /** End (exclusive) of granule `granuleIndex`, clipped to the device size. */
  #granuleEnd(granuleIndex: number): number {
    return Math.min((granuleIndex + 1) * this.granularity, this.#size);
  }

  /** A write of `[offset, end)` covers only part of the granule, and the granule is not in the upper. */
  #needsCopy(granuleIndex: number, offset: number, end: number): boolean {
    const granuleStart = granuleIndex * this.granularity;
    const covered = offset <= granuleStart && end >= this.#granuleEnd(granuleIndex);
    return !covered && this.#granules.get(granuleIndex) !== 'data';
  }

  /** Copies granule `granuleIndex` into the upper device with the write's bytes merged in. */
  async #copyOnWrite(
    granuleIndex: number,
    offset: number,
    data: Uint8Array,
    upperOptions: WriteOptions,
  ): Promise<void> {
    const granuleStart = granuleIndex * this.granularity;
    const granule = new Uint8Array(this.#granuleEnd(granuleIndex) - granuleStart);
    await this.#load(granuleStart, granule, upperOptions);
    const from = Math.max(offset, granuleStart);
    const to = Math.min(offset + data.length, granuleStart + granule.length);
    granule.set(data.subarray(from - offset, to - offset), from - granuleStart);
    await this.upper.write(granuleStart, granule, upperOptions);
  }

  /** Reads `[offset, offset + buffer.length)` as the overlay shows it. */
  async #load(offset: number, buffer: Uint8Array, options?: RequestOptions): Promise<void> {
    const read = this.#loadNow(offset, buffer, options);
    this.#reads.add(read);
    try {
      await read;
    } finally {
      this.#reads.delete(read);
    }
  }

  async #loadNow(offset: number, buffer: Uint8Array, options?: RequestOptions): Promise<void> {
    if (buffer.length === 0) return;
    const end = offset + buffer.length;
    const g = this.granularity;
    const reads: Promise<void>[] = [];
    for (const run of this.#granules.runs(Math.floor(offset / g), Math.ceil(end / g))) {
      const from = Math.max(offset, run.start * g);
      const to = Math.min(end, run.end * g);
      const target = buffer.subarray(from - offset, to - offset);
      if (run.value === 'data') {
        reads.push(this.upper.readInto(target, from, options));
      } else if (run.value === 'zero') {
        target.fill(0);
      } else {
        const lowerEnd = Math.max(from, Math.min(to, this.#lowerLimit));
        if (lowerEnd > from)
          reads.push(this.lower.readInto(target.subarray(0, lowerEnd - from), from, options));
        target.fill(0, lowerEnd - from);
      }
    }
    await Promise.all(reads);
  }

  /** Makes `[offset, offset + length)` read as zeros. */
  async #zero(offset: number, length: number, fua: boolean): Promise<void> {
    if (length === 0) return;
    const g = this.granularity;
    const end = offset + length;
    const firstGranule = Math.floor(offset / g);
    const endGranule = Math.ceil(end / g);
    const release = await this.#lock.acquire(firstGranule, endGranule);
    try {
      const work: Promise<void>[] = [];
      // Whole granules: drop what the upper holds, then mark them.
      let fullFirst = firstGranule;
      let fullEnd = endGranule;
      if (offset > firstGranule * g || end < this.#granuleEnd(firstGranule)) {
        work.push(this.#zeroPartial(firstGranule, offset, end, fua));
        fullFirst++;
      }
      const lastGranule = endGranule - 1;
      if (lastGranule >= fullFirst && end < this.#granuleEnd(lastGranule)) {
        work.push(this.#zeroPartial(lastGranule, offset, end, fua));
        fullEnd--;
      }
      if (fullFirst < fullEnd) {
        for (const run of this.#granules.runs(fullFirst, fullEnd)) {
          if (run.value === 'data' && this.upper.capabilities.discard) {
            const from = run.start * g;
            work.push(this.upper.discard(from, Math.min(run.end * g, this.#size) - from));
          }
        }
      }
      await Promise.all(work);
      if (fullFirst < fullEnd) {
        // Granules wholly past the lower device read zeros when unallocated: keep them unallocated.
        const pastLower = Math.max(fullFirst, Math.min(fullEnd, Math.ceil(this.#lowerLimit / g)));
        this.#granules.set(fullFirst, pastLower, 'zero');
        this.#granules.set(pastLower, fullEnd, undefined);
      }
      if (fua) await this.upper.flush();
    } finally {
      release();
    }
  }

  /** Zeroes the part of granule `granuleIndex` inside `[offset, end)` (not the whole granule). */
  async #zeroPartial(granuleIndex: number, offset: number, end: number, fua: boolean): Promise<void> {
    const granuleStart = granuleIndex * this.granularity;
    const from = Math.max(offset, granuleStart);
    const to = Math.min(end, this.#granuleEnd(granuleIndex));
    const state = this.#granules.get(granuleIndex);
    if (state === 'zero') return;
    if (state === 'data') {
      await this.upper.writeZeroes(from, to - from, { fua });
      return;
    }
    if (from >= this.#lowerLimit) return;
    await this.#copyOnWrite(granuleIndex, from, new Uint8Array(to - from), { fua });
    this.#granules.set(granuleIndex, granuleIndex + 1, 'data');
  }
}
