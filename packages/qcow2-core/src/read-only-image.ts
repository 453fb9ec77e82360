/**
 * Shared BlockDevice plumbing for the read-only image formats (qcow2 and qcow v1): argument
 * checks, EROFS for every write, read windows, blockStatus bounds, closing the layers below.
 */
import {
  assertOpen,
  type BlockDevice,
  type BlockDeviceCapabilities,
  BlockDeviceError,
  type Extent,
  type RequestKind,
  type RequestOptions,
  throwIfAborted,
  validateRange,
  type WriteOptions,
} from '@qcowkit/blockdev';
import { readSegments, type SegmentSource, segmentsToExtents } from './mapping/read-segments.js';
import type { Segment } from './mapping/segment.js';

/** Guest bytes mapped at once by one read (bounds the size of a read plan). */
const READ_WINDOW = 64 * 1024 * 1024;
/** L2 entries examined by one blockStatus call at most. */
const BLOCK_STATUS_MAX_ENTRIES = 65536;

export abstract class ReadOnlyImage implements BlockDevice {
  abstract readonly size: number;
  abstract readonly description: string;
  /** Always true here; a writable subclass overrides it. */
  get readOnly(): boolean {
    return true;
  }
  abstract readonly capabilities: BlockDeviceCapabilities;
  #closed = false;
  /** Requests in flight, and what `close` waits on until they are done. */
  #inFlight = 0;
  #drained: (() => void) | undefined;
  readonly #settled = (): void => {
    this.#inFlight--;
    if (this.#inFlight === 0 && this.#drained !== undefined) {
      const drained = this.#drained;
      this.#drained = undefined;
      drained();
    }
  };

  /** Segments of `[guestOffset, guestOffset + length)` (or a prefix when `maxEntries` is reached). */
  protected abstract mapRange(guestOffset: number, length: number, maxEntries?: number): Promise<Segment[]>;
  protected abstract segmentSource(): SegmentSource;
  /** Devices this image owns and closes with itself (file, data file, backing). */
  protected abstract ownedDevices(): (BlockDevice | undefined)[];

  /**
   * The fast path of small reads: a read of the data device straight into `buffer` when
   * `[guestOffset, guestOffset + buffer.length)` (inside the image, not empty) maps to one host
   * range known without waiting; undefined sends the read down the general path. Must not throw.
   */
  protected directRead(_buffer: Uint8Array, _guestOffset: number): Promise<void> | undefined {
    return undefined;
  }

  /** Whether blockStatus asks the data's device for holes under data runs (default no). */
  protected recurseIntoData(): Promise<boolean> {
    return Promise.resolve(false);
  }

  protected get closed(): boolean {
    return this.#closed;
  }

  #track<T>(promise: Promise<T>): Promise<T> {
    this.#inFlight++;
    promise.then(this.#settled, this.#settled);
    return promise;
  }

  async read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    validateRange(this.size, offset, length, 'read');
    const buffer = new Uint8Array(length);
    await this.readInto(buffer, offset, options);
    return buffer;
  }

  readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    // Without a signal (checked again after the I/O on the general path), a valid non-empty read
    // may take the fast path: no plan, no segments, one read of the device.
    if (
      options?.signal === undefined &&
      !this.#closed &&
      buffer.length > 0 &&
      Number.isSafeInteger(offset) &&
      offset >= 0 &&
      offset + buffer.length <= this.size
    ) {
      const direct = this.directRead(buffer, offset);
      if (direct !== undefined) return this.#track(direct);
    }
    return this.#track(this.#readInto(buffer, offset, options));
  }

  async #readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    assertOpen(this.#closed, this.description, 'read');
    validateRange(this.size, offset, buffer.length, 'read');
    throwIfAborted(options?.signal);
    const source = this.segmentSource();
    for (let windowStart = 0; windowStart < buffer.length; windowStart += READ_WINDOW) {
      const windowLength = Math.min(READ_WINDOW, buffer.length - windowStart);
      const segments = await this.mapRange(offset + windowStart, windowLength);
      await readSegments(
        source,
        buffer.subarray(windowStart, windowStart + windowLength),
        offset + windowStart,
        segments,
        options,
      );
      throwIfAborted(options?.signal);
    }
  }

  blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    return this.#track(this.#blockStatus(offset, length, options));
  }

  async #blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    assertOpen(this.#closed, this.description, 'blockStatus');
    validateRange(this.size, offset, length, 'blockStatus');
    if (length === 0) return [];
    throwIfAborted(options?.signal);
    const segments = await this.mapRange(offset, length, BLOCK_STATUS_MAX_ENTRIES);
    const recurseIntoData = await this.recurseIntoData();
    return segmentsToExtents(segments, { ...this.segmentSource(), recurseIntoData }, options);
  }

  /** Bounds are checked first (EINVAL / ENOSPC as for any device), then EROFS. */
  async #readOnly(kind: RequestKind | 'resize', offset: number, length: number): Promise<never> {
    assertOpen(this.#closed, this.description, kind);
    if (kind !== 'resize') validateRange(this.size, offset, length, kind);
    throw new BlockDeviceError('EROFS', `${kind}: ${this.description} is read-only`);
  }

  write(offset: number, data: Uint8Array, _options?: WriteOptions): Promise<void> {
    return this.#readOnly('write', offset, data.length);
  }

  writeZeroes(offset: number, length: number, _options?: WriteOptions): Promise<void> {
    return this.#readOnly('writeZeroes', offset, length);
  }

  discard(offset: number, length: number, _options?: RequestOptions): Promise<void> {
    return this.#readOnly('discard', offset, length);
  }

  resize(_newSize: number): Promise<void> {
    return this.#readOnly('resize', 0, 0);
  }

  async flush(_options?: RequestOptions): Promise<void> {
    assertOpen(this.#closed, this.description, 'flush');
  }

  /** Waits for requests in flight, then closes the file, the data file and the backing chain. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#inFlight > 0) {
      await new Promise<void>((resolve) => {
        this.#drained = resolve;
      });
    }
    const seen = new Set<BlockDevice>();
    for (const device of this.ownedDevices()) {
      if (device === undefined || seen.has(device)) continue;
      seen.add(device);
      await device.close();
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
