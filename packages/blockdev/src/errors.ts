/**
 * Typed errors for block devices. Every failure a device reports is a {@link BlockDeviceError}
 * with a stable `code`; callers switch on the code, never on the message.
 */

/** Stable error codes. They follow errno names where one fits. */
export type BlockErrorCode =
  /** A bad argument: out-of-range offset or length, a non-integer, a negative size. */
  | 'EINVAL'
  /** A write, zero, discard or resize on a read-only device. */
  | 'EROFS'
  /** The underlying storage failed. */
  | 'EIO'
  /** No space left: a write past the end of a device that cannot grow, or storage full. */
  | 'ENOSPC'
  /** The device cannot do this operation (resize on a fixed device, fast zeroing unavailable). */
  | 'ENOTSUP'
  /** The device is locked by another writer. */
  | 'EBUSY'
  /** A named file or device does not exist. */
  | 'ENOENT'
  /** Permission denied by the operating system. */
  | 'EACCES'
  /** The device was used after `close()`. */
  | 'ECLOSED'
  /** On-disk structures are inconsistent (image formats). */
  | 'ECORRUPT'
  /** A valid input uses a feature this library does not implement. */
  | 'EUNSUPPORTED';

export class BlockDeviceError extends Error {
  override name = 'BlockDeviceError';
  readonly code: BlockErrorCode;
  /** Byte offset the error concerns, in the coordinate space named by the message. */
  readonly offset: number | undefined;

  constructor(code: BlockErrorCode, message: string, options?: { cause?: unknown; offset?: number }) {
    super(
      options?.offset === undefined ? message : `${message} (at 0x${options.offset.toString(16)})`,
      options?.cause === undefined ? undefined : { cause: options.cause },
    );
    this.code = code;
    this.offset = options?.offset;
  }
}

export function isBlockDeviceError(error: unknown, code?: BlockErrorCode): error is BlockDeviceError {
  return error instanceof BlockDeviceError && (code === undefined || error.code === code);
}
