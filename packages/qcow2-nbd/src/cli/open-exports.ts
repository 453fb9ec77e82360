/**
 * Opens the images named on the command line as BlockDevices. Raw files are FileBlockDevices;
 * qcow2 images are opened read-write through the engine's write path (see open-writable-qcow2),
 * or read-only through qcow2-core's node entry with -r, -s (then an overlay in memory takes the
 * writes) or -l. qcow images are served read-only.
 */
import { open as openFile } from 'node:fs/promises';
import { type BlockDevice, isBlockDeviceError, OverlayBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice, isMemoryBacked } from '@qcowkit/blockdev/node';
import type { OpenedImage } from '@qcowkit/qcow2-core/node';
import type { NbdExport } from '../server/export.js';
import { openDirtyBitmaps } from './dirty-bitmaps.js';
import { CliError } from './errors.js';
import { type FileIoOptions, fileIoOptions } from './file-io.js';
import { openWritableQcow2 } from './open-writable-qcow2.js';
import { type CliOptions, type ExportSpec, type ImageFormat, parseSnapshotSpec } from './options.js';
import { FastZeroQcow2 } from './qcow2-fast-zero.js';

export interface OpenedExports {
  readonly exports: NbdExport[];
  /** Closes every device (overlays first, then images and files). */
  close(): Promise<void>;
}

export async function openExports(options: CliOptions): Promise<OpenedExports> {
  const closers: (() => Promise<void>)[] = [];
  const close = async () => {
    for (const closer of closers.reverse()) {
      try {
        await closer();
      } catch {
        // Closing is best effort; the first failure must not keep the others open.
      }
    }
  };
  try {
    const exports: NbdExport[] = [];
    for (const spec of options.exports) {
      exports.push(await openOne(spec, options, closers));
    }
    return { exports, close };
  } catch (error) {
    await close();
    throw error;
  }
}

async function openOne(
  spec: ExportSpec,
  options: CliOptions,
  closers: (() => Promise<void>)[],
): Promise<NbdExport> {
  const format = options.format ?? (await probeFormat(spec.path));
  // With -s the file itself is never written.
  const readOnlyFile = options.readOnly || options.snapshot || options.loadSnapshot !== undefined;
  let device: BlockDevice;
  /** The image whose bitmaps -B names (undefined for raw files). */
  let image: BlockDevice | undefined;
  /** The raw file itself, when READ replies may be sent from it (see NbdExport.fileSource). */
  let fileSource: { fd: number; writes: boolean } | undefined;
  const aio = options.aio ?? 'auto';
  const fileIo = await fileIoOptions(aio, spec.path);
  if (format === 'raw') {
    if (options.loadSnapshot !== undefined)
      throw new CliError(`${spec.path}: -l needs a qcow2 image, not raw`);
    const file = await FileBlockDevice.open(spec.path, { readOnly: readOnlyFile, ...fileIo });
    closers.push(() => file.close());
    device = file;
    // Not with --aio=threads: that asks for no file I/O on the event loop's thread at all. `auto`
    // has asked the file system already (inline I/O only on memory-backed files).
    const memoryBacked =
      aio === 'auto' ? fileIo.syncIoMaxBytes > 0 : aio === 'sync' && (await isMemoryBacked(spec.path));
    if (memoryBacked) fileSource = { fd: file.fd, writes: !readOnlyFile };
  } else {
    if (!readOnlyFile && format === 'qcow2') {
      // --discard=unmap: clusters TRIM (or a WRITE_ZEROES that unmaps) frees are punched in the
      // image file too, as qemu-nbd's discard=unmap gives the space back.
      const writable = await openWritableQcow2(spec.path, fileIo, {
        discardFreedClusters: options.discard === 'unmap',
      });
      closers.push(() => writable.close());
      device = writable.device;
      image = writable.device instanceof FastZeroQcow2 ? writable.device.image : writable.device;
    } else {
      if (!readOnlyFile) {
        throw new CliError(
          `${spec.path}: ${format} images are served read-only: add -r/--read-only or -s/--snapshot`,
        );
      }
      const opened = await openImageOf(spec.path, format, options.loadSnapshot, fileIo);
      closers.push(() => opened.close());
      device = opened.device;
      image = opened.image;
    }
  }
  // As qemu-nbd: the bitmaps of the image itself (with -s, writes to the overlay leave them alone).
  const dirtyBitmaps = await openDirtyBitmaps(image, options.bitmaps);
  if (options.snapshot) {
    const overlay = new OverlayBlockDevice(device, { readOnly: options.readOnly });
    closers.push(() => overlay.close());
    device = overlay;
    // The overlay's writes are not in the file.
    fileSource = undefined;
  }
  return {
    name: spec.name,
    description: options.description ?? `${format}:${spec.path}`,
    device,
    readOnly: options.readOnly,
    discard: options.discard === 'unmap',
    allocationDepth: options.allocationDepth,
    // qemu-nbd lists the contexts of several -B in the reverse order of the command line.
    dirtyBitmaps: dirtyBitmaps.reverse(),
    ...(fileSource !== undefined && { fileSource }),
  };
}

async function openImageOf(
  path: string,
  format: ImageFormat,
  snapshotSpec: string | undefined,
  fileIo: FileIoOptions,
): Promise<OpenedImage> {
  // Loaded on first use: serving raw files does not load the qcow2 engine at all.
  const { openImage } = await import('@qcowkit/qcow2-core/node');
  if (snapshotSpec === undefined) return openImage(path, { format, readOnly: true, ...fileIo });
  return openImage(path, {
    format,
    readOnly: true,
    ...fileIo,
    snapshot: parseSnapshotSpec(snapshotSpec),
    snapshotSize: 'snapshot',
  });
}

/** qemu's probe, reduced to what we serve: qcow2 and qcow magics, anything else raw. */
export async function probeFormat(path: string): Promise<ImageFormat> {
  let handle: Awaited<ReturnType<typeof openFile>>;
  try {
    handle = await openFile(path, 'r');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new CliError(`${path}: cannot open: ${code === 'ENOENT' ? 'no such file' : String(code ?? error)}`);
  }
  try {
    const head = Buffer.alloc(8);
    const { bytesRead } = await handle.read(head, 0, 8, 0);
    if (bytesRead >= 8 && head.readUInt32BE(0) === 0x514649fb) {
      return head.readUInt32BE(4) === 1 ? 'qcow' : 'qcow2';
    }
    return 'raw';
  } finally {
    await handle.close();
  }
}

/** True when `error` is a device error worth one line, not a stack. */
export function isExpectedError(error: unknown): boolean {
  return error instanceof CliError || isBlockDeviceError(error);
}
