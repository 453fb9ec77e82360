/**
 * createImage: `qemu-img create -f qcow2` from Node. The file is created (an existing one only with
 * `overwrite`), laid out by Qcow2Image.create, then opened read-write with its backing chain by
 * openImage (backing names resolve against the new image's folder, as QEMU does).
 *
 * Preallocation: 'metadata' allocates every L2 table and data cluster; 'falloc' and 'full' also
 * allocate the data clusters' storage in the file (fallocated, or written with zeros), laid out as
 * qemu-img create does (ops/preallocate.ts).
 */
import { resolve } from 'node:path';
import { BlockDeviceError } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { planQcow2Create, type Qcow2CreateOptions, writeQcow2Layout } from '../create.js';
import { Qcow2Image } from '../image.js';
import { preallocateData } from '../ops/preallocate.js';
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
    if (preallocation === 'metadata') {
      // The backing file is not needed to lay out metadata.
      const image = await Qcow2Image.create(file, {
        ...createOptions,
        preallocation: 'metadata',
        openBacking: false,
      });
      await image.close();
    } else {
      await writeQcow2Layout(file, { ...plan, preallocation: 'off' });
      // falloc and full: the data area after the refcount structures, as qemu-img create lays it.
      if (preallocation === 'falloc' || preallocation === 'full') await preallocateData(file, preallocation);
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
