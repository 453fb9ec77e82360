/**
 * Copying a device's guest data into an existing device (qemu-img convert -n): every byte of the
 * target's first `source.size` bytes ends up equal to the source. Block status says where each
 * side reads as zeros: zero ranges of the source are skipped where the target already reads
 * zeros and written as zeros (allowing unmap) elsewhere; data ranges are read ahead into a few
 * reusable buffers, all-zero blocks in them handled as zero ranges, and the rest written in runs.
 */
import { type BlockDevice, BlockDeviceError, blockStatusAll, type Extent } from '@qcowkit/blockdev';

export interface CopyIntoOptions {
  /** Bytes per read (default 4 MiB) and reads in flight (default 4). */
  readonly chunkBytes?: number;
  readonly readDepth?: number;
  /** Zero detection granularity inside data ranges (default 64 KiB). */
  readonly blockBytes?: number;
  /** Look for all-zero blocks in data ranges (default true). False writes every data range whole,
   * zeros in it included, as qemu-img convert -C (copy offloading) does; ranges the source
   * reports as zeros are handled as zeros either way. */
  readonly detectZeroes?: boolean;
  /** Writes each whole, aligned block of data compressed (qemu-img convert -n -c); `blockBytes`
   * must then be the target's cluster size. */
  readonly writeCompressed?: (guestOffset: number, data: Uint8Array) => Promise<void>;
  /** The target is known to read as zeros (qemu-img convert --target-is-zero): nothing is zeroed
   * and the target's block status is not asked. */
  readonly targetIsZero?: boolean;
  /** qemu-img convert's `-S`: 0 writes every byte of the source as data (zeros and holes too),
   * so the target ends fully allocated over the source's size. Other values keep the default
   * (zero blocks of `blockBytes` zeroed, not written). */
  readonly sparseSize?: number;
  readonly signal?: AbortSignal;
  /** Bytes of the guest handled, of `source.size`. */
  readonly onProgress?: (done: number, total: number) => void;
}

/** Where the target reads as zeros, queried front to back. */
class ZeroMap {
  private index = 0;
  constructor(private readonly extents: Extent[]) {}

  /** Parts of [offset, offset + length) the target does not read as zeros (call in increasing order). */
  nonZeroParts(offset: number, length: number): { offset: number; length: number }[] {
    const end = offset + length;
    const parts: { offset: number; length: number }[] = [];
    while (this.index < this.extents.length) {
      const extent = this.extents[this.index]!;
      if (extent.offset + extent.length <= offset) this.index++;
      else break;
    }
    for (let at = this.index; at < this.extents.length; at++) {
      const extent = this.extents[at]!;
      if (extent.offset >= end) break;
      if (extent.zero) continue;
      const from = Math.max(offset, extent.offset);
      const to = Math.min(end, extent.offset + extent.length);
      const previous = parts[parts.length - 1];
      if (previous !== undefined && previous.offset + previous.length === from) previous.length += to - from;
      else parts.push({ offset: from, length: to - from });
    }
    return parts;
  }
}

/** Copies `source` into the first `source.size` bytes of `target`, then flushes `target`. */
export async function copyInto(
  source: BlockDevice,
  target: BlockDevice,
  options: CopyIntoOptions = {},
): Promise<void> {
  const { signal } = options;
  if (target.readOnly) throw new BlockDeviceError('EROFS', `copy: ${target.description} is read-only`);
  if (target.size < source.size) {
    throw new BlockDeviceError(
      'EINVAL',
      `copy: output file is smaller than input file (${target.size} < ${source.size} bytes)`,
    );
  }
  const size = source.size;
  const blockBytes = options.blockBytes ?? 65536;
  const chunkBytes = Math.max(
    blockBytes,
    Math.floor((options.chunkBytes ?? 4 * 1024 * 1024) / blockBytes) * blockBytes,
  );
  const depth = Math.max(1, options.readDepth ?? 4);
  const writeAll = options.sparseSize === 0;
  if (size === 0) return;
  const targetZeros = new ZeroMap(
    options.targetIsZero === true
      ? [{ offset: 0, length: size, zero: true, data: false, present: false, depth: 0 }]
      : await blockStatusAll(target, 0, size, { signal }),
  );
  const sourceExtents = await blockStatusAll(source, 0, size, { signal });
  let done = 0;
  options.onProgress?.(0, size);
  const advance = (bytes: number) => {
    done += bytes;
    options.onProgress?.(done, size);
  };

  const writeZeroes = async (offset: number, length: number) => {
    for (const part of targetZeros.nonZeroParts(offset, length))
      await target.writeZeroes(part.offset, part.length, { mayUnmap: true, signal });
  };

  /** One piece of work in guest order: a zero range, or a chunk of data to read. */
  type Job = { offset: number; length: number; zero: boolean };
  function* jobs(): Generator<Job> {
    for (const extent of sourceExtents) {
      if (extent.zero && !writeAll) {
        yield { offset: extent.offset, length: extent.length, zero: true };
        continue;
      }
      for (let at = extent.offset; at < extent.offset + extent.length; ) {
        // Chunks end on block boundaries (guest offsets) so zero detection sees whole blocks.
        const boundary = Math.floor((at + chunkBytes) / blockBytes) * blockBytes;
        const end = Math.min(extent.offset + extent.length, boundary > at ? boundary : at + chunkBytes);
        yield { offset: at, length: end - at, zero: false };
        at = end;
      }
    }
  }

  const buffers = Array.from({ length: depth }, () => new Uint8Array(chunkBytes + blockBytes));
  const queue: { job: Job; buffer: Uint8Array | undefined; read: Promise<void> }[] = [];
  const iterator = jobs();
  let issued = 0;
  let exhausted = false;
  let reads = 0;
  const fill = () => {
    while (!exhausted && reads < depth) {
      const next = iterator.next();
      if (next.done) {
        exhausted = true;
        break;
      }
      const job = next.value;
      if (job.zero) {
        queue.push({ job, buffer: undefined, read: Promise.resolve() });
        continue;
      }
      // The buffer was last used by the job `depth` data jobs ago, whose writes are done.
      const buffer = buffers[issued++ % depth]!.subarray(0, job.length);
      const read = source.readInto(buffer, job.offset, { signal });
      read.catch(() => {}); // observed when its turn comes
      reads++;
      queue.push({ job, buffer, read });
    }
  };

  fill();
  while (queue.length > 0) {
    const { job, buffer, read } = queue.shift()!;
    signal?.throwIfAborted();
    if (buffer === undefined) {
      await writeZeroes(job.offset, job.length);
      advance(job.length);
      fill();
      continue;
    }
    await read;
    reads--;
    await writeData(job.offset, buffer);
    advance(job.length);
    fill();
  }
  await target.flush({ signal });

  async function writeData(offset: number, bytes: Uint8Array): Promise<void> {
    const writes: Promise<void>[] = [];
    let runStart = -1;
    let zeroStart = -1;
    const flushRun = (end: number) => {
      if (runStart < 0) return;
      const data = bytes.subarray(runStart, end);
      writes.push(writeRun(offset + runStart, data));
      runStart = -1;
    };
    const flushZeros = async (end: number) => {
      if (zeroStart < 0) return;
      await writeZeroes(offset + zeroStart, end - zeroStart);
      zeroStart = -1;
    };
    if (options.detectZeroes === false) {
      await writeRun(offset, bytes);
      return;
    }
    // Blocks are aligned to guest offsets, so the first and last may be partial.
    let at = 0;
    while (at < bytes.length) {
      const blockEnd = Math.min(
        bytes.length,
        (Math.floor((offset + at) / blockBytes) + 1) * blockBytes - offset,
      );
      if (!writeAll && isZero(bytes, at, blockEnd)) {
        flushRun(at);
        if (zeroStart < 0) zeroStart = at;
      } else {
        await flushZeros(at);
        if (runStart < 0) runStart = at;
      }
      at = blockEnd;
    }
    flushRun(bytes.length);
    await flushZeros(bytes.length);
    await Promise.all(writes);
  }

  async function writeRun(offset: number, data: Uint8Array): Promise<void> {
    const compressed = options.writeCompressed;
    if (compressed === undefined) return target.write(offset, data, { signal });
    // Whole aligned blocks compressed, the partial ends written plain.
    let at = 0;
    while (at < data.length) {
      const guest = offset + at;
      const blockEnd = (Math.floor(guest / blockBytes) + 1) * blockBytes;
      const end = Math.min(offset + data.length, blockEnd);
      const piece = data.subarray(at, end - offset);
      if (guest % blockBytes === 0 && piece.length === blockBytes) await compressed(guest, piece);
      else await target.write(guest, piece, { signal });
      at = end - offset;
    }
  }
}

function isZero(bytes: Uint8Array, from: number, to: number): boolean {
  for (let index = from; index < to; index++) if (bytes[index] !== 0) return false;
  return true;
}
