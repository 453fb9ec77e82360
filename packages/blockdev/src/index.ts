export type {
  BlockDevice,
  BlockDeviceCapabilities,
  Extent,
  RequestOptions,
  WriteOptions,
  WriteZeroesOptions,
} from './block-device.js';
export {
  ConcatBlockDevice,
  type ConcatBlockDeviceOptions,
  type ConcatPart,
} from './concat-device.js';
export { BlockDeviceError, type BlockErrorCode, isBlockDeviceError } from './errors.js';
export { FaultInjectingBlockDevice, type FaultInjectingOptions, type FaultRequest } from './fault-device.js';
export { ForwardingBlockDevice } from './forwarding-device.js';
export { MemoryBlockDevice, type MemoryBlockDeviceOptions } from './memory-device.js';
export { OverlayBlockDevice, type OverlayBlockDeviceOptions } from './overlay-device.js';
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
export { RangeLock } from './range-lock.js';
export { type Run, RunMap } from './run-map.js';
