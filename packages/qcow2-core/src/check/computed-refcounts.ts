/**
 * The reference counts the check rebuilds from the metadata: one counter per host cluster of the
 * file (plus the partial cluster a region may reach just past the end), in a typed array as wide
 * as the image's refcounts need. A region that reaches a whole cluster or more past the end of
 * the file is reported and not counted, as QEMU does, so damaged offsets never grow the array.
 */
import type { CheckLog } from './check-log.js';

/** Most clusters past the end kept in `ComputedRefcounts.namedPastEnd`. */
const PAST_END_KEPT = 65536;
/** Clusters past twice the file's length still kept there (small files). */
const PAST_END_SLACK = 1024;

export class ComputedRefcounts {
  private counts: Uint8Array | Uint16Array | Uint32Array;
  /** The highest count a counter holds (the refcount width's maximum, at most 2^32 - 1). */
  readonly maxCount: number;

  constructor(
    private readonly fileSize: number,
    private readonly clusterSize: number,
    refcountBits: number,
    private readonly log: CheckLog,
  ) {
    const nbClusters = Math.ceil(fileSize / clusterSize);
    // One spare slot: a region may end less than a cluster past the end of the file.
    const length = nbClusters + 1;
    if (refcountBits <= 8) this.counts = new Uint8Array(length);
    else if (refcountBits <= 16) this.counts = new Uint16Array(length);
    else this.counts = new Uint32Array(length);
    this.maxCount = refcountBits >= 32 ? 0xffff_ffff : 2 ** refcountBits - 1;
    this.used = nbClusters;
    this.fileClusters = nbClusters;
  }

  /** Clusters that start inside the file: `[0, fileClusters)` (all below {@link used}). Loops
   * may bump `array[i]` themselves for such a cluster while it is below {@link maxCount}. */
  readonly fileClusters: number;

  /** Number of clusters compared: the file's clusters, or one more when a region reached past it. */
  used: number;

  /**
   * References to clusters past the end of the file, not counted above (as QEMU does) but kept
   * apart by cluster, so a refcount rebuild neither places a new structure over one nor grows the
   * file over one (an L2 table a truncated file lost is still named by the L1 table). Only clusters
   * up to as far past the end as the file is long, and at most PAST_END_KEPT of them: structures a
   * rebuild adds go right after the end, never that far.
   */
  readonly namedPastEnd = new Set<number>();

  /** Counts one reference to every cluster touched by `[hostOffset, hostOffset + length)`. */
  add(hostOffset: number, length: number): void {
    // The common case first: one whole cluster inside the file, below the maximum.
    if (length === this.clusterSize && hostOffset % length === 0 && this.#bump(hostOffset / length)) return;
    if (length <= 0) return;
    if (this.pastEnd(hostOffset, length)) {
      this.reportPastEnd(() => hostOffset.toString(16), length, hostOffset);
      return;
    }
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + length - 1) / this.clusterSize);
    for (let clusterIndex = first; clusterIndex <= last; clusterIndex++) {
      if (clusterIndex >= this.used) this.used = clusterIndex + 1;
      const count = this.counts[clusterIndex]!;
      if (count >= this.maxCount) {
        this.log.corruption(
          `ERROR: overflow cluster offset=0x${(clusterIndex * this.clusterSize).toString(16)}`,
        );
        this.log.message(
          'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean ' +
            'copy if the image cannot be opened for writing',
        );
        continue;
      }
      this.counts[clusterIndex] = count + 1;
    }
  }

  /** Counts one reference to cluster `clusterIndex` (the whole cluster, at any place in the file). */
  addCluster(clusterIndex: number): void {
    if (!this.#bump(clusterIndex)) this.add(clusterIndex * this.clusterSize, this.clusterSize);
  }

  /** Counts one reference to a cluster that starts inside the file, if below the maximum. */
  #bump(clusterIndex: number): boolean {
    if (clusterIndex >= this.fileClusters) return false;
    const count = this.counts[clusterIndex];
    if (count === undefined || count >= this.maxCount) return false;
    this.counts[clusterIndex] = count + 1;
    return true;
  }

  /** True when `[hostOffset, hostOffset + length)` reaches a whole cluster or more past the end. */
  pastEnd(hostOffset: number, length: number): boolean {
    const end = hostOffset + length;
    return end > this.fileSize && end - this.fileSize >= this.clusterSize;
  }

  /** Reports a region not counted because it lies past the end (`offsetHex` exact, no prefix);
   * with `hostOffset`, its clusters near the end are kept in {@link namedPastEnd}. */
  reportPastEnd(offsetHex: string | (() => string), length: number, hostOffset?: number): void {
    if (hostOffset !== undefined) this.#notePastEnd(hostOffset, length);
    this.log.corruption(
      () =>
        'ERROR: counting reference for region exceeding the end of the file by one cluster or more: ' +
        `offset 0x${typeof offsetHex === 'string' ? offsetHex : offsetHex()} size 0x${length.toString(16)}`,
    );
  }

  #notePastEnd(hostOffset: number, length: number): void {
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + length - 1) / this.clusterSize);
    const near = 2 * this.fileClusters + PAST_END_SLACK;
    for (
      let clusterIndex = Math.max(first, this.fileClusters);
      clusterIndex <= Math.min(last, near);
      clusterIndex++
    ) {
      if (this.namedPastEnd.size >= PAST_END_KEPT) return;
      this.namedPastEnd.add(clusterIndex);
    }
  }

  get(clusterIndex: number): number {
    return clusterIndex < this.used ? this.counts[clusterIndex]! : 0;
  }

  /** The counters themselves, for loops over many clusters (entries from {@link used} on are 0). */
  get array(): Uint8Array | Uint16Array | Uint32Array {
    return this.counts;
  }
}
