/**
 * Placement of compressed clusters: packed byte after byte from a cluster-aligned start, as QEMU
 * packs them. A cluster that does not shrink is stored plain in a whole host cluster; like QEMU, it
 * does not close the partly filled host cluster: up to {@link MAX_PENDING_PLAIN_BYTES} of plain clusters go
 * after it while later compressed clusters keep filling it. A host cluster is never shared beyond
 * the refcount width's maximum (1-bit refcounts: one compressed cluster per host cluster).
 * Deterministic: the planning pass and the writing pass place every cluster at the same offset.
 */

/** Bytes of plain clusters that may wait behind a partly filled host cluster (the writer buffers
 * them): at least one cluster. */
export const MAX_PENDING_PLAIN_BYTES = 8 * 1024 * 1024;

export interface Placement {
  /** Offset from the area start. */
  readonly offset: number;
  /** False: stored plain in a whole host cluster. */
  readonly compressed: boolean;
  /** A plain cluster placed behind the partly filled host cluster: the writer holds it until the
   * bytes before it are written. */
  readonly deferred: boolean;
}

export class CompressedPacker {
  /** End of the compressed bytes placed so far (inside the open host cluster, or aligned). */
  private position = 0;
  /** Next free aligned offset after the open host cluster and the plain clusters placed behind it. */
  private next = 0;
  private pendingPlain = 0;
  /** Refcount of the open (partly filled) host cluster. */
  private openCount = 0;
  private readonly maxPendingPlain: number;

  constructor(
    private readonly clusterSize: number,
    private readonly maxRefcount: number,
    /** Called once per stored cluster for every host cluster it touches (relative index). */
    private readonly onTouch?: (clusterIndex: number) => void,
  ) {
    this.maxPendingPlain = Math.max(1, Math.floor(MAX_PENDING_PLAIN_BYTES / clusterSize));
  }

  /** Bytes used from the area start. */
  get end(): number {
    return Math.max(this.position, this.next);
  }

  private get open(): boolean {
    return this.position % this.clusterSize !== 0;
  }

  private touch(offset: number, length: number): void {
    if (this.onTouch === undefined) return;
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let cluster = Math.floor(offset / this.clusterSize); cluster <= last; cluster++)
      this.onTouch(cluster);
  }

  private closeOpen(): void {
    this.position = this.next;
    this.pendingPlain = 0;
    this.openCount = 0;
  }

  /** Where the next cluster of `length` stored bytes goes (relative to the area start). */
  place(length: number): Placement {
    const clusterSize = this.clusterSize;
    if (length >= clusterSize) {
      let offset: number;
      const deferred = this.open;
      if (!deferred) {
        offset = this.position;
        this.position += clusterSize;
        this.next = this.position;
      } else {
        offset = this.next;
        this.next += clusterSize;
        if (++this.pendingPlain >= this.maxPendingPlain) this.closeOpen();
      }
      this.touch(offset, clusterSize);
      return { offset, compressed: false, deferred };
    }
    if (this.open && this.openCount < this.maxRefcount) {
      const openEnd = Math.ceil(this.position / clusterSize) * clusterSize;
      if (this.position + length <= openEnd) {
        // Inside the open host cluster (plain clusters may wait behind it).
        const offset = this.position;
        this.touch(offset, length);
        this.position += length;
        this.openCount++;
        if (this.position === openEnd) this.closeOpen();
        return { offset, compressed: true, deferred: false };
      }
      if (this.pendingPlain === 0) return this.placeFrom(this.position, length, true);
    }
    if (this.open) this.closeOpen();
    return this.placeFrom(this.position, length, false);
  }

  /** Places compressed bytes at `offset` (the open cluster's end, or aligned) and beyond. */
  private placeFrom(offset: number, length: number, sharesOpen: boolean): Placement {
    const clusterSize = this.clusterSize;
    this.touch(offset, length);
    const end = offset + length;
    const endCluster = Math.floor((end - 1) / clusterSize);
    const shared = sharesOpen && endCluster === Math.floor(offset / clusterSize);
    this.openCount = end % clusterSize === 0 ? 0 : shared ? this.openCount + 1 : 1;
    this.position = end;
    this.next = Math.ceil(end / clusterSize) * clusterSize;
    this.pendingPlain = 0;
    return { offset, compressed: true, deferred: false };
  }
}
