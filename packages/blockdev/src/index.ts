export type {
  BlockDevice,
  BlockDeviceCapabilities,
  Extent,
  RequestOptions,
  WriteOptions,
  WriteZeroesOptions,
} from './block-device.js';
export { BlockDeviceError, type BlockErrorCode, isBlockDeviceError } from './errors.js';
export {
  appendExtent,
  assertOpen,
  assertWritable,
  blockStatusAll,
  type RequestKind,
  throwIfAborted,
  validateRange,
  validateSize,
} from './range.js';
