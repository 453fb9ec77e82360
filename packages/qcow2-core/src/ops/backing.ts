/**
 * Backing files: `qemu-img rebase` and `qemu-img commit` as library calls over BlockDevices.
 *
 * - {@link setBackingFile} rewrites the backing file name and format in the header (rebase -u).
 * - {@link copyBackingDifferences} is the data part of a safe rebase: wherever the overlay does not
 *   hold the data itself, and the old and new backing differ, the old backing's bytes are written
 *   into the overlay, so the guest view stays the same once the header names the new backing.
 * - {@link commitToBacking} writes what the overlay holds into its backing device (or, with
 *   `baseDepth`, what every layer above a deeper base holds into that base, as `qemu-img commit
 *   -b`); {@link emptyImage} then drops every cluster of the overlay, as qemu-img commit does by
 *   default.
 *
 * Both report progress as `onProgress(done, total)` in bytes of the ranges they walk.
 *
 * The overlay and backing images are BlockDevices the caller opens (a qcow2 image opened for
 * writing, a raw file, ...), so the same calls serve any backing format.
 */
import { type BlockDevice, BlockDeviceError, type Extent } from '@qcowkit/blockdev';
import { QCOW2_EXT_MAGIC_BACKING_FORMAT } from '../format/header-extensions.js';
import { rewriteHeader } from './header-rewrite.js';
import { ImageEdit, type ImageEditOptions } from './image-edit.js';
import { addTreeReferences } from './tree-references.js';

/** Bytes compared or copied at a time. */
const CHUNK = 1024 * 1024;
/** QEMU's limit on a backing file name (bytes). */
const MAX_BACKING_NAME = 1023;

export interface BackingFileSpec {
  /** The new backing file name (as stored: relative names resolve against the overlay's folder); undefined removes it. */
  readonly backingFile: string | undefined;
  /** Its format (`qcow2`, `raw`, ...), stored in the backing format extension; undefined leaves none. */
  readonly backingFormat?: string;
}

/** Rewrites the backing file name and format (`qemu-img rebase -u`). */
export async function setBackingFile(
  file: BlockDevice,
  spec: BackingFileSpec,
  options: ImageEditOptions = {},
): Promise<void> {
  if (
    spec.backingFile !== undefined &&
    new TextEncoder().encode(spec.backingFile).length > MAX_BACKING_NAME
  ) {
    throw new BlockDeviceError(
      'EINVAL',
      `qcow2 rebase: backing file name longer than ${MAX_BACKING_NAME} bytes`,
    );
  }
  if (spec.backingFile === undefined && spec.backingFormat !== undefined) {
    throw new BlockDeviceError('EINVAL', 'qcow2 rebase: a backing format needs a backing file');
  }
  const edit = await ImageEdit.open(file, options);
  const others = edit.header.extensions.list.filter((e) => e.type !== QCOW2_EXT_MAGIC_BACKING_FORMAT);
  const extensions =
    spec.backingFormat === undefined
      ? others
      : [
          { type: QCOW2_EXT_MAGIC_BACKING_FORMAT, data: new TextEncoder().encode(spec.backingFormat) },
          ...others,
        ];
  await rewriteHeader(edit, { backingFileName: spec.backingFile, extensions });
}

/** All extents of `[0, device.size)`. */
async function* extentsOf(device: BlockDevice, signal?: AbortSignal): AsyncGenerator<Extent> {
  let offset = 0;
  while (offset < device.size) {
    const extents = await device.blockStatus(offset, Math.min(device.size - offset, 64 * CHUNK), { signal });
    for (const extent of extents) yield extent;
    const last = extents[extents.length - 1];
    if (last === undefined) break;
    offset = last.offset + last.length;
  }
}

/** Fills `target` with the bytes of `device` at `offset`, zeros where the device ends (or is absent). */
async function readOrZero(
  device: BlockDevice | undefined,
  offset: number,
  target: Uint8Array,
  signal?: AbortSignal,
): Promise<Uint8Array> {
  const available = device === undefined ? 0 : Math.max(0, Math.min(target.length, device.size - offset));
  if (available > 0) await device!.readInto(target.subarray(0, available), offset, { signal });
  if (available < target.length) target.fill(0, available);
  return target;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  return Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}

/** Sum of the extents' lengths. */
function totalLength(extents: readonly Extent[]): number {
  let total = 0;
  for (const extent of extents) total += extent.length;
  return total;
}

/** Windows (at most `size` bytes, split at multiples of `align`) covering the extents, in order. */
function* windowsOf(extents: readonly Extent[], size: number, align: number): Generator<[number, number]> {
  for (const extent of extents) {
    const end = extent.offset + extent.length;
    for (let offset = extent.offset; offset < end; ) {
      const next = Math.min(end, Math.floor((offset + size) / align) * align || offset + size);
      const length = Math.max(1, Math.min(next, end) - offset);
      yield [offset, length];
      offset += length;
    }
  }
}

/**
 * Runs `load` on the windows with up to `depth` of them in flight, and `consume` on each in
 * order (the next loads run while one is consumed). Each in-flight window gets its own buffers
 * from `makeBuffers`, reused once consumed.
 */
async function pipeline<B>(
  windows: Iterable<[number, number]>,
  depth: number,
  makeBuffers: () => B,
  load: (offset: number, length: number, buffers: B) => Promise<unknown>,
  consume: (offset: number, length: number, buffers: B) => Promise<void>,
): Promise<void> {
  const free: B[] = [];
  const queue: Array<{ offset: number; length: number; buffers: B; loaded: Promise<unknown> }> = [];
  const drainOne = async () => {
    const head = queue.shift()!;
    await head.loaded;
    await consume(head.offset, head.length, head.buffers);
    free.push(head.buffers);
  };
  try {
    for (const [offset, length] of windows) {
      const buffers = free.pop() ?? makeBuffers();
      const loaded = load(offset, length, buffers);
      loaded.catch(() => undefined); // awaited in order by drainOne
      queue.push({ offset, length, buffers, loaded });
      if (queue.length >= depth) await drainOne();
    }
    while (queue.length > 0) await drainOne();
  } finally {
    // On failure, let reads in flight land before the caller closes the devices.
    await Promise.allSettled(queue.map((entry) => entry.loaded));
  }
}

/** Whether the extent of `extents` (sorted, disjoint) holding `offset` reads as zeros. */
function isZeroAt(extents: readonly Extent[], offset: number): boolean {
  let low = 0;
  let high = extents.length - 1;
  while (low <= high) {
    const middle = (low + high) >> 1;
    const extent = extents[middle]!;
    if (offset < extent.offset) high = middle - 1;
    else if (offset >= extent.offset + extent.length) low = middle + 1;
    else return extent.zero;
  }
  return false;
}

/** Bytes committed per write: big writes let the target allocate many clusters at once. */
const COMMIT_WINDOW = 4 * CHUNK;

/** Windows in flight in the copy loops. */
const READ_AHEAD = 4;

export interface CopyBackingOptions {
  /** The overlay's guest view over its current (old) backing, opened for writing. */
  readonly overlay: BlockDevice;
  /** The current backing (undefined: none). */
  readonly oldBacking: BlockDevice | undefined;
  /** The backing the overlay is moving to (undefined: none). */
  readonly newBacking: BlockDevice | undefined;
  /** Comparison granularity in bytes (default 64 KiB): differing pieces are copied whole. */
  readonly granularity?: number;
  readonly signal?: AbortSignal;
  /** Called as ranges are compared: bytes done and the total the overlay does not hold itself. */
  readonly onProgress?: (done: number, total: number) => void;
}

/**
 * The data part of a safe rebase: copies into the overlay the old backing's bytes wherever the
 * overlay does not hold the data and the new backing differs. Returns the bytes copied. Flushes
 * the overlay at the end; then close it and call {@link setBackingFile}.
 */
export async function copyBackingDifferences(options: CopyBackingOptions): Promise<number> {
  const { overlay, oldBacking, newBacking, signal } = options;
  const granularity = options.granularity ?? 64 * 1024;
  let copied = 0;
  const pending: Extent[] = [];
  for await (const extent of extentsOf(overlay, signal)) {
    if (extent.present && extent.depth === 0) continue;
    pending.push(extent);
  }
  const total = totalLength(pending);
  let done = 0;
  options.onProgress?.(0, total);
  // Windows of up to 1 MiB (split at granules) are read from both backings ahead of the
  // comparison; a window that differs is copied granule by granule, only where it differs.
  const windowSize = Math.max(granularity, CHUNK - (CHUNK % granularity));
  await pipeline(
    windowsOf(pending, windowSize, granularity),
    READ_AHEAD,
    () => [new Uint8Array(windowSize), new Uint8Array(windowSize)] as const,
    async (offset, length, [before, after]) => {
      signal?.throwIfAborted();
      await Promise.all([
        readOrZero(oldBacking, offset, before.subarray(0, length), signal),
        readOrZero(newBacking, offset, after.subarray(0, length), signal),
      ]);
    },
    async (offset, length, [before, after]) => {
      if (!equalBytes(before.subarray(0, length), after.subarray(0, length))) {
        for (let at = 0; at < length; ) {
          const piece = Math.min(granularity - ((offset + at) % granularity), length - at);
          const old = before.subarray(at, at + piece);
          if (!equalBytes(old, after.subarray(at, at + piece))) {
            await overlay.write(offset + at, old);
            copied += piece;
          }
          at += piece;
        }
      }
      done += length;
      options.onProgress?.(done, total);
    },
  );
  await overlay.flush();
  return copied;
}

export interface CommitOptions {
  /** The overlay's guest view (its data and what shows through from the backing chain). */
  readonly overlay: BlockDevice;
  /** The device committed into, opened for writing; grown to the overlay's size when smaller. */
  readonly backing: BlockDevice;
  /**
   * Where `backing` sits in the overlay's chain as block status counts depth: 1 (the default) for
   * the overlay's own backing file, 2 for the one below it, ... Every range a layer above it
   * answers (depth below `baseDepth`) is committed (`qemu-img commit -b BASE`).
   */
  readonly baseDepth?: number;
  readonly signal?: AbortSignal;
  /** Called as ranges are written: bytes done and the total to commit. */
  readonly onProgress?: (done: number, total: number) => void;
  /** At most this many bytes a second (`qemu-img commit -r`); unlimited when absent or 0. */
  readonly rateLimit?: number;
}

/** Writes every range the layers above the base hold into the base device; returns the bytes written. */
export async function commitToBacking(options: CommitOptions): Promise<number> {
  const { overlay, backing, signal } = options;
  const baseDepth = options.baseDepth ?? 1;
  if (!Number.isSafeInteger(baseDepth) || baseDepth < 1) {
    throw new BlockDeviceError('EINVAL', `qcow2 commit: invalid base depth ${baseDepth}`);
  }
  if (backing.size < overlay.size) {
    if (!backing.capabilities.resize) {
      throw new BlockDeviceError('ENOSPC', 'qcow2 commit: the backing device is smaller and cannot grow');
    }
    await backing.resize(overlay.size);
  }
  let written = 0;
  const own: Extent[] = [];
  for await (const extent of extentsOf(overlay, signal)) {
    if (extent.present && extent.depth < baseDepth) own.push(extent);
  }
  const total = totalLength(own);
  options.onProgress?.(0, total);
  const rateLimit = options.rateLimit ?? 0;
  if (!(rateLimit >= 0) || !Number.isFinite(rateLimit)) {
    throw new BlockDeviceError('EINVAL', `qcow2 commit: invalid rate limit ${rateLimit}`);
  }
  const started = Date.now();
  // Data windows are read ahead of the writes (which land in order); zero runs are one request.
  await pipeline(
    windowsOf(own, COMMIT_WINDOW, 512),
    READ_AHEAD,
    () => new Uint8Array(COMMIT_WINDOW),
    async (offset, length, buffer) => {
      signal?.throwIfAborted();
      if (!isZeroAt(own, offset)) await overlay.readInto(buffer.subarray(0, length), offset, { signal });
    },
    async (offset, length, buffer) => {
      if (isZeroAt(own, offset)) await backing.writeZeroes(offset, length, { mayUnmap: true, signal });
      else await backing.write(offset, buffer.subarray(0, length), { signal });
      written += length;
      options.onProgress?.(written, total);
      if (rateLimit > 0) {
        // Throttled: the next window waits until the bytes so far fit the rate.
        const wait = started + (written / rateLimit) * 1000 - Date.now();
        if (wait > 0) await new Promise<void>((resolve) => setTimeout(resolve, wait));
      }
    },
  );
  await backing.flush({ signal });
  return written;
}

/**
 * Drops every cluster of the active layer (`qemu-img commit` empties the overlay afterwards):
 * the L1 table is cleared first, then the refcounts lowered. Refused with internal snapshots.
 */
export async function emptyImage(file: BlockDevice, options: ImageEditOptions = {}): Promise<void> {
  const edit = await ImageEdit.open(file, options);
  const { header } = edit;
  if (header.nbSnapshots > 0) {
    throw new BlockDeviceError('EUNSUPPORTED', 'qcow2: cannot empty an image with internal snapshots');
  }
  if (header.l1Size === 0) return;
  await addTreeReferences(edit, header.l1TableOffset, header.l1Size, -1);
  await edit.write(header.l1TableOffset, new Uint8Array(header.l1Size * 8));
  await edit.flush();
  await edit.commitRefcounts();
  let last = edit.counts.length - 1;
  while (last >= 0 && (edit.counts[last] ?? 0) === 0) last--;
  const end = (last + 1) * edit.clusterSize;
  if (end < file.size && file.capabilities.resize) await file.resize(end);
}
