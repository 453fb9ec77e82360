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
): Promise<WritableQcow2> {
  // Loaded on first use, as for read-only images.
  const { Qcow2Image } = await import('@qcowkit/qcow2-core');
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
