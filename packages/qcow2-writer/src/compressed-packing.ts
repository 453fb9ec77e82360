/**
 * Placement of compressed clusters: packed byte after byte from a cluster-aligned start, as QEMU
 * packs them, except that a host cluster whose refcount would overflow the refcount width is not
 * shared (1-bit refcounts: one compressed cluster per host cluster). A cluster that does not
 * shrink is stored uncompressed at the next cluster boundary. Deterministic: the planning pass and
 * the writing pass place every cluster at the same offset.
 */
export class CompressedPacker {
  /** Bytes used from the area start. */
  position = 0;
  /** Host cluster (relative) holding `position` when it is not cluster-aligned, and its refcount. */
  private openCluster = -1;
  private openCount = 0;

  constructor(
    private readonly clusterSize: number,
    private readonly maxRefcount: number,
    /** Called once per stored cluster for every host cluster it touches (relative index). */
    private readonly onTouch?: (clusterIndex: number) => void,
  ) {}

  /** Where the next cluster of `length` stored bytes goes (relative to the area start). */
  place(length: number): { offset: number; compressed: boolean } {
    const clusterSize = this.clusterSize;
    const compressed = length < clusterSize;
    let offset = this.position;
    const aligned = offset % clusterSize === 0;
    if (!aligned && (!compressed || this.openCount >= this.maxRefcount)) {
      offset = Math.ceil(offset / clusterSize) * clusterSize;
    }
    const first = Math.floor(offset / clusterSize);
    const end = offset + length;
    const last = Math.floor((end - 1) / clusterSize);
    if (this.onTouch !== undefined)
      for (let cluster = first; cluster <= last; cluster++) this.onTouch(cluster);
    if (end % clusterSize === 0) {
      this.openCluster = -1;
      this.openCount = 0;
    } else if (last === this.openCluster) {
      this.openCount++;
    } else {
      this.openCluster = last;
      this.openCount = 1;
    }
    this.position = end;
    return { offset, compressed };
  }
}
