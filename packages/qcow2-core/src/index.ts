export * from './bitmaps/index.js';
export { TableCache } from './cache/index.js';
export * from './check/index.js';
export { pureCodecs, type Qcow2Codecs, zstdFrameLength } from './codecs.js';
export {
  planQcow2Create,
  type Qcow2CreateOptions,
  type Qcow2CreatePlan,
  writeQcow2Layout,
} from './create.js';
export { DETECT_BYTES, detectFormat, type ImageFormat } from './detect.js';
export * from './format/index.js';
export {
  DEFAULT_L2_CACHE_MAX_BYTES,
  type Qcow2BitmapInfo,
  Qcow2Image,
  type Qcow2MetadataReader,
  type Qcow2SnapshotInfo,
} from './image.js';
export type { Segment, SegmentKind } from './mapping/segment.js';
export * from './ops/index.js';
export {
  type BackingResolver,
  type ImageOpenOptions,
  MAX_CHAIN_DEPTH,
  type Qcow2OpenOptions,
} from './options.js';
export { QcowImage } from './qcow-image.js';
export { RawImage } from './raw-image.js';
export * from './snapshot/index.js';
