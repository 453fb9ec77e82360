/**
 * Maps operating-system errors (Node's `error.code` or an errno name from a raw call) to
 * {@link BlockDeviceError} codes, in one place.
 */
import { BlockDeviceError, type BlockErrorCode } from '../errors.js';

const CODE_BY_ERRNO: Readonly<Record<string, BlockErrorCode>> = {
  ENOENT: 'ENOENT',
  ENOTDIR: 'ENOENT',
  EACCES: 'EACCES',
  EPERM: 'EACCES',
  EROFS: 'EROFS',
  ENOSPC: 'ENOSPC',
  EDQUOT: 'ENOSPC',
  EFBIG: 'ENOSPC',
  EIO: 'EIO',
  EINVAL: 'EINVAL',
  EISDIR: 'EINVAL',
  EEXIST: 'EINVAL',
  EBUSY: 'EBUSY',
  EAGAIN: 'EBUSY',
  EWOULDBLOCK: 'EBUSY',
  ETXTBSY: 'EBUSY',
  EOPNOTSUPP: 'ENOTSUP',
  ENOTSUP: 'ENOTSUP',
  ENOSYS: 'ENOTSUP',
  ENOTTY: 'ENOTSUP',
  EBADF: 'ECLOSED',
};

/** The errno name carried by a Node error (`error.code`), if any. */
export function errnoName(error: unknown): string | undefined {
  if (typeof error === 'object' && error !== null && 'code' in error) {
    const code = (error as { code: unknown }).code;
    if (typeof code === 'string') return code;
  }
  return undefined;
}

/** The block-device code for an errno name; unknown failures are `EIO`. */
export function blockErrorCodeFor(errno: string | undefined): BlockErrorCode {
  return (errno !== undefined ? CODE_BY_ERRNO[errno] : undefined) ?? 'EIO';
}

/**
 * Wraps an operating-system failure: `what: path: reason (ERRNO) (at 0xOFFSET)`, with `cause` set.
 * A `BlockDeviceError` passes through unchanged.
 */
export function fsError(what: string, path: string, error: unknown, offset?: number): BlockDeviceError {
  if (error instanceof BlockDeviceError) return error;
  const errno = errnoName(error);
  const reason = describe(errno, error);
  return new BlockDeviceError(blockErrorCodeFor(errno), `${what}: ${path}: ${reason}`, {
    cause: error,
    offset,
  });
}

/** Wraps a failed raw call that reported only an errno name. */
export function errnoError(what: string, path: string, errno: string, offset?: number): BlockDeviceError {
  const cause = Object.assign(new Error(`${what} failed with ${errno}`), { code: errno });
  return new BlockDeviceError(blockErrorCodeFor(errno), `${what}: ${path}: ${describe(errno, cause)}`, {
    cause,
    offset,
  });
}

const REASONS: Readonly<Record<string, string>> = {
  ENOENT: 'no such file or directory',
  ENOTDIR: 'a path component is not a directory',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EROFS: 'read-only file system',
  ENOSPC: 'no space left on device',
  EDQUOT: 'disk quota exceeded',
  EFBIG: 'file too large',
  EIO: 'input/output error',
  EISDIR: 'is a directory',
  EEXIST: 'file already exists',
  EBUSY: 'device or resource busy',
  EOPNOTSUPP: 'operation not supported by the file system',
  ENOSYS: 'operation not supported by the kernel',
};

function describe(errno: string | undefined, error: unknown): string {
  if (errno === undefined) return error instanceof Error ? error.message : String(error);
  return `${REASONS[errno] ?? (error instanceof Error ? error.message : 'system error')} (${errno})`;
}
