/**
 * The one place where failures become NBD error numbers. Device errors carry a stable
 * BlockDeviceError code; anything else is an I/O error from the client's point of view.
 */
import { isBlockDeviceError } from '@qcowkit/blockdev';
import {
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from '../protocol/constants.js';

/**
 * The NBD error for a failure. `fastZero`: the request was a WRITE_ZEROES with FAST_ZERO, the one
 * place the spec lets a server answer ENOTSUP; anything else unsupported is EINVAL.
 */
export function toNbdError(error: unknown, options: { readonly fastZero?: boolean } = {}): number {
  if (!isBlockDeviceError(error)) return NBD_EIO;
  switch (error.code) {
    case 'EINVAL':
      return NBD_EINVAL;
    case 'EROFS':
    case 'EACCES':
      return NBD_EPERM;
    case 'ENOSPC':
      return NBD_ENOSPC;
    case 'ENOTSUP':
    case 'EUNSUPPORTED':
      return options.fastZero === true ? NBD_ENOTSUP : NBD_EINVAL;
    case 'ECLOSED':
      return NBD_ESHUTDOWN;
    default:
      return NBD_EIO;
  }
}

/** A readable name of an NBD error number, for logs and tests. */
export function nbdErrorName(error: number): string {
  switch (error) {
    case 0:
      return 'OK';
    case NBD_EPERM:
      return 'EPERM';
    case NBD_EIO:
      return 'EIO';
    case NBD_EINVAL:
      return 'EINVAL';
    case NBD_ENOSPC:
      return 'ENOSPC';
    case NBD_EOVERFLOW:
      return 'EOVERFLOW';
    case NBD_ENOTSUP:
      return 'ENOTSUP';
    case NBD_ESHUTDOWN:
      return 'ESHUTDOWN';
    default:
      return `error ${error}`;
  }
}

/** The message sent with a structured error chunk. */
export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
