export { type ClusterKind, ClusterMap } from './cluster-map.js';
export type { ClusterCompressor, CompressionType } from './compressor.js';
export { type ConversionPlan, type ConvertOptions, convertToQcow2, planConversion } from './convert.js';
export { type CreateImageOptions, createEmptyImage, planEmptyImage } from './empty.js';
export { planLayout, type Qcow2Layout } from './layout.js';
export { type ImageGeometry, type Qcow2ImageOptions, resolveGeometry } from './options.js';
export { type ByteSink, type NodeWritableLike, type Qcow2Sink, toByteSink } from './sink.js';
export type { ConvertSource, RawStreamSource } from './source.js';
