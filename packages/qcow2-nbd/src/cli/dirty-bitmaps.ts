/**
 * qemu-nbd's `-B NAME`: a qcow2 image's persistent dirty bitmap as an NBD dirty bitmap source
 * (the `qemu:dirty-bitmap:NAME` meta context), with qemu-nbd's refusals: a bitmap that is not there
 * (raw files have none) and an inconsistent one (`in_use` in the file) stop the server from starting.
 *
 * A read-only image's bitmap is read once at start (its bits cannot change). A writable image's
 * bitmap is live, as qemu-nbd's: writes through the export set the bits of an enabled bitmap, and
 * BLOCK_STATUS reports them at once.
 */
import type { BlockDevice } from '@qcowkit/blockdev';
import type { DirtyBitmap, Qcow2Image, StoredBitmap } from '@qcowkit/qcow2-core';
import { bitmapExtents } from '../server/bitmap-extents.js';
import type { DirtyExtent, NbdDirtyBitmap } from '../server/export.js';
import { CliError } from './errors.js';

/** Chunks (one bitmap data cluster each) a live bitmap composes for one query. */
const LIVE_CHUNKS_PER_QUERY = 16;

/**
 * The sources for `names` from `image` (undefined for a raw file or a qcow image: no bitmaps),
 * in the order given.
 */
export async function openDirtyBitmaps(
  image: BlockDevice | undefined,
  names: readonly string[],
): Promise<NbdDirtyBitmap[]> {
  if (names.length === 0) return [];
  const { Qcow2Image: Qcow2ImageClass, readStoredBitmap } = await import('@qcowkit/qcow2-core');
  const qcow2 = image instanceof Qcow2ImageClass ? image : undefined;
  const sources: NbdDirtyBitmap[] = [];
  for (const name of names) {
    const entry = qcow2?.bitmapDirectory.find((candidate) => candidate.name === name);
    if (qcow2 === undefined || entry === undefined) throw new CliError(`Bitmap '${name}' is not found`);
    if (qcow2.readOnly) {
      if (entry.inUse) throw inconsistent(name);
      sources.push(storedSource(name, await readStoredBitmap(qcow2, name), qcow2.size));
    } else {
      sources.push(await liveSource(qcow2, name));
    }
  }
  return sources;
}

function inconsistent(name: string): CliError {
  return new CliError(`Bitmap '${name}' is inconsistent and cannot be used`);
}

function storedSource(name: string, stored: StoredBitmap, guestSize: number): NbdDirtyBitmap {
  return {
    name,
    extents: async (offset, length, limit) =>
      bitmapExtents(stored, offset, Math.min(offset + length, guestSize), limit),
  };
}

/** A writable image's bitmap: the bits stored at start, with those set since (the engine's). */
async function liveSource(image: Qcow2Image, name: string): Promise<NbdDirtyBitmap> {
  const bitmaps = await image.persistentBitmaps();
  // Opening for writing marked the consistent bitmaps in use; those already in use were not.
  if (bitmaps.inconsistent.includes(name)) throw inconsistent(name);
  const bitmap = bitmaps.bitmap(name);
  if (bitmap === undefined) throw new CliError(`Bitmap '${name}' is not found`);
  const stored = await bitmaps.currentBits(name);
  return {
    name,
    extents: async (offset, length, limit) => liveExtents(bitmap, stored, image.size, offset, length, limit),
  };
}

function liveExtents(
  bitmap: DirtyBitmap,
  stored: StoredBitmap,
  guestSize: number,
  offset: number,
  length: number,
  limit: number,
): DirtyExtent[] {
  const { granularity, chunkBits } = bitmap;
  const chunkBytes = chunkBits / 8;
  const end = Math.min(offset + length, guestSize);
  const out: DirtyExtent[] = [];
  let position = offset;
  for (let step = 0; step < LIVE_CHUNKS_PER_QUERY && position < end && out.length < limit; step++) {
    const chunk = Math.floor(Math.floor(position / granularity) / chunkBits);
    const firstBit = chunk * chunkBits;
    const storedBytes = stored.bits.subarray(chunk * chunkBytes, (chunk + 1) * chunkBytes);
    const bits = bitmap.compose(chunk, storedBytes) ?? new Uint8Array(chunkBytes);
    const window = { bits, firstBit, bitCount: Math.min(chunkBits, bitmap.bits - firstBit), granularity };
    for (const extent of bitmapExtents(window, position, end, limit)) {
      const previous = out[out.length - 1];
      if (previous !== undefined && previous.dirty === extent.dirty) {
        out[out.length - 1] = { length: previous.length + extent.length, dirty: extent.dirty };
      } else if (out.length < limit) {
        out.push(extent);
      } else {
        return out;
      }
      position += extent.length;
    }
  }
  return out;
}
