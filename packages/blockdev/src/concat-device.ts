/**
 * ConcatBlockDevice: several devices read one after the other as one read-only device, as
 * `qemu-img convert A B C OUT` reads its sources: part 0's bytes first, then part 1's from where
 * part 0 ends, and so on. Each part keeps its own size (no padding between parts).
 *
 * Reads crossing a boundary are split and sent to each part at the part's own offsets. Block
 * status is the part's, with guest offsets shifted by where the part starts; `depth`, `present`,
 * `compressed` and `hostOffset` pass through unchanged, so a `hostOffset` names a position in the
 * storage of the part holding the extent (`partAt` tells which). One `blockStatus` call answers
 * from one part only, so no answer mixes two parts' storage; callers that merge extents across
 * calls (`blockStatusAll`) may still join extents of two parts, and must not use their
 * `hostOffset` then.
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
import { assertOpen, assertWritable, throwIfAborted, validateRange } from './range.js';

export interface ConcatBlockDeviceOptions {
  /** Close every part when this device is closed (default true). */
  readonly closeParts?: boolean;
  /** Shown in error messages (default `concat(PART, PART, ...)` of the parts' descriptions). */
  readonly description?: string;
}

/** Where a guest offset of a {@link ConcatBlockDevice} lies. */
export interface ConcatPart {
  /** The part's position in the list given to the constructor. */
  readonly index: number;
  readonly device: BlockDevice;
  /** Guest offset of the part's first byte. */
  readonly start: number;
  /** The part's size when the concatenation was made (its share of the guest). */
  readonly size: number;
}

/** The largest power of two, at most `limit`, that divides every one of `offsets`. */
function commonAlignment(limit: number, offsets: readonly number[]): number {
  let alignment = limit;
  while (alignment > 1 && offsets.some((offset) => offset % alignment !== 0)) alignment /= 2;
  return alignment;
}

export class ConcatBlockDevice implements BlockDevice {
  readonly size: number;
  readonly readOnly = true;
  readonly capabilities: BlockDeviceCapabilities;
  readonly description: string;
  /** The parts with their sizes and guest offsets, in order (parts of size 0 included). */
  readonly parts: readonly ConcatPart[];
  readonly #closeParts: boolean;
  /** Parts holding at least one byte, for lookups (a part of size 0 never answers). */
  readonly #nonEmpty: readonly ConcatPart[];
  readonly #inFlight = new Set<Promise<unknown>>();
  #closed = false;

  /** `parts` in guest order; their sizes are read now and must not change while this is used. */
  constructor(parts: readonly BlockDevice[], options: ConcatBlockDeviceOptions = {}) {
    let start = 0;
    const placed: ConcatPart[] = [];
    for (const [index, device] of parts.entries()) {
      const size = device.size;
      if (!Number.isSafeInteger(size) || size < 0) {
        throw new BlockDeviceError('EINVAL', `ConcatBlockDevice: part ${index} has an invalid size ${size}`);
      }
      if (start + size > Number.MAX_SAFE_INTEGER) {
        throw new BlockDeviceError('EINVAL', 'ConcatBlockDevice: the parts together exceed 2^53 - 1 bytes');
      }
      placed.push({ index, device, start, size });
      start += size;
    }
    this.parts = placed;
    this.#nonEmpty = placed.filter((part) => part.size > 0);
    this.size = start;
    this.#closeParts = options.closeParts ?? true;
    this.description =
      options.description ?? `concat(${parts.map((device) => device.description).join(', ')})`;
    const starts = placed.map((part) => part.start);
    const minimum = commonAlignment(
      Math.max(1, ...parts.map((device) => device.capabilities.minimumAlignment)),
      starts,
    );
    const preferred = Math.max(
      minimum,
      commonAlignment(Math.max(1, ...parts.map((device) => device.capabilities.preferredAlignment)), starts),
    );
    this.capabilities = {
      discard: false,
      writeZeroes: false,
      fastZero: false,
      blockStatus: parts.some((device) => device.capabilities.blockStatus),
      flush: false,
      fua: false,
      resize: false,
      minimumAlignment: minimum,
      preferredAlignment: preferred,
      maximumTransfer: Math.max(
        1,
        Math.min(...parts.map((device) => device.capabilities.maximumTransfer), 32 * 1024 * 1024),
      ),
    };
  }

  /** The part holding guest byte `offset` (`offset` < size), found by binary search. */
  partAt(offset: number): ConcatPart {
    if (!Number.isSafeInteger(offset) || offset < 0 || offset >= this.size) {
      throw new BlockDeviceError('EINVAL', `partAt: offset ${offset} is not inside ${this.description}`);
    }
    const parts = this.#nonEmpty;
    let low = 0;
    let high = parts.length - 1;
    while (low < high) {
      const middle = (low + high + 1) >>> 1;
      if (parts[middle]!.start <= offset) low = middle;
      else high = middle - 1;
    }
    return parts[low]!;
  }

  async read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    validateRange(this.size, offset, length, 'read');
    const buffer = new Uint8Array(length);
    await this.readInto(buffer, offset, options);
    return buffer;
  }

  readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    return this.#track('read', async () => {
      validateRange(this.size, offset, buffer.length, 'read');
      throwIfAborted(options?.signal);
      const reads: Promise<void>[] = [];
      let position = offset;
      const end = offset + buffer.length;
      while (position < end) {
        const part = this.partAt(position);
        const partEnd = Math.min(end, part.start + part.size);
        reads.push(
          part.device.readInto(
            buffer.subarray(position - offset, partEnd - offset),
            position - part.start,
            options,
          ),
        );
        position = partEnd;
      }
      if (reads.length === 1) return reads[0];
      // Every read settles before this does (the buffer is the caller's again afterwards).
      const results = await Promise.allSettled(reads);
      const failure = results.find((result) => result.status === 'rejected');
      if (failure !== undefined) throw failure.reason;
    });
  }

  write(offset: number, data: Uint8Array, _options?: WriteOptions): Promise<void> {
    return this.#refuse('write', offset, data.length);
  }

  writeZeroes(offset: number, length: number, _options?: WriteZeroesOptions): Promise<void> {
    return this.#refuse('writeZeroes', offset, length);
  }

  discard(offset: number, length: number, _options?: RequestOptions): Promise<void> {
    return this.#refuse('discard', offset, length);
  }

  /** Nothing is ever written through this device: there is nothing to flush. */
  flush(options?: RequestOptions): Promise<void> {
    return this.#track('flush', async () => throwIfAborted(options?.signal));
  }

  /** The extents of the part holding `offset`, shifted to guest offsets, up to that part's end. */
  blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    return this.#track('blockStatus', async () => {
      validateRange(this.size, offset, length, 'blockStatus');
      throwIfAborted(options?.signal);
      if (length === 0) return [];
      const part = this.partAt(offset);
      const local = offset - part.start;
      const extents = await part.device.blockStatus(local, Math.min(length, part.size - local), options);
      if (part.start === 0) return extents;
      return extents.map((extent) => ({ ...extent, offset: extent.offset + part.start }));
    });
  }

  resize(_newSize: number): Promise<void> {
    return this.#track('resize', async () => assertWritable(this, 'resize'));
  }

  /** Waits for requests in flight, then closes the parts (unless `closeParts` is false). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await Promise.allSettled([...this.#inFlight]);
    if (!this.#closeParts) return;
    const results = await Promise.allSettled(this.parts.map((part) => part.device.close()));
    const failure = results.find((result) => result.status === 'rejected');
    if (failure !== undefined) throw failure.reason;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  #refuse(kind: 'write' | 'writeZeroes' | 'discard', offset: number, length: number): Promise<void> {
    return this.#track(kind, async () => {
      validateRange(this.size, offset, length, kind);
      assertWritable(this, kind);
    });
  }

  /** Runs `work` as a request: refused once closed, waited for by close(). */
  #track<T>(kind: string, work: () => Promise<T>): Promise<T> {
    try {
      assertOpen(this.#closed, this.description, kind);
    } catch (error) {
      return Promise.reject(error);
    }
    const promise = work();
    this.#inFlight.add(promise);
    const forget = () => this.#inFlight.delete(promise);
    promise.then(forget, forget);
    return promise;
  }
}
