/**
 * Reading the L2 tables of an L1 table walk, in walk order, ahead of the table being examined:
 * tables that lie close together in the file (preallocated or converted images keep them so) are
 * read at once, up to L2_READ_WINDOW bytes a read, and a few reads are in flight ahead of the
 * walk. A range past the end of the file reads as zeros (a table wholly past it is not read).
 *
 * Buffers are reused: once the walker calls {@link L2TableReads.release} for every table of a
 * read, its buffer serves a later read (a walk over thousands of tables allocates a few dozen
 * buffers, not one per table). A table not released is simply left to the garbage collector
 * (walkers that write a table back keep theirs).
 */
import type { BlockDevice, RequestOptions } from '@qcowkit/blockdev';

/** L2 tables close together in the file are read at once, within this many bytes ... */
const L2_READ_WINDOW = 256 * 1024;
/** ... and at most this many tables ... */
const L2_READ_GROUP = 64;
/** ... when at most this many bytes lie between one table and the next (not worth a read). */
const L2_READ_MAX_GAP = 4096;
/** Tables whose reads are started ahead of the one being examined. */
const L2_READ_AHEAD = 16;

/** One read serving the tables `first..last` of the walk. */
interface Read {
  readonly done: Promise<void>;
  readonly buffer: Uint8Array;
  /** File offset of `buffer[0]`. */
  readonly start: number;
  /** Tables of this read not yet released. */
  unreleased: number;
}

export class L2TableReads {
  /** The read serving each table, from when it starts until the table is released. */
  private readonly reads: (Read | undefined)[];
  private started = 0;
  /** Free buffers: `clusterSize` bytes (one table) and window-sized (several). */
  private readonly freeSingle: Uint8Array[] = [];
  private readonly freeWindow: Uint8Array[] = [];
  private readonly windowBytes: number;

  constructor(
    private readonly file: BlockDevice,
    private readonly clusterSize: number,
    /** Host offsets of the tables, in walk order (cluster aligned or not: read as they are). */
    private readonly offsets: readonly number[],
    private readonly request: RequestOptions,
    /** Tables read ahead of the one asked for. */
    private readonly ahead = L2_READ_AHEAD,
  ) {
    this.reads = new Array(offsets.length);
    this.windowBytes = Math.max(L2_READ_WINDOW, clusterSize);
  }

  /** Table `k` of the walk (reads up to `ahead` tables beyond it first); undefined when it lies
   * wholly past the end of the file. Valid until {@link release}. */
  async table(k: number): Promise<Uint8Array | undefined> {
    while (this.started < this.offsets.length && this.started <= k + this.ahead) this.#startRead();
    const read = this.reads[k];
    if (read === undefined) return undefined;
    await read.done;
    const at = this.offsets[k]! - read.start;
    return read.buffer.subarray(at, at + this.clusterSize);
  }

  /** Table `k` is no longer used: its buffer may serve another read once its read's tables are all released. */
  release(k: number): void {
    const read = this.reads[k];
    if (read === undefined) return;
    this.reads[k] = undefined;
    read.unreleased--;
    if (read.unreleased > 0) return;
    // A failed read's buffer is not reused (its read may still be writing into it).
    read.done.then(
      () => (read.buffer.length === this.clusterSize ? this.freeSingle : this.freeWindow).push(read.buffer),
      () => undefined,
    );
  }

  /** Starts the read of the next table and of the tables after it that follow it closely. */
  #startRead(): void {
    const { clusterSize, file, offsets } = this;
    const first = this.started;
    const start = offsets[first]!;
    if (start >= file.size) {
      // Wholly past the end of the file: reads as zeros, nothing to read.
      this.started = first + 1;
      return;
    }
    let last = first;
    while (last + 1 < offsets.length && last + 1 - first < L2_READ_GROUP) {
      const next = offsets[last + 1]!;
      const previousEnd = offsets[last]! + clusterSize;
      const near = next >= previousEnd - clusterSize && next - previousEnd <= L2_READ_MAX_GAP;
      if (!near || next + clusterSize - start > L2_READ_WINDOW || next >= file.size) break;
      last++;
    }
    const length = offsets[last]! + clusterSize - start;
    const single = length <= clusterSize;
    const buffer =
      (single ? this.freeSingle.pop() : this.freeWindow.pop()) ??
      new Uint8Array(single ? clusterSize : this.windowBytes);
    const target = buffer.subarray(0, length);
    const available = Math.min(length, file.size - start);
    if (available < length) target.fill(0, available);
    const done = file.readInto(target.subarray(0, available), start, this.request);
    done.catch(() => undefined); // awaited in table(); not an unhandled rejection meanwhile
    const read: Read = { done, buffer, start, unreleased: last - first + 1 };
    for (let k = first; k <= last; k++) this.reads[k] = read;
    this.started = last + 1;
  }
}
