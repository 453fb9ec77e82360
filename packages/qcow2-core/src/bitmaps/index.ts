export * from './bitmap-table.js';
export { DirtyBitmap } from './dirty-bitmap.js';
export { PersistentBitmaps, type PersistentBitmapsContext } from './persistent-bitmaps.js';
export { dirtyRanges, readStoredBitmap, type StoredBitmap } from './read-bitmap.js';
export { readBitmapDirectory } from './read-directory.js';
export { hasPersistentBitmaps, resizeWithBitmaps } from './resize-with-bitmaps.js';
export { forEachStoredRun } from './stored-runs.js';
export type { StoredBitmapImage } from './stored-table.js';
