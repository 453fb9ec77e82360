import type { BlockDevice } from '@qcowkit/blockdev';
import type { Qcow2Codecs } from './codecs.js';

/** Most layers in a backing chain (the top image included). */
export const MAX_CHAIN_DEPTH = 64;

/** Opens the backing file named by an image. */
export type BackingResolver = (request: {
  /** The name as stored in the image. */
  name: string;
  /** The declared format (backing format extension), undefined when the image declares none. */
  format: string | undefined;
  /** Depth of the backing layer (1 = the top image's backing file). */
  depth: number;
  /** The image asking. */
  from: import('./image.js').Qcow2Image | import('./qcow-image.js').QcowImage;
}) => Promise<BlockDevice>;

/** Options shared by qcow2 and qcow images. */
export interface ImageOpenOptions {
  /** Default true. False opens a qcow2 image for writing; a qcow (v1) image rejects it (EUNSUPPORTED). */
  readOnly?: boolean;
  /** Opens the backing file. Absent: an image with a backing file fails to open. */
  resolveBacking?: BackingResolver;
  /** Default true; false: the backing file is not opened and unallocated clusters read as zeros. */
  openBacking?: boolean;
  /** Decompression; default {@link pureCodecs}. */
  codecs?: Qcow2Codecs;
  /** Depth of this image in its chain (0 = top). */
  chainDepth?: number;
  /**
   * Default true. False when the format was probed rather than declared: the image may then not
   * name a backing file or an external data file (EUNSUPPORTED), so a raw disk whose guest wrote a
   * qcow header cannot pull in files of its choosing.
   */
  allowExternalFiles?: boolean;
  /** Bytes of L2 (or qcow L2) tables to cache; default: enough for the whole image, at most 32 MiB. */
  l2CacheBytes?: number;
  /** Most host I/Os in flight for one request; default 8. */
  concurrency?: number;
  description?: string;
}

export interface Qcow2OpenOptions extends ImageOpenOptions {
  /** Opens the external data file named by the image (required to read an image that has one). */
  resolveDataFile?: (name: string) => Promise<BlockDevice>;
  /**
   * Opens an internal snapshot (read-only) instead of the active state: by `id`, by `name`, or by
   * `idOrName` (an id first, then a name, as qemu-img's `-s` / `-l X`).
   */
  snapshot?: { id?: string; name?: string; idOrName?: string };
  /**
   * Guest size of an opened snapshot: `'current'` (default) keeps the image's current virtual size
   * as QEMU does for `qemu-img convert -l` and `qemu-nbd -l` (clusters beyond the snapshot's L1
   * read as unallocated); `'snapshot'` uses the size recorded in the snapshot.
   */
  snapshotSize?: 'current' | 'snapshot';
  /**
   * Opened for writing: host clusters the image stops using (refcount down to 0, after a discard,
   * a write of zeros that unmaps, a rewritten compressed cluster) are discarded in the image file
   * too (`file.discard`: a punched hole on a regular file), so the file system gets the space
   * back, as QEMU does with `discard=unmap`. Default false: they stay allocated in the file until
   * the image reuses them.
   */
  discardFreedClusters?: boolean;
}
