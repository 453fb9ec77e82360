// The creation plan is pure geometry over these codecs: offered here so generators (qcow2-writer)
// can validate options without loading the engine.
export { planQcow2Create, type Qcow2CreatePlan } from '../create.js';
export { decodeText, encodeText, readU64, viewOf, writeU64 } from './binary.js';
export * from './bitmap-directory.js';
export * from './compressed-descriptor.js';
export * from './feature-bits.js';
export * from './feature-name-table.js';
export * from './geometry.js';
export * from './header.js';
export * from './header-extensions.js';
export * from './l1-entry.js';
export * from './l2-entry.js';
export * from './qcow-v1-header.js';
export * from './refcount.js';
export * from './snapshot-table.js';
