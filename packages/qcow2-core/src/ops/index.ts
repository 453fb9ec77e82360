export { type AmendOptions, amendImage } from './amend.js';
export {
  type BackingFileSpec,
  type CommitOptions,
  type CopyBackingOptions,
  commitToBacking,
  copyBackingDifferences,
  emptyImage,
  setBackingFile,
} from './backing.js';
export { type ImageEditOptions, refuseDamagedImage } from './image-edit.js';
export { type DataPreallocation, type PreallocateOptions, preallocateData } from './preallocate.js';
export { type ResizeOptions, resizeImage } from './resize.js';
