export { findSnapshot, readSnapshotTable } from './snapshot-list.js';
