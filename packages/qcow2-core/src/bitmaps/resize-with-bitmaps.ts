/**
 * Resizing an image file that has persistent bitmaps: the bitmaps must follow the new size (their
 * tables grow or shrink, bits past a smaller end are dropped), so the resize runs through the
 * engine, which stores them on close, and is refused while a bitmap is inconsistent, as QEMU does.
 */
import type { BlockDevice } from '@qcowkit/blockdev';
import { QCOW2_AUTOCLEAR_BITMAPS } from '../format/feature-bits.js';
import type { Qcow2Header } from '../format/header.js';
import { refuseDamagedImage } from '../ops/image-edit.js';

/** Whether `header` lists valid persistent bitmaps (the extension, with its autoclear bit set). */
export function hasPersistentBitmaps(header: Qcow2Header): boolean {
  return (
    header.version === 3 &&
    (header.autoclearFeatures.low & QCOW2_AUTOCLEAR_BITMAPS) !== 0 &&
    (header.extensions.bitmaps?.nbBitmaps ?? 0) > 0
  );
}

/** Resizes the qcow2 image in `file` to `newSize` through the engine; `file` stays open. */
export async function resizeWithBitmaps(file: BlockDevice, newSize: number): Promise<void> {
  // As every offline edit: nothing is written to a damaged image (the engine would set its
  // corrupt bit, mark the bitmaps in use and store the new size before finding the damage).
  await refuseDamagedImage(file);
  const { Qcow2Image } = await import('../image.js');
  const image = await Qcow2Image.open(keepOpen(file), { readOnly: false, openBacking: false });
  try {
    await image.resize(newSize);
  } finally {
    await image.close();
  }
}

/** `file` whose close() only flushes (the caller owns it). */
function keepOpen(file: BlockDevice): BlockDevice {
  return new Proxy(file, {
    get(target, property) {
      if (property === 'close') return () => target.flush();
      if (property === Symbol.asyncDispose) return () => target.flush();
      const value = Reflect.get(target, property, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}
