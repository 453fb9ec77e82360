/**
 * Which guest clusters the new image maps, as sorted runs: `data` (a host cluster holding source
 * bytes), `fill` (a preallocated host cluster reading as zeros) and `zero` (a v3 zero entry, no
 * host cluster: hides a backing file). Runs are appended in guest order and merged when they touch.
 */
export type ClusterKind = 'data' | 'fill' | 'zero';

export class ClusterMap {
  readonly starts: number[] = [];
  readonly counts: number[] = [];
  readonly kinds: ClusterKind[] = [];
  /** Clusters needing a host cluster (data and fill). */
  hostClusters = 0;
  /** Clusters of kind data. */
  dataClusters = 0;

  get runCount(): number {
    return this.starts.length;
  }

  /** Appends `count` clusters from guest cluster `start` (at or after the previous run's end). */
  add(start: number, count: number, kind: ClusterKind): void {
    if (count <= 0) return;
    const last = this.starts.length - 1;
    if (last >= 0) {
      const end = this.starts[last]! + this.counts[last]!;
      if (start < end) throw new Error(`cluster map: run at ${start} overlaps the previous one`);
      if (start === end && this.kinds[last] === kind) {
        this.counts[last]! += count;
        this.account(count, kind);
        return;
      }
    }
    this.starts.push(start);
    this.counts.push(count);
    this.kinds.push(kind);
    this.account(count, kind);
  }

  private account(count: number, kind: ClusterKind): void {
    if (kind !== 'zero') this.hostClusters += count;
    if (kind === 'data') this.dataClusters += count;
  }
}
