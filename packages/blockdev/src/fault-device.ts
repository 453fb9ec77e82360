/**
 * A wrapper that injects faults, for testing what code above a device does when storage fails.
 *
 * - `failAfter: n`: the first `n` requests behave normally; every later request rejects (`EIO`,
 *   or the code in `failWith`). Nothing is lost: it models a device that went away.
 * - `failWhen(request)`: rejects the requests it picks (only writes, only past some offset, only
 *   the 7th operation), with `failWith`.
 * - `crashAfter: n`: models power loss. The wrapper holds every write, writeZeroes and discard in
 *   a volatile layer of its own and applies them to the inner device only at `flush()` (or for a
 *   `fua` write). After `n` requests (or at `crashNow()`) the volatile layer is dropped and every
 *   later request rejects with `EIO`. The inner device then holds exactly what a real disk would
 *   after the crash: everything flushed, nothing else. A flush cut short by the crash may have
 *   applied part of its changes (they are applied in address order, as a disk may reorder writes
 *   between two flushes).
 *
 * Every request counts as one operation: read, readInto, write, writeZeroes, discard, flush,
 * blockStatus, resize.
 */
import type {
  BlockDevice,
  BlockDeviceCapabilities,
  Extent,
  RequestOptions,
  WriteOptions,
  WriteZeroesOptions,
} from './block-device.js';
import { BlockDeviceError, type BlockErrorCode } from './errors.js';
import { appendExtent, assertOpen, assertWritable, throwIfAborted, validateRange } from './range.js';
import { VolatileLayer } from './volatile-layer.js';

/** A request as `failWhen` sees it (`resize` puts the new size in `offset`). */
export interface FaultRequest {
  readonly kind: 'read' | 'write' | 'writeZeroes' | 'discard' | 'flush' | 'blockStatus' | 'resize';
  readonly offset: number;
  readonly length: number;
}

export interface FaultInjectingOptions {
  /** Requests after this many reject with `failWith`. */
  readonly failAfter?: number;
  /** The device crashes (drops unflushed writes) once this many requests were made. */
  readonly crashAfter?: number;
  /** Fails the requests for which it returns true (with `failWith`), e.g. only writes past some
   * offset, or only the 5th flush. `operation` counts from 1 and includes this request. */
  readonly failWhen?: (request: FaultRequest & { readonly operation: number }) => boolean;
  /** Code of the injected errors (default `EIO`). Crashes always report `EIO`. */
  readonly failWith?: BlockErrorCode;
  /** Close the inner device when this one is closed before any crash (default true). After a
   * crash the inner device is never closed: it is the disk left behind, for inspection. */
  readonly closeInner?: boolean;
}

export class FaultInjectingBlockDevice implements BlockDevice {
  readonly inner: BlockDevice;
  readonly capabilities: BlockDeviceCapabilities;
  readonly description: string;
  readonly #failAfter: number | undefined;
  readonly #crashAfter: number | undefined;
  readonly #failWith: BlockErrorCode;
  readonly #failWhen: FaultInjectingOptions['failWhen'];
  readonly #closeInner: boolean;
  #operations = 0;
  #crashed = false;
  #closed = false;
  /** Changes made since the last flush started. */
  #pending = new VolatileLayer();
  /** Changes a running flush is applying to the inner device (still visible to reads). */
  #applying: VolatileLayer | undefined;
  /** The flush running now, so flushes run one at a time. */
  #flushing: Promise<void> = Promise.resolve();
  readonly #inFlight = new Set<Promise<unknown>>();

  constructor(inner: BlockDevice, options: FaultInjectingOptions = {}) {
    for (const [name, value] of [
      ['failAfter', options.failAfter],
      ['crashAfter', options.crashAfter],
    ] as const) {
      if (value !== undefined && (!Number.isSafeInteger(value) || value < 0)) {
        throw new BlockDeviceError(
          'EINVAL',
          `FaultInjectingBlockDevice ${name}: ${value} is not a non-negative integer`,
        );
      }
    }
    this.inner = inner;
    this.#failAfter = options.failAfter;
    this.#crashAfter = options.crashAfter;
    this.#failWith = options.failWith ?? 'EIO';
    this.#failWhen = options.failWhen;
    this.#closeInner = options.closeInner ?? true;
    this.description = `faulty(${inner.description})`;
    this.capabilities = { ...inner.capabilities, flush: true, fua: false };
  }

  get size(): number {
    return this.inner.size;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  /** Requests made so far (including rejected ones). */
  get operations(): number {
    return this.#operations;
  }

  /** The device has crashed: unflushed changes are gone and every request fails. */
  get crashed(): boolean {
    return this.#crashed;
  }

  /** Changes waiting for a flush. */
  get unflushedChanges(): number {
    return this.#pending.changes + (this.#applying?.changes ?? 0);
  }

  /** Crashes now: drops every unflushed change; later requests reject with `EIO`. */
  crashNow(): void {
    this.#crashed = true;
    this.#pending = new VolatileLayer();
    this.#applying = undefined;
  }

  read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    return this.#run({ kind: 'read', offset, length }, options, async () => {
      validateRange(this.size, offset, length, 'read');
      const buffer = new Uint8Array(length);
      await this.#load(buffer, offset, options);
      return buffer;
    });
  }

  readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    return this.#run({ kind: 'read', offset, length: buffer.length }, options, async () => {
      validateRange(this.size, offset, buffer.length, 'read');
      await this.#load(buffer, offset, options);
    });
  }

  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    return this.#run({ kind: 'write', offset, length: data.length }, options, async () => {
      assertWritable(this, 'write');
      validateRange(this.size, offset, data.length, 'write');
      this.#pending.write(offset, data);
      if (options?.fua) await this.#flush();
    });
  }

  writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    return this.#run({ kind: 'writeZeroes', offset, length }, options, async () => {
      assertWritable(this, 'writeZeroes');
      validateRange(this.size, offset, length, 'writeZeroes');
      if (options?.fastOnly && !this.inner.capabilities.fastZero) {
        throw new BlockDeviceError('ENOTSUP', `writeZeroes: ${this.description} cannot zero fast`, {
          offset,
        });
      }
      if (length > 0)
        this.#pending.zero(offset, length, options?.mayUnmap ? 'writeZeroesUnmap' : 'writeZeroes');
      if (options?.fua) await this.#flush();
    });
  }

  discard(offset: number, length: number, options?: RequestOptions): Promise<void> {
    return this.#run({ kind: 'discard', offset, length }, options, async () => {
      assertWritable(this, 'discard');
      validateRange(this.size, offset, length, 'discard');
      this.#pending.zero(offset, length, 'discard');
    });
  }

  flush(options?: RequestOptions): Promise<void> {
    return this.#run({ kind: 'flush', offset: 0, length: 0 }, options, () => this.#flush());
  }

  blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    return this.#run({ kind: 'blockStatus', offset, length }, options, async () => {
      validateRange(this.size, offset, length, 'blockStatus');
      const layers = this.#layers();
      const innerExtents = await this.inner.blockStatus(offset, length, options);
      // Where an unflushed change overlaps, say "data" (a safe answer: never a false hole).
      const extents: Extent[] = [];
      for (const extent of innerExtents) {
        const end = extent.offset + extent.length;
        const touched = layers.some((layer) => layer.touches(extent.offset, end));
        appendExtent(
          extents,
          touched
            ? {
                offset: extent.offset,
                length: extent.length,
                zero: false,
                data: true,
                present: true,
                depth: 0,
              }
            : extent,
        );
      }
      return extents;
    });
  }

  resize(newSize: number): Promise<void> {
    return this.#run({ kind: 'resize', offset: newSize, length: 0 }, undefined, async () => {
      assertWritable(this, 'resize');
      // Resizing is a metadata change of the inner device: apply what is pending first.
      await this.#flush();
      await this.inner.resize(newSize);
    });
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await Promise.allSettled([...this.#inFlight]);
    if (this.#crashed) return;
    await this.#flush();
    if (this.#closeInner) await this.inner.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Reads the inner device with the unflushed changes laid over it. The layers are taken before
   * reading, so a flush finishing meanwhile cannot hide a change from this read. */
  async #load(buffer: Uint8Array, offset: number, options: RequestOptions | undefined): Promise<void> {
    if (buffer.length === 0) return;
    const layers = this.#layers();
    await this.inner.readInto(buffer, offset, options);
    for (const layer of layers) layer.overlay(buffer, offset);
  }

  /** The volatile layers, oldest first. */
  #layers(): VolatileLayer[] {
    return this.#applying === undefined ? [this.#pending] : [this.#applying, this.#pending];
  }

  /** Counts the request, injects the configured fault, and tracks it for close(). */
  async #run<T>(
    request: FaultRequest,
    options: RequestOptions | undefined,
    task: () => Promise<T>,
  ): Promise<T> {
    const kind = request.kind;
    assertOpen(this.#closed, this.description, kind);
    throwIfAborted(options?.signal);
    this.#operations++;
    if (this.#crashAfter !== undefined && this.#operations > this.#crashAfter && !this.#crashed)
      this.crashNow();
    if (this.#crashed) {
      throw new BlockDeviceError('EIO', `${kind}: ${this.description} has crashed (injected)`);
    }
    const failing =
      (this.#failAfter !== undefined && this.#operations > this.#failAfter) ||
      (this.#failWhen?.({ ...request, operation: this.#operations }) ?? false);
    if (failing) {
      throw new BlockDeviceError(this.#failWith, `${kind}: ${this.description} failed (injected)`, {
        offset: request.offset,
      });
    }
    const promise = task();
    this.#inFlight.add(promise);
    try {
      return await promise;
    } finally {
      this.#inFlight.delete(promise);
    }
  }

  /** Applies every pending change to the inner device, then flushes it. */
  #flush(): Promise<void> {
    const run = this.#flushing.then(async () => {
      if (this.#crashed)
        throw new BlockDeviceError('EIO', `flush: ${this.description} has crashed (injected)`);
      const applying = this.#pending;
      this.#applying = applying;
      this.#pending = new VolatileLayer();
      try {
        const completed = await applying.applyTo(this.inner, () => this.#crashed);
        if (!completed)
          throw new BlockDeviceError('EIO', `flush: ${this.description} crashed while flushing`);
        await this.inner.flush();
        this.#applying = undefined;
      } catch (error) {
        // Not durable: keep the changes, under newer ones, for the next flush.
        if (!this.#crashed) {
          applying.absorb(this.#pending);
          this.#pending = applying;
        }
        this.#applying = undefined;
        throw error;
      }
    });
    // The next flush waits for this one, whatever its outcome.
    this.#flushing = run.catch(() => undefined);
    return run;
  }
}
