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
import type { BlockDevice } from '@qcowkit/blockdev';
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
  let dataFile: FileBlockDevice | undefined;
  try {
    if (plan.dataFile !== undefined) {
      // qemu-img creates the data file too, at the guest size (relative to the current directory,
      // as QEMU resolves it).
      dataFile = await FileBlockDevice.create(resolve(plan.dataFile), plan.size, {
        overwrite: overwrite ?? false,
      });
    }
    // With a data file the data lives there: every preallocation mode maps each cluster to its
    // guest offset (metadata); falloc and full also allocate the data file's storage (zeros
    // written for full). A raw data file is mapped whole without preallocation too.
    const mapMetadata = preallocation === 'metadata' || (dataFile !== undefined && preallocation !== 'off');
    if (dataFile !== undefined && preallocation === 'falloc') await dataFile.writeZeroes(0, plan.size);
    if (dataFile !== undefined && preallocation === 'full') await writeZeroBytes(dataFile, plan.size);
    if (mapMetadata || plan.dataFileRaw) {
      // The backing file is not needed to lay out metadata.
      const device = dataFile;
      const image = await Qcow2Image.create(file, {
        ...createOptions,
        preallocation: mapMetadata ? 'metadata' : 'off',
        openBacking: false,
        ...(device === undefined ? {} : { resolveDataFile: async () => device }),
      });
      await image.close();
      dataFile = undefined; // closed with the image
    } else {
      await writeQcow2Layout(file, { ...plan, preallocation: 'off' });
      // falloc and full: the data area after the refcount structures, as qemu-img create lays it.
      if (preallocation === 'falloc' || preallocation === 'full') await preallocateData(file, preallocation);
      await file.close();
    }
  } catch (error) {
    await file.close().catch(() => {});
    throw error;
  } finally {
    await dataFile?.close().catch(() => {});
  }
  return openImage(path, { ...open, readOnly: false, format: 'qcow2' });
}

/** Writes zeros over `[0, length)` of `device` (allocating its storage), a few MiB at a time. */
async function writeZeroBytes(device: BlockDevice, length: number): Promise<void> {
  const chunk = new Uint8Array(Math.min(length, 4 * 1024 * 1024));
  for (let at = 0; at < length; at += chunk.length) {
    await device.write(at, chunk.subarray(0, Math.min(chunk.length, length - at)));
  }
}
