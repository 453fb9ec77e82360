/**
 * The BlockDevice interface: an async, byte-addressed device.
 *
 * Everything in qcowkit stands on it: raw files, memory, copy-on-write overlays, qcow2 images,
 * backing chains and NBD exports are all BlockDevices, and anything that works on one works on
 * all of them.
 *
 * ## Offsets and lengths
 * Offsets and lengths are byte counts held in a `number`; any integer alignment is allowed
 * (devices handle partial blocks themselves). They must be non-negative safe integers and
 * `offset + length <= size`; otherwise the call rejects with `EINVAL` (or `ENOSPC` for a write
 * past the end, as the NBD spec asks). A zero-length request inside `[0, size]` succeeds and
 * does nothing.
 *
 * ## Ordering and concurrency
 * Requests may be issued without waiting for earlier ones to complete. A device promises:
 * - Safety: concurrent requests never corrupt the device's own structures, whatever they overlap.
 * - Visibility: once a write, writeZeroes or discard has resolved, every read *started* after
 *   that reads its result.
 * - Overlap: requests that overlap in bytes and in time are unordered: each byte ends up as one
 *   of the competing requests left it. Callers that need an order wait for the first request.
 * - Durability: `flush()` resolves once every write that had *resolved* before `flush()` was
 *   called is on stable storage. A write with `fua` is durable when it resolves.
 * - Closing: `close()` waits for requests in flight, flushes, and releases resources; any later
 *   call rejects with `ECLOSED`. Calling `close()` twice is harmless.
 */

/** What a device can do natively. Every method exists on every device; these tell callers
 * (an NBD server advertising flags, a converter choosing a strategy) what is cheap or real. */
export interface BlockDeviceCapabilities {
  /** `discard` releases storage (otherwise it succeeds without effect on space). */
  readonly discard: boolean;
  /** `writeZeroes` is cheaper than writing a buffer of zeros (no data transfer). */
  readonly writeZeroes: boolean;
  /** `writeZeroes(..., { fastOnly: true })` can succeed (zeroing without writing data). */
  readonly fastZero: boolean;
  /** `blockStatus` reports real holes and zeros (otherwise: all data, depth 0). */
  readonly blockStatus: boolean;
  /** `flush` does real work (the device has a volatile cache). */
  readonly flush: boolean;
  /** The `fua` write flag is honoured natively (otherwise it means write then flush). */
  readonly fua: boolean;
  /** `resize` is supported. */
  readonly resize: boolean;
  /** Smallest granularity the device handles without read-modify-write, in bytes (power of 2). */
  readonly minimumAlignment: number;
  /** Granularity for best performance, in bytes (power of 2, >= minimumAlignment). */
  readonly preferredAlignment: number;
  /** Largest single request the device handles efficiently, in bytes; larger ones still work. */
  readonly maximumTransfer: number;
}

/** One run of bytes with the same status. */
export interface Extent {
  /** Guest offset where the run starts. */
  readonly offset: number;
  /** Length of the run, > 0. */
  readonly length: number;
  /** The bytes read as zeros. */
  readonly zero: boolean;
  /** The bytes are stored data (not a hole or a zero marker) at the layer that answers. */
  readonly data: boolean;
  /** Some layer of the stack holds the range (qemu-img map's `present`). When false the range
   * reads from no layer at all (zeros). */
  readonly present: boolean;
  /** The layer that answers: 0 for this device, 1 for the device below it (a backing file or an
   * overlay's lower device), and so on. When `present` is false: the deepest layer consulted. */
  readonly depth: number;
  /** Where the data lies in the answering layer's storage, when it is stored uncompressed and
   * contiguously there (qemu-img map's `offset`). */
  readonly hostOffset?: number;
  /** The data is stored compressed. */
  readonly compressed?: boolean;
}

export interface WriteOptions {
  /** Force unit access: durable when the promise resolves. */
  readonly fua?: boolean;
  readonly signal?: AbortSignal;
}

export interface WriteZeroesOptions extends WriteOptions {
  /** The device may release the storage (punch a hole / deallocate) instead of writing zeros. */
  readonly mayUnmap?: boolean;
  /** Fail with `ENOTSUP` rather than write zeros slowly (NBD's FAST_ZERO). */
  readonly fastOnly?: boolean;
}

export interface RequestOptions {
  readonly signal?: AbortSignal;
}

export interface BlockDevice extends AsyncDisposable {
  /** Size in bytes. Changes only through `resize`. */
  readonly size: number;
  readonly readOnly: boolean;
  readonly capabilities: BlockDeviceCapabilities;
  /** A short human description, e.g. `file:/tmp/disk.raw` or `memory`. */
  readonly description: string;

  /** Reads `length` bytes at `offset` into a new buffer. */
  read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array>;
  /** Reads `buffer.length` bytes at `offset` into the caller's buffer. */
  readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void>;
  /** Writes all of `data` at `offset`. */
  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void>;
  /** Makes `[offset, offset + length)` read as zeros. */
  writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void>;
  /** Tells the device the range is no longer needed. Afterwards the range reads as zeros, or, on
   * a layered device, as whatever the device's format says shows through (qcow2 over a backing
   * file: the backing file). Devices whose capabilities say `discard: false` ignore it. */
  discard(offset: number, length: number, options?: RequestOptions): Promise<void>;
  /** Makes every write resolved before this call durable. */
  flush(options?: RequestOptions): Promise<void>;
  /** Extents describing `[offset, offset + length)`: contiguous, starting at `offset`, covering
   * at least one byte and at most the whole range (callers loop; see `blockStatusAll`). */
  blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]>;
  /** Changes the size. Rejects with `ENOTSUP` where `capabilities.resize` is false. Growing
   * reads as zeros in the new range. */
  resize(newSize: number): Promise<void>;
  /** Waits for requests in flight, flushes, releases resources. Idempotent. */
  close(): Promise<void>;
}
