/**
 * The comparison behind `qcow2 compare`, on any two `BlockDevice`s: qemu-img compare's walk and
 * verdicts. Block status first, so ranges both sides report as zeros are never read; everything
 * else is read in chunks of at most 2 MiB and compared. A difference is reported at the start of
 * the first 512-byte sector (counted from the chunk's start) holding it, as qemu-img reports it.
 */
import type { BlockDevice, Extent } from '@qcowkit/blockdev';

/** qemu-img's I/O buffer for compare (`IO_BUF_SIZE`). */
export const COMPARE_CHUNK = 2 * 2 ** 20;
/** The granularity of a reported mismatch (`BDRV_SECTOR_SIZE`). */
export const SECTOR_SIZE = 512;
/** Chunk pairs read ahead of the comparison. */
const READS_IN_FLIGHT = 2;

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
  /** Called after each chunk with bytes done and the total. */
  readonly onProgress?: (done: number, total: number) => void;
  /** Block status of a side failed (qemu-img exit 3). */
  readonly onStatusError?: (side: 0 | 1, error: unknown) => never;
  /** A read of a side failed at `offset` (qemu-img exit 4). */
  readonly onReadError?: (side: 0 | 1, offset: number, error: unknown) => never;
}

/** Hands out a device's extents one at a time from `start`, asking block status as needed. */
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
    for (;;) {
      const current = this.#extents[this.#index];
      if (current !== undefined && position < current.offset + current.length) return current;
      if (current !== undefined) {
        this.#index++;
        continue;
      }
      try {
        this.#extents = await this.device.blockStatus(position, this.end - position);
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

let zeroBuffer: Uint8Array | undefined;
function zeros(length: number): Uint8Array {
  if (zeroBuffer === undefined || zeroBuffer.length < length) {
    zeroBuffer = new Uint8Array(Math.max(length, COMPARE_CHUNK));
  }
  return zeroBuffer.subarray(0, length);
}

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** The offset (from 0) of the first sector where `a` and `b` differ, or -1. */
export function firstDifferingSector(a: Uint8Array, b: Uint8Array): number {
  const left = asBuffer(a);
  const right = asBuffer(b);
  if (left.equals(right)) return -1;
  for (let start = 0; start < a.length; start += SECTOR_SIZE) {
    const end = Math.min(start + SECTOR_SIZE, a.length);
    if (!left.subarray(start, end).equals(right.subarray(start, end))) return start;
  }
  return -1;
}

/** qemu-img's strict test compares the status flags, the end-of-file flag included (set when a
 * status run reaches the end of the image). */
function isStatusEqual(a: Extent, aSize: number, b: Extent, bSize: number): boolean {
  const aEof = a.offset + a.length >= aSize;
  const bEof = b.offset + b.length >= bSize;
  return a.zero === b.zero && a.data === b.data && a.present === b.present && aEof === bEof;
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
  const read = async (side: 0 | 1, device: BlockDevice, offset: number, length: number) => {
    try {
      return await device.read(offset, length);
    } catch (error) {
      return readError(side, offset, error);
    }
  };
  const common = Math.min(first.size, second.size);
  const total = Math.max(first.size, second.size);
  const cursors = [
    new ExtentCursor(first, common, (error) => statusError(0, error)),
    new ExtentCursor(second, common, (error) => statusError(1, error)),
  ] as const;
  // Reads run ahead of the comparison (READS_IN_FLIGHT chunks), compared in order so the first
  // difference is the one reported.
  const inFlight: Array<{
    readonly position: number;
    readonly done: number;
    readonly pair: Promise<Uint8Array[]>;
  }> = [];
  const settle = async (): Promise<CompareResult | undefined> => {
    const next = inFlight.shift()!;
    const [left, right] = await next.pair;
    const at = firstDifferingSector(left!, right!);
    if (at >= 0) return { kind: 'content-mismatch', offset: next.position + at, sizeMismatch };
    options.onProgress?.(next.done, total);
    return undefined;
  };
  let position = 0;
  while (position < common) {
    const [a, b] = await Promise.all([cursors[0].at(position), cursors[1].at(position)]);
    let chunk = Math.min(a.offset + a.length, b.offset + b.length) - position;
    if (strict && !isStatusEqual(a, first.size, b, second.size)) {
      // Chunks before this one are compared first: a content mismatch there comes first.
      while (inFlight.length > 0) {
        const result = await settle();
        if (result !== undefined) return result;
      }
      return { kind: 'strict-status-mismatch', offset: position };
    }
    if (!(a.zero && b.zero) && (a.present || b.present)) {
      chunk = Math.min(chunk, COMPARE_CHUNK);
      const pair = Promise.all([
        a.zero ? zeros(chunk) : read(0, first, position, chunk),
        b.zero ? zeros(chunk) : read(1, second, position, chunk),
      ]);
      pair.catch(() => undefined); // handled when settled
      inFlight.push({ position, done: position + chunk, pair });
      if (inFlight.length >= READS_IN_FLIGHT) {
        const result = await settle();
        if (result !== undefined) return result;
      }
    } else if (inFlight.length === 0) {
      options.onProgress?.(position + chunk, total);
    }
    position += chunk;
  }
  while (inFlight.length > 0) {
    const result = await settle();
    if (result !== undefined) return result;
  }
  options.onProgress?.(position, total);
  if (sizeMismatch) {
    const longer = first.size > second.size ? first : second;
    const side: 0 | 1 = longer === first ? 0 : 1;
    const cursor = new ExtentCursor(longer, longer.size, (error) => statusError(side, error));
    while (position < longer.size) {
      const extent = await cursor.at(position);
      let chunk = extent.offset + extent.length - position;
      if (extent.present && !extent.zero) {
        chunk = Math.min(chunk, COMPARE_CHUNK);
        const bytes = await read(side, longer, position, chunk);
        const at = firstDifferingSector(bytes, zeros(chunk));
        if (at >= 0) return { kind: 'content-mismatch', offset: position + at, sizeMismatch };
      }
      position += chunk;
      options.onProgress?.(position, total);
    }
  }
  return { kind: 'identical', sizeMismatch };
}
