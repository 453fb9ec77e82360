/**
 * Opening a qcow2 image for writing, for the commands that write guest data (commit, rebase,
 * bench -w, resize, convert -n): the image file read-write, its external data file read-write too
 * (its name resolved against the working folder, as QEMU does), its backing chain read-only through
 * the engine. Read-only layers are opened with force-share so the command can also hold a writer
 * on one of them.
 *
 * On a memory-backed file (tmpfs, ramfs: `syncIoMaxBytes: 'memory-backed'`), the image file's and the data file's
 * small requests (up to 64 KiB: 4 KiB guest writes, L2 slices, refcount blocks) run inline on the
 * calling thread instead of a round trip through libuv's pool: there a write is a memory copy that
 * never waits for a disk. `qcow2 bench -w` of 100k 4 KiB writes into allocated clusters at depth 32
 * on /dev/shm, 5 alternating runs, medians: 2.59 s on the pool, 1.07 s inline (qemu-img bench -i
 * threads 1.51 s). Disk file systems and block devices keep the pool (a request there may wait
 * for the disk, and the event loop must not).
 */
import { resolve } from 'node:path';
import type { BlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { Qcow2Image, RawImage } from '@qcowkit/qcow2-core';
import { detectFormat, type ImageFormat, type OpenedImage, openImage } from '../engine.js';
import { CliError, openError } from '../errors.js';
import { pathCombine } from '../paths.js';

export interface WritableImage {
  readonly device: BlockDevice;
  readonly format: ImageFormat;
  close(): Promise<void>;
}

/** `path` as a writable guest view; `backing` (when given) replaces the image's own backing file.
 * `noFlush`: the image file and its data file are never flushed (convert's `-t unsafe`).
 * `discardFreedClusters`: clusters the image stops using are punched in its file (qcow2-core's
 * option of that name; `convert -n` sets it, as qemu-img's target gives freed space back). */
export async function openWritable(
  path: string,
  displayName: string,
  options: {
    format?: ImageFormat | undefined;
    backing?: BlockDevice | undefined;
    noFlush?: boolean;
    discardFreedClusters?: boolean;
  } = {},
): Promise<WritableImage> {
  const noFlush = options.noFlush === true;
  let file: FileBlockDevice;
  try {
    file = await FileBlockDevice.open(path, {
      readOnly: false,
      noFlush,
      syncIoMaxBytes: 'memory-backed',
    });
  } catch (error) {
    throw openError(displayName, error, path);
  }
  const opened: OpenedImage[] = [];
  let dataFile: FileBlockDevice | undefined;
  const closeAll = async () => {
    for (const layer of opened.reverse()) await layer.close();
    await dataFile?.close();
  };
  try {
    const format = options.format ?? detectFormat(await file.read(0, Math.min(file.size, 512)));
    if (format === 'raw') {
      const image = new RawImage(file);
      return { device: image, format, close: async () => image.close() };
    }
    if (format !== 'qcow2') {
      throw new CliError(`Could not open '${displayName}': writing ${format} images is not supported`, {
        code: 'EUNSUPPORTED',
      });
    }
    const image = await Qcow2Image.open(file, {
      readOnly: false,
      discardFreedClusters: options.discardFreedClusters === true,
      resolveBacking: async ({ name, format: backingFormat }) => {
        if (options.backing !== undefined) return options.backing;
        const layer = await openImage(pathCombine(path, name), {
          displayName: name,
          format: backingFormat as ImageFormat | undefined,
          forceShare: true,
        });
        opened.push(layer);
        return layer.device;
      },
      resolveDataFile: async (name) => {
        // As the read-only path (core openImage): relative to the current working directory.
        const dataPath = resolve(name);
        try {
          dataFile = await FileBlockDevice.open(dataPath, {
            readOnly: false,
            noFlush,
            syncIoMaxBytes: 'memory-backed',
          });
        } catch (error) {
          throw openError(name, error, dataPath);
        }
        return dataFile;
      },
    });
    return {
      device: image,
      format,
      close: async () => {
        await image.close();
        await closeAll();
        await file.close();
      },
    };
  } catch (error) {
    await closeAll();
    await file.close();
    throw error;
  }
}
