/**
 * The image file itself opened read-write, for the commands that change metadata in place (amend,
 * resize, snapshot): open (refusals in qemu-img's words), detect the format unless given, run the
 * change, close whatever happened; or only its format probed (`probeImageFormat`: rebase, amend's
 * option list). On tmpfs or ramfs small reads and writes run inline (the
 * offline edits read and write table by table: no thread-pool hand-off for each).
 */
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { detectFormat, type ImageFormat } from '../engine.js';
import { openError } from '../errors.js';

/** Runs `change` on `path` opened read-write with its format (`format`, else detected); closes it after. */
export async function withImageFileForWrite<T>(
  path: string,
  displayName: string,
  format: ImageFormat | undefined,
  change: (device: FileBlockDevice, format: ImageFormat) => Promise<T>,
): Promise<T> {
  let device: FileBlockDevice;
  try {
    device = await FileBlockDevice.open(path, { readOnly: false, syncIoMaxBytes: 'memory-backed' });
  } catch (error) {
    throw openError(displayName, error, path);
  }
  try {
    return await change(device, format ?? detectFormat(await device.read(0, Math.min(device.size, 512))));
  } finally {
    await device.close();
  }
}

/** The format of the image at `path`: `format` when given, else probed from its first bytes
 * (the file opened read-only, shared, and closed again). */
export async function probeImageFormat(
  path: string,
  displayName: string,
  format: ImageFormat | undefined,
): Promise<ImageFormat> {
  if (format !== undefined) return format;
  let device: FileBlockDevice;
  try {
    device = await FileBlockDevice.open(path, { readOnly: true, forceShare: true });
  } catch (error) {
    throw openError(displayName, error, path);
  }
  try {
    return detectFormat(await device.read(0, Math.min(device.size, 512)));
  } finally {
    await device.close();
  }
}
