import type { BlockDevice, Extent, RequestOptions } from './block-device.js';
import { BlockDeviceError } from './errors.js';

export type RequestKind = 'read' | 'write' | 'writeZeroes' | 'discard' | 'blockStatus';

/**
 * Validates a request against a device of `size` bytes: integers, non-negative, inside the
 * device. Writes past the end are `ENOSPC` (as NBD asks); anything else out of range is `EINVAL`.
 */
export function validateRange(size: number, offset: number, length: number, kind: RequestKind): void {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new BlockDeviceError('EINVAL', `${kind}: offset ${offset} is not a non-negative integer`);
  }
  if (!Number.isSafeInteger(length) || length < 0) {
    throw new BlockDeviceError('EINVAL', `${kind}: length ${length} is not a non-negative integer`);
  }
  if (offset + length > size || offset > size) {
    const code = kind === 'write' || kind === 'writeZeroes' ? 'ENOSPC' : 'EINVAL';
    throw new BlockDeviceError(
      code,
      `${kind}: range of ${length} bytes at ${offset} ends past the device end (${size} bytes)`,
      { offset },
    );
  }
}

/** Validates a new device size. */
export function validateSize(size: number, what = 'size'): void {
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new BlockDeviceError('EINVAL', `${what}: ${size} is not a non-negative integer`);
  }
}

/** Throws `EROFS` when `device` is read-only. */
export function assertWritable(device: Pick<BlockDevice, 'readOnly' | 'description'>, kind: string): void {
  if (device.readOnly) {
    throw new BlockDeviceError('EROFS', `${kind}: ${device.description} is read-only`);
  }
}

/** Throws `ECLOSED` when `closed` is true. */
export function assertOpen(closed: boolean, description: string, kind: string): void {
  if (closed) throw new BlockDeviceError('ECLOSED', `${kind}: ${description} is closed`);
}

/** Throws the signal's abort reason as an error when it has been aborted. */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  signal?.throwIfAborted();
}

/**
 * All extents over `[offset, offset + length)`, calling `blockStatus` as often as needed and
 * merging neighbours with the same status.
 */
export async function blockStatusAll(
  device: BlockDevice,
  offset: number,
  length: number,
  options?: RequestOptions,
): Promise<Extent[]> {
  const out: Extent[] = [];
  const end = offset + length;
  let position = offset;
  while (position < end) {
    const extents = await device.blockStatus(position, end - position, options);
    if (extents.length === 0) {
      throw new BlockDeviceError('EIO', `blockStatus: ${device.description} returned no extent`, {
        offset: position,
      });
    }
    for (const extent of extents) {
      if (extent.offset !== position || extent.length <= 0 || extent.offset + extent.length > end) {
        throw new BlockDeviceError('EIO', `blockStatus: ${device.description} returned a bad extent`, {
          offset: position,
        });
      }
      appendExtent(out, extent);
      position += extent.length;
    }
  }
  return out;
}

/** Appends `extent` to `list`, merging it into the last one when they touch and agree. */
export function appendExtent(list: Extent[], extent: Extent): void {
  const last = list[list.length - 1];
  if (
    last !== undefined &&
    last.offset + last.length === extent.offset &&
    last.zero === extent.zero &&
    last.data === extent.data &&
    last.present === extent.present &&
    last.depth === extent.depth &&
    last.compressed === extent.compressed &&
    (last.hostOffset === undefined
      ? extent.hostOffset === undefined
      : extent.hostOffset === last.hostOffset + last.length)
  ) {
    list[list.length - 1] = { ...last, length: last.length + extent.length };
  } else {
    list.push(extent);
  }
}
