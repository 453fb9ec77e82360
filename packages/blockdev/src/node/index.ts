export {
  FileBlockDevice,
  type FileCreateOptions,
  type FileOpenOptions,
  MAX_EXTENTS_PER_CALL,
} from './file-device.js';
export type { LockMechanism, LockMode } from './file-lock.js';
