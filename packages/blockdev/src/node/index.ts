export {
  FileBlockDevice,
  type FileCreateOptions,
  type FileOpenOptions,
  forgetTruncation,
  MAX_EXTENTS_PER_CALL,
} from './file-device.js';
export type { LockMechanism, LockMode } from './file-lock.js';
export { errnoError, fsError } from './fs-errors.js';
export {
  type CallResult,
  F_DUPFD_CLOEXEC,
  F_GETFL,
  F_GETPIPE_SZ,
  F_SETPIPE_SZ,
  type Libc,
  loadLibc,
  O_CLOEXEC,
  O_NONBLOCK,
  type RawIo,
  SPLICE_F_MOVE,
  SPLICE_F_NONBLOCK,
} from './libc.js';
export { inlineIoMaxBytes, isMemoryBacked, SYNC_IO_MAX_BYTES } from './memory-backed.js';
