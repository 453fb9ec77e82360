/**
 * The copy loop of `qcow2 convert -O raw` (the default `-S` path): the guest's data extents are
 * read ahead into a ring of reusable buffers, and each buffer, once read, is scanned for all-zero
 * blocks and written out in guest order, one write at a time, as qemu-img convert does by default
 * (no `-W`).
 *
 * Why this shape, measured on /dev/shm with two cores (a 1 GiB guest holding 512 MiB):
 * - One write at a time: writes to one file take its inode lock in the kernel (tmpfs, ext4 and
 *   xfs alike for buffered writes), so parallel writes only wait on each other, spinning on the
 *   lock's owner and costing CPU. Reads take no such lock and overlap the write in flight.
 * - Reads from the file holding the data: when an extent's bytes lie uncompressed and in order in
 *   a plain file (a raw source, or a qcow2 image's data clusters), they are read from that file at
 *   their host offset, and extents whose host ranges follow each other (within a small gap, such
 *   as an L2 table qemu-img placed between two runs of data) share one read. The qcow2 layer then
 *   costs nothing per request, and a guest made of 1 MiB runs with holes between them needs half
 *   the reads.
 * - No async generator or promise per block on the way: one promise per read and per write.
 * - Writes inline on the main thread when the target is a regular file on tmpfs or ramfs (chosen
 *   by convert.ts with isMemoryBacked; a disk file system or a block device keeps the pool, where
 *   a write may wait for the disk). There a write is a memory copy that cannot block, and doing it
 *   on the thread that scanned the buffer saves the pool's hand-off per write: the futex wake, the
 *   completion through the event loop, and the gap between one write's end and the next one's
 *   start, which the writer thread spends idle. Reads stay on the pool, overlapping the writes.
 *   Measured (1 GiB guest holding 512 MiB, 64 KiB clusters, /dev/shm, medians of 12 alternating
 *   runs at load 3.5-4 on 2 cores, wall / user CPU / system CPU): pool writes 0.545 s / 0.160 /
 *   0.455, inline 0.392 s / 0.135 / 0.390, qemu-img 0.350 s / 0.045 / 0.425. An earlier trial of
 *   inline writes lost at load 11 (0.94 s against 0.73 s); with the JavaScript below cut down they
 *   won at every load tried since (3 to 7): at load 6, 16 alternating runs, inline 0.531 s /
 *   0.105 / 0.385, the same loop writing on the pool 0.609 s / 0.120 / 0.400, qemu-img 0.472 s.
 * - Little JavaScript to optimise: V8 compiles hot functions with TurboFan on a background thread
 *   that competes with the copy for the two cores. Planning reads from one async function per
 *   extent, and the zero scan inside an async function, cost 85 ms of compiling per run (46 ms
 *   for the planner alone); planning a block-status batch at a time in plain functions and
 *   scanning in two small synchronous functions leaves about 3 ms, and 30 to 60 ms less user CPU.
 * - Small reads of the source (its L2 and refcount tables) are inline too on a memory-backed
 *   source (4 KiB clusters: 580 table reads that were each a pool round trip); data reads, 2 MiB,
 *   stay on the pool.
 */
import type { BlockDevice, Extent } from '@qcowkit/blockdev';
import type { FileBlockDevice } from '@qcowkit/blockdev/node';
import { walkExtentBatches } from '../extents.js';

/** Host bytes between two extents that one read may still cover (read, never written). A read
 * from a host file may be this much longer than the chunk size, so two runs of data with an L2
 * table between them still fit one read: buffers are `readBufferSize(chunkSize)` bytes. */
export const MAX_READ_GAP = 64 * 1024;

/** Bytes of a buffer holding any read `planReads` plans with `chunkSize`. */
export function readBufferSize(chunkSize: number): number {
  return chunkSize + MAX_READ_GAP;
}

/** One read of the copy and where its bytes go in the guest. */
export interface ReadJob {
  /** The plain file read at `sourceOffset`, or undefined: the device, at guest offset `sourceOffset`. */
  readonly hostFile: FileBlockDevice | undefined;
  readonly sourceOffset: number;
  /** Bytes read into the start of the buffer. */
  length: number;
  /** Triples (offset in the buffer, guest offset, length), in guest order. */
  readonly pieces: number[];
  /** The range reads as zeros: nothing is read (jobs made for a stream, never by planReads). */
  readonly zero?: boolean;
}

export interface PlanOptions {
  /** Most bytes a read starts with (see {@link readBufferSize} for what it may grow to). */
  readonly chunkSize: number;
  /** The plain file holding the data an extent at `guestOffset` reports at layer `depth`, at the
   * extent's host offset (several sources: each source's own files). */
  readonly hostFile?: ((depth: number, guestOffset: number) => FileBlockDevice | undefined) | undefined;
  /** Called for each range that reads as zeros, in guest order, before any read after it. */
  readonly onZero?: ((offset: number, length: number) => Promise<void>) | undefined;
}

/**
 * Cuts the data extents of `device` into reads, in guest order: a read starts with at most
 * `chunkSize` bytes, and one from a host file takes in the extents that follow it there while it
 * stays within `readBufferSize(chunkSize)` bytes. `next()` returns the next read, or undefined at
 * the end; calls must not overlap.
 *
 * Each block-status lookup's extents are planned at once, synchronously, into a queue of reads and
 * zero ranges: the per-extent work stays in small plain functions (an async step per extent, and
 * one large async function holding the planning, cost more to run and to optimise than the copy
 * loop's own JavaScript).
 */
export function planReads(device: BlockDevice, options: PlanOptions): () => Promise<ReadJob | undefined> {
  const { chunkSize } = options;
  const batches = walkExtentBatches(device, 0, device.size);
  /** Planned reads, and zero ranges (jobs with `zero` set) to hand to `onZero`, in guest order. */
  let ready: ReadJob[] = [];
  let head = 0;
  /** The read still taking in extents. */
  let open: ReadJob | undefined;
  let finished = false;

  /** Bytes at `guest` (at `host` in `hostFile`) the open read can take in (0: none, it cannot). */
  const room = (hostFile: FileBlockDevice | undefined, guest: number, host: number): number => {
    if (open === undefined || open.hostFile !== hostFile) return 0;
    if (hostFile !== undefined) {
      const end = open.sourceOffset + open.length;
      if (host < end || host - end > MAX_READ_GAP) return 0;
      return Math.max(0, open.sourceOffset + readBufferSize(chunkSize) - host);
    }
    return open.sourceOffset + open.length === guest ? chunkSize - open.length : 0;
  };

  /** Plans the data range [guest, end) of the guest, at `host` in `hostFile` (else the device). */
  const planData = (
    hostFile: FileBlockDevice | undefined,
    guest: number,
    end: number,
    host: number,
  ): void => {
    while (guest < end) {
      const left = end - guest;
      // A range joins the open read only whole: cutting it to fill the read would cost one more
      // read for its rest (a range longer than a read is cut into whole reads anyway).
      let length: number;
      if (left <= room(hostFile, guest, host)) {
        const job = open!;
        const at = hostFile !== undefined ? host - job.sourceOffset : job.length;
        const pieces = job.pieces;
        // Guest-contiguous with the last piece and read right after it: one longer piece.
        const last = pieces.length - 3;
        if (pieces[last]! + pieces[last + 2]! === at && pieces[last + 1]! + pieces[last + 2]! === guest) {
          pieces[last + 2]! += left;
        } else {
          pieces.push(at, guest, left);
        }
        job.length = at + left;
        length = left;
      } else {
        if (open !== undefined) ready.push(open);
        length = Math.min(left, chunkSize);
        open = {
          hostFile,
          sourceOffset: hostFile !== undefined ? host : guest,
          length,
          pieces: [0, guest, length],
        };
      }
      guest += length;
      host += length;
    }
  };

  const plan = (extents: readonly Extent[]): void => {
    for (const extent of extents) {
      if (extent.zero) {
        ready.push({
          hostFile: undefined,
          sourceOffset: extent.offset,
          length: extent.length,
          pieces: [],
          zero: true,
        });
        continue;
      }
      const candidate =
        extent.hostOffset === undefined || extent.compressed === true || !extent.data
          ? undefined
          : options.hostFile?.(extent.depth, extent.offset);
      // Inside the file only (a short backing file's tail reads as zeros through the device).
      const hostFile =
        candidate !== undefined && extent.hostOffset! + extent.length <= candidate.size
          ? candidate
          : undefined;
      const guest = extent.offset;
      planData(hostFile, guest, guest + extent.length, hostFile === undefined ? guest : extent.hostOffset!);
    }
  };

  return async () => {
    for (;;) {
      while (head < ready.length) {
        const job = ready[head++]!;
        if (job.zero !== true) return job;
        await options.onZero?.(job.sourceOffset, job.length);
      }
      ready = [];
      head = 0;
      if (finished) return undefined;
      const next = await batches.next();
      if (next.done) {
        finished = true;
        if (open !== undefined) ready.push(open);
        open = undefined;
      } else {
        plan(next.value);
      }
    }
  };
}

/** A reusable buffer of the ring, with a 32-bit view over it for the zero scan. */
export interface CopySlot {
  readonly buffer: Buffer;
  readonly words: Uint32Array;
}

/**
 * Runs the copy: up to `depth` reads in flight, each into its own buffer (a zero job reads
 * nothing and leaves its buffer as it was); buffers are handed to
 * `write` in the order of `next()`, one at a time, and reused once `write` resolves. On a failure
 * no new read starts, the reads in flight are waited for, and the failure is thrown.
 */
export async function runCopy(
  device: BlockDevice,
  next: () => Promise<ReadJob | undefined>,
  depth: number,
  bufferSize: number,
  write: (job: ReadJob, slot: CopySlot) => Promise<void>,
): Promise<void> {
  const free: CopySlot[] = [];
  for (let index = 0; index < Math.max(1, depth); index++) {
    // Its own ArrayBuffer (never the shared pool): offset 0, so the 32-bit view lines up.
    const buffer = Buffer.allocUnsafeSlow(bufferSize);
    free.push({ buffer, words: new Uint32Array(buffer.buffer, 0, bufferSize >>> 2) });
  }
  const queue: { job: ReadJob; slot: CopySlot; read: Promise<void> }[] = [];
  let exhausted = false;
  try {
    for (;;) {
      while (!exhausted && free.length > 0) {
        const job = await next();
        if (job === undefined) {
          exhausted = true;
          break;
        }
        const slot = free.pop()!;
        const view = slot.buffer.subarray(0, job.length);
        const read =
          job.zero === true
            ? Promise.resolve()
            : job.hostFile !== undefined
              ? job.hostFile.readInto(view, job.sourceOffset)
              : device.readInto(view, job.sourceOffset);
        read.catch(() => undefined); // observed when its turn comes
        queue.push({ job, slot, read });
      }
      const head = queue.shift();
      if (head === undefined) return;
      await head.read;
      await write(head.job, head.slot);
      free.push(head.slot);
    }
  } finally {
    // Nothing may land in a buffer (or read a file) after this returns.
    await Promise.allSettled(queue.map((entry) => entry.read));
  }
}

/**
 * Calls `run(start, end)` for each run of `data[from, to)` (guest bytes from `guestOffset`) whose
 * guest-aligned blocks of `block` bytes hold a non-zero byte, and `zeros(start, end)` for the
 * all-zero runs between them; offsets are in `data`. `words` is a 32-bit view of `data` from 0.
 *
 * The scan itself is two small synchronous functions (V8 optimises such a loop in a millisecond or
 * two; inside this async function, with its awaits, it took 20 ms of compiling per run).
 */
export async function forEachDataRun(
  data: Buffer,
  words: Uint32Array,
  from: number,
  to: number,
  guestOffset: number,
  block: number,
  zeroBlock: Buffer,
  run: (start: number, end: number) => Promise<void>,
  zeros: ((start: number, end: number) => Promise<void>) | undefined,
): Promise<void> {
  // The first block may be cut by the guest's block alignment; the others are whole but the last.
  const firstEnd = Math.min(to, from + block - (guestOffset % block));
  let start = from;
  let isData = !isZeroBlock(data, words, zeroBlock, from, firstEnd);
  while (start < to) {
    const end = runEnd(data, words, zeroBlock, firstEnd, start, to, block, isData);
    if (isData) await run(start, end);
    else await zeros?.(start, end);
    start = end;
    isData = !isData;
  }
}

/**
 * The end of the run starting at `start` (a block boundary: `from`, `firstEnd`, or whole blocks
 * after it) of blocks that are all data (`isData`) or all zeros, the first one included.
 */
function runEnd(
  data: Buffer,
  words: Uint32Array,
  zeroBlock: Buffer,
  firstEnd: number,
  start: number,
  to: number,
  block: number,
  isData: boolean,
): number {
  let index = start < firstEnd ? firstEnd : Math.min(to, start + block);
  if (isData && (index & 3) === 0) {
    // The common case, in a tight loop: whole blocks with a non-zero word among their first four.
    while (index + block <= to) {
      const word = index >>> 2;
      if ((words[word]! | words[word + 1]! | words[word + 2]! | words[word + 3]!) === 0) break;
      index += block;
    }
  }
  while (index < to) {
    const blockEnd = Math.min(to, index + block);
    if (isZeroBlock(data, words, zeroBlock, index, blockEnd) === isData) return index;
    index = blockEnd;
  }
  return to;
}

/**
 * True when `data[start, end)` is all zeros. Data blocks almost always have a non-zero byte among
 * their first sixteen, so those are looked at first as four 32-bit words (no native call); only
 * blocks that start with zeros are compared in full, natively.
 */
function isZeroBlock(
  data: Buffer,
  words: Uint32Array,
  zeroBlock: Buffer,
  start: number,
  end: number,
): boolean {
  if ((start & 3) === 0 && end - start >= 16) {
    const word = start >>> 2;
    if ((words[word]! | words[word + 1]! | words[word + 2]! | words[word + 3]!) !== 0) return false;
  }
  return data.compare(zeroBlock, 0, end - start, start, end) === 0;
}
