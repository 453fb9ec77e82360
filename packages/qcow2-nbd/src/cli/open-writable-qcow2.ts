/**
 * Opens a qcow2 image file read-write for a writable export: the file under a write lock, the
 * engine's write path (dirty bit, crash-safe ordering; a dirty image is repaired on open), the
 * backing chain read-only below it, fast zeroing on top (see qcow2-fast-zero). Closing flushes the
 * metadata and clears the dirty bit.
 */
import { dirname, isAbsolute, resolve } from 'node:path';
import type { BlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import type { OpenedImage } from '@qcowkit/qcow2-core/node';
import type { ImageFormat } from './options.js';
import { FastZeroQcow2 } from './qcow2-fast-zero.js';

export interface WritableQcow2 {
  readonly device: BlockDevice;
  /** Flushes and closes the image (dirty bit cleared), then its backing chain and files. */
  close(): Promise<void>;
}

const BACKING_FORMATS: readonly string[] = ['qcow2', 'qcow', 'raw'];

export async function openWritableQcow2(
  path: string,
  fileOptions: { syncIoMaxBytes?: number } = {},
  imageOptions: { discardFreedClusters?: boolean } = {},
): Promise<WritableQcow2> {
  // Loaded on first use, as for read-only images.
  const { DEFAULT_L2_CACHE_MAX_BYTES, Qcow2Image } = await import('@qcowkit/qcow2-core');
  const { nodeCodecs, openImage } = await import('@qcowkit/qcow2-core/node');
  const below: OpenedImage[] = [];
  const extraFiles: BlockDevice[] = [];
  const closeBelow = async () => {
    for (const opened of below.reverse()) await opened.close().catch(() => {});
    for (const file of extraFiles) await file.close().catch(() => {});
  };
  const file = await FileBlockDevice.open(path, { readOnly: false, ...fileOptions });
  try {
    const image = await Qcow2Image.open(file, {
      readOnly: false,
      codecs: nodeCodecs,
      discardFreedClusters: imageOptions.discardFreedClusters === true,
      // The engine's (and QEMU's) largest default L2 cache, whatever the image's size. Dirty L2
      // slices are written back once they pass half the budget: with the default budget (just
      // enough for the whole image) a small image wrote back every few dozen allocating writes,
      // each time with two fdatasyncs, where qemu-nbd writes metadata back only on eviction or
      // flush. Only the tables the image has are loaded, so a small image still takes little
      // memory; the dirty part stays bounded and reaches the disk, in the safe order, on every
      // FLUSH or FUA write and on close.
      l2CacheBytes: DEFAULT_L2_CACHE_MAX_BYTES,
      resolveBacking: async ({ name, format }) => {
        // As QEMU: a backing file name is relative to the overlay's folder.
        const backingPath = isAbsolute(name) ? name : resolve(dirname(path), name);
        const declared =
          format !== undefined && BACKING_FORMATS.includes(format) ? (format as ImageFormat) : undefined;
        const opened = await openImage(backingPath, {
          readOnly: true,
          ...(declared !== undefined ? { format: declared } : {}),
        });
        below.push(opened);
        return opened.device;
      },
      resolveDataFile: async (name) => {
        // QEMU resolves an external data file name against the current working directory.
        const dataFile = await FileBlockDevice.open(resolve(name), { readOnly: false });
        extraFiles.push(dataFile);
        return dataFile;
      },
    });
    let closed = false;
    return {
      device: new FastZeroQcow2(image),
      close: async () => {
        if (closed) return;
        closed = true;
        try {
          await image.close();
        } finally {
          await file.close().catch(() => {});
          await closeBelow();
        }
      },
    };
  } catch (error) {
    await file.close().catch(() => {});
    await closeBelow();
    throw error;
  }
}
