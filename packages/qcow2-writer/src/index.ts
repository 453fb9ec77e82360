export { type ClusterKind, ClusterMap } from './cluster-map.js';
export type { ClusterCompressor, CompressedBatch, CompressionType } from './compressor.js';
export { type ConversionPlan, type ConvertOptions, convertToQcow2, planConversion } from './convert.js';
export { type CopyIntoOptions, copyInto } from './copy-into.js';
export { convertDirectCompressed, type DirectCompressOptions } from './direct-compressed.js';
export {
  convertDirect,
  type DirectConvertOptions,
  type RandomAccessSink,
  type SourceView,
} from './direct-convert.js';
export { type CreateImageOptions, createEmptyImage, planEmptyImage } from './empty.js';
export { planLayout, type Qcow2Layout } from './layout.js';
export { type MeasureResult, measure, preallocatedSize, refcountMetadataSize } from './measure.js';
export { type ImageGeometry, type Qcow2ImageOptions, resolveGeometry } from './options.js';
export { type ByteSink, type NodeWritableLike, type Qcow2Sink, toByteSink } from './sink.js';
export type { ConvertSource, RawStreamSource } from './source.js';
export type { Spool } from './spool.js';
