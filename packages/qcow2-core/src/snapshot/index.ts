export { findSnapshot, readSnapshotTable } from './snapshot-list.js';
export {
  applySnapshot,
  createSnapshot,
  deleteSnapshot,
  listSnapshots,
  type SnapshotCreateOptions,
} from './snapshot-ops.js';
