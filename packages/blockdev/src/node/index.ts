export {
  FileBlockDevice,
  type FileCreateOptions,
  type FileOpenOptions,
  forgetTruncation,
  MAX_EXTENTS_PER_CALL,
  SYNC_IO_MAX_BYTES,
} from './file-device.js';
export type { LockMechanism, LockMode } from './file-lock.js';
export {
  FileMapping,
  type FileMappingOptions,
  MAPPING_WINDOW_BYTES,
  type MappedRange,
} from './file-mapping.js';
export { type CallFailure, type CallResult, type Libc, loadLibc, type MappingArea } from './libc.js';
export { inlineIoMaxBytes, isMemoryBacked } from './memory-backed.js';
