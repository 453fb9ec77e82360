/**
 * The comparison behind `qcow2 compare`, on any two `BlockDevice`s: qemu-img compare's walk and
 * verdicts, sparse-aware and pipelined.
 *
 * Block status of both sides first: ranges both report as zeros are never read. The rest is cut
 * into windows of at most `chunkSize` bytes (neighbouring small extents share a window, so a
 * run of 64 KiB data clusters costs one read per side, not one per cluster); a side that is all
 * zeros in a window is not read at all but checked against zeros. Several windows are read ahead
 * into reusable buffers while the oldest is compared (`Buffer.equals` over the whole window, a
 * sector-by-sector search only once it differs), and windows are settled in order so the first
 * difference is the one reported, at the start of its 512-byte sector as qemu-img reports it.
 */
import type { BlockDevice, Extent } from '@qcowkit/blockdev';

/** Bytes read per side and window. */
export const COMPARE_CHUNK = 4 * 2 ** 20;
/** The granularity of a reported mismatch (`BDRV_SECTOR_SIZE`). */
export const SECTOR_SIZE = 512;
/** Windows read ahead of the comparison. */
const READS_IN_FLIGHT = 4;

export type CompareResult =
  /** Same content; `sizeMismatch` when the longer device only has zeros past the shorter's end. */
  | { readonly kind: 'identical'; readonly sizeMismatch: boolean }
  /** Content differs; `offset` is where qemu-img says so. */
  | { readonly kind: 'content-mismatch'; readonly offset: number; readonly sizeMismatch: boolean }
  /** `-s`: the sizes differ. */
  | { readonly kind: 'strict-size-mismatch' }
  /** `-s`: the allocation status differs at `offset`. */
  | { readonly kind: 'strict-status-mismatch'; readonly offset: number };

export interface CompareOptions {
  /** qemu-img's `-s`: sizes and allocation status must match too. */
  readonly strict?: boolean;
  /** Called as the walk advances with bytes done and the total. */
  readonly onProgress?: (done: number, total: number) => void;
  /** Block status of a side failed (qemu-img exit 3). */
  readonly onStatusError?: (side: 0 | 1, error: unknown) => never;
  /** A read of a side failed at `offset` (qemu-img exit 4). */
  readonly onReadError?: (side: 0 | 1, offset: number, error: unknown) => never;
  /** Bytes per window (default {@link COMPARE_CHUNK}); tests use small ones. */
  readonly chunkSize?: number;
  /** Windows read ahead (default 4). */
  readonly readsInFlight?: number;
}

/** Hands out a device's extents one at a time from `start`, asking block status as needed; past
 * the device's end (the shorter of two images) everything is a zero extent. */
class ExtentCursor {
  #extents: Extent[] = [];
  #index = 0;
  constructor(
    private readonly device: BlockDevice,
    private readonly end: number,
    private readonly onError: (error: unknown) => never,
  ) {}

  /** The extent covering `position` (which only moves forward). */
  async at(position: number): Promise<Extent> {
    if (position >= this.device.size) {
      return {
        offset: position,
        length: this.end - position,
        zero: true,
        data: false,
        present: false,
        depth: 0,
      };
    }
    const end = Math.min(this.end, this.device.size);
    for (;;) {
      const current = this.#extents[this.#index];
      if (current !== undefined && position < current.offset + current.length) return current;
      if (current !== undefined) {
        this.#index++;
        continue;
      }
      try {
        this.#extents = await this.device.blockStatus(position, end - position);
      } catch (error) {
        this.onError(error);
      }
      this.#index = 0;
      const first = this.#extents[0];
      if (first === undefined || first.offset > position || first.length <= 0) {
        this.onError(new Error(`block status returned no extent at offset ${position}`));
      }
    }
  }
}

let zeroBuffer: Buffer | undefined;
function zeros(length: number): Buffer {
  if (zeroBuffer === undefined || zeroBuffer.length < length) {
    zeroBuffer = Buffer.alloc(Math.max(length, COMPARE_CHUNK));
  }
  return zeroBuffer.subarray(0, length);
}

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** The offset (from 0) of the first sector where `a` and `b` differ, or -1. */
export function firstDifferingSector(a: Uint8Array, b: Uint8Array): number {
  const left = asBuffer(a);
  const right = asBuffer(b);
  if (left.equals(right)) return -1;
  // Halve the range until a sector is left: a few big compares instead of one per sector.
  let start = 0;
  let end = a.length;
  while (end - start > SECTOR_SIZE) {
    const sectors = Math.ceil((end - start) / SECTOR_SIZE);
    const middle = start + Math.floor(sectors / 2) * SECTOR_SIZE;
    if (!left.subarray(start, middle).equals(right.subarray(start, middle))) end = middle;
    else start = middle;
  }
  return start;
}

/** qemu-img's strict test compares the status flags, the end-of-file flag included (set when a
 * status run reaches the end of the image). */
function isStatusEqual(a: Extent, aSize: number, b: Extent, bSize: number): boolean {
  const aEof = a.offset + a.length >= aSize;
  const bEof = b.offset + b.length >= bSize;
  return a.zero === b.zero && a.data === b.data && a.present === b.present && aEof === bEof;
}

/** A window both sides are read (or known zero) over, compared as one. */
interface Window {
  position: number;
  length: number;
  /** Per side: true when every extent of the side in the window reads as zeros. */
  readonly zero: [boolean, boolean];
}

interface PendingWindow {
  readonly window: Window;
  readonly buffers: readonly [Buffer, Buffer];
  readonly done: Promise<unknown>;
}

/** Compares `first` and `second` as qemu-img compare does. */
export async function compareDevices(
  first: BlockDevice,
  second: BlockDevice,
  options: CompareOptions = {},
): Promise<CompareResult> {
  const strict = options.strict === true;
  const sizeMismatch = first.size !== second.size;
  if (strict && sizeMismatch) return { kind: 'strict-size-mismatch' };
  const chunkSize = options.chunkSize ?? COMPARE_CHUNK;
  const readsInFlight = Math.max(1, options.readsInFlight ?? READS_IN_FLIGHT);
  const statusError =
    options.onStatusError ??
    ((_side: 0 | 1, error: unknown): never => {
      throw error;
    });
  const readError =
    options.onReadError ??
    ((_side: 0 | 1, _offset: number, error: unknown): never => {
      throw error;
    });
  const devices = [first, second] as const;
  const total = Math.max(first.size, second.size);
  const cursors = [
    new ExtentCursor(first, total, (error) => statusError(0, error)),
    new ExtentCursor(second, total, (error) => statusError(1, error)),
  ] as const;

  // Reusable buffers: one pair per window in flight.
  const free: Array<readonly [Buffer, Buffer]> = [];
  const takeBuffers = (): readonly [Buffer, Buffer] =>
    free.pop() ?? [Buffer.allocUnsafe(chunkSize), Buffer.allocUnsafe(chunkSize)];

  const readSide = async (side: 0 | 1, window: Window, buffer: Buffer): Promise<Buffer> => {
    if (window.zero[side]) return zeros(window.length);
    const device = devices[side];
    const target = buffer.subarray(0, window.length);
    // The part past this side's end (the shorter image) reads as zeros.
    const available = Math.max(0, Math.min(window.length, device.size - window.position));
    try {
      if (available > 0) await device.readInto(target.subarray(0, available), window.position);
    } catch (error) {
      return readError(side, window.position, error);
    }
    if (available < window.length) target.fill(0, available);
    return target;
  };

  const pending: PendingWindow[] = [];
  let progressed = 0;
  const progress = (done: number) => {
    if (done > progressed) {
      progressed = done;
      options.onProgress?.(done, total);
    }
  };
  const start = (window: Window) => {
    const buffers = takeBuffers();
    const done = Promise.all([readSide(0, window, buffers[0]), readSide(1, window, buffers[1])]);
    done.catch(() => undefined); // handled when settled
    pending.push({ window, buffers, done });
  };
  /** Compares the oldest window; a result when it differs. */
  const settle = async (): Promise<CompareResult | undefined> => {
    const next = pending.shift()!;
    const [left, right] = (await next.done) as [Buffer, Buffer];
    const at = firstDifferingSector(left, right);
    free.push(next.buffers);
    if (at >= 0) return { kind: 'content-mismatch', offset: next.window.position + at, sizeMismatch };
    progress(next.window.position + next.window.length);
    return undefined;
  };
  const drain = async (): Promise<CompareResult | undefined> => {
    while (pending.length > 0) {
      const result = await settle();
      if (result !== undefined) return result;
    }
    return undefined;
  };

  let open: Window | undefined;
  const flushOpen = async (): Promise<CompareResult | undefined> => {
    if (open === undefined) return undefined;
    start(open);
    open = undefined;
    return pending.length >= readsInFlight ? settle() : undefined;
  };

  try {
    let position = 0;
    while (position < total) {
      const [a, b] = await Promise.all([cursors[0].at(position), cursors[1].at(position)]);
      let length = Math.min(a.offset + a.length, b.offset + b.length) - position;
      if (strict && !isStatusEqual(a, first.size, b, second.size)) {
        // Windows before this one are compared first: a content mismatch there comes first.
        const result = (await flushOpen()) ?? (await drain());
        return result ?? { kind: 'strict-status-mismatch', offset: position };
      }
      if (a.zero && b.zero) {
        const result = await flushOpen();
        if (result !== undefined) return result;
        if (pending.length === 0) progress(position + length);
        position += length;
        continue;
      }
      while (length > 0) {
        if (open !== undefined && open.position + open.length === position && open.length < chunkSize) {
          const piece = Math.min(length, chunkSize - open.length);
          open.length += piece;
          open.zero[0] &&= a.zero;
          open.zero[1] &&= b.zero;
          position += piece;
          length -= piece;
        } else {
          const result = await flushOpen();
          if (result !== undefined) return result;
          const piece = Math.min(length, chunkSize);
          open = { position, length: piece, zero: [a.zero, b.zero] };
          position += piece;
          length -= piece;
        }
      }
    }
    const result = (await flushOpen()) ?? (await drain());
    if (result !== undefined) return result;
    progress(total);
    return { kind: 'identical', sizeMismatch };
  } finally {
    // An early verdict leaves reads in flight: let them land before the caller closes the devices.
    await Promise.allSettled(pending.map((window) => window.done));
  }
}
