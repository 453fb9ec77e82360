/**
 * @qcowkit/qcow2-nbd: an NBD server for any BlockDevice (qcow2 images, raw files, memory, your
 * own backends), and the protocol codecs it is built from.
 */

export * as protocol from './protocol/index.js';
export { type BitmapWindow, bitmapExtents } from './server/bitmap-extents.js';
export type { ReadMode } from './server/connection-io.js';
export {
  availableContexts,
  blockSizes,
  type DirtyExtent,
  type MetaContext,
  type NbdDirtyBitmap,
  type NbdExport,
  transmissionFlags,
} from './server/export.js';
export { nbdErrorName, toNbdError } from './server/nbd-errors.js';
export {
  createNbdServer,
  type NbdListenTarget,
  type NbdServer,
  type NbdServerOptions,
  type NbdTlsOptions,
} from './server/server.js';
