/**
 * createImage: `qemu-img create -f qcow2` from Node. The file is created (an existing one only with
 * `overwrite`), laid out by Qcow2Image.create, then opened read-write with its backing chain by
 * openImage (backing names resolve against the new image's folder, as QEMU does).
 *
 * Preallocation: 'metadata' allocates every L2 table and data cluster; 'falloc' and 'full' also
 * allocate the data clusters' storage in the file (zeroed in place: fallocate where the file
 * system has it, else by writing zeros).
 */
import { resolve } from 'node:path';
import { BlockDeviceError, blockStatusAll } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { planQcow2Create, type Qcow2CreateOptions, writeQcow2Layout } from '../create.js';
import { Qcow2Image } from '../image.js';
import { type OpenedImage, type OpenImageOptions, openImage } from './open-image.js';

export interface CreateImageOptions extends Omit<Qcow2CreateOptions, 'preallocation'> {
  /** Default 'off'. */
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
  /** Replace an existing file (default false: EEXIST-like failure). */
  overwrite?: boolean;
  /** Passed to openImage for the returned image (L2 cache, codecs). */
  open?: Omit<OpenImageOptions, 'readOnly' | 'format' | 'snapshot'>;
}

/** Creates a qcow2 image at `path` and returns it opened read-write. */
export async function createImage(path: string, options: CreateImageOptions): Promise<OpenedImage> {
  const preallocation = options.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(preallocation)) {
    throw new BlockDeviceError('EINVAL', `qcow2 create: preallocation ${preallocation} is unknown`);
  }
  const { overwrite, open, preallocation: _preallocation, ...createOptions } = options;
  const plan = planQcow2Create({
    ...createOptions,
    preallocation: preallocation === 'off' ? 'off' : 'metadata',
  });
  const file = await FileBlockDevice.create(path, 0, { overwrite: overwrite ?? false });
  try {
    if (plan.preallocation === 'metadata') {
      // The backing file is not needed to lay out metadata.
      const image = await Qcow2Image.create(file, {
        ...createOptions,
        preallocation: 'metadata',
        openBacking: false,
      });
      if (preallocation === 'falloc' || preallocation === 'full') {
        for (const extent of await blockStatusAll(image, 0, image.size)) {
          if (extent.hostOffset === undefined) continue;
          const length = Math.ceil(extent.length / image.clusterSize) * image.clusterSize;
          await file.writeZeroes(extent.hostOffset, Math.min(length, file.size - extent.hostOffset));
        }
      }
      await image.close();
    } else {
      await writeQcow2Layout(file, plan);
      await file.close();
    }
  } catch (error) {
    await file.close().catch(() => {});
    throw error;
  }
  if (plan.dataFile !== undefined) {
    // qemu-img creates the data file too (relative to the current directory, as QEMU resolves it).
    const dataFile = await FileBlockDevice.create(resolve(plan.dataFile), plan.size, {
      overwrite: overwrite ?? false,
    });
    await dataFile.close();
  }
  // Images with an external data file open read-only: this engine does not write them yet.
  return openImage(path, { ...open, readOnly: plan.dataFile !== undefined, format: 'qcow2' });
}
