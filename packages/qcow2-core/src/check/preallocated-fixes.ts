/**
 * `qemu-img check -r all`'s repair of a preallocated L2 entry (zero flag, or with extended L2 no
 * allocated subcluster) whose host offset is not cluster aligned: the entry no longer names a
 * cluster and reads as zeros, so its reference is dropped (the cluster it named then leaks, and
 * the same repair frees it). Checked against qemu-img 7.2, which does this in active and snapshot
 * L2 tables alike, in a table an L1 entry names at a misaligned offset too (the entry is written
 * where that table's bytes lie), and leaves a misaligned data cluster (no zero flag) as it is.
 *
 * The check walks in repair mode with one of these: each such entry it meets is planned here (its
 * bytes in the table being walked are replaced at once, so a later walk of the same bytes, e.g. a
 * snapshot sharing the table, sees the fixed entry), and the counted references leave it out.
 * The planned entries are written, then flushed, before any refcount changes (the entries stop
 * naming clusters before those clusters' refcounts drop: a crash in between only leaks them).
 *
 * Where an entry lies inside other metadata (QEMU's default overlap checks: the header, the
 * active L1 table, the refcount table and blocks, the snapshot table and snapshots' L1 tables,
 * and for a snapshot's table the active L2 tables) it is left as it is and reported: QEMU marks
 * the image corrupt and fails the whole check there instead.
 */
import type { BlockDevice, RequestOptions } from '@qcowkit/blockdev';

/** What the replacement entry is. */
export type PreallocatedReplacement =
  /** The zero flag alone (QEMU's plain zero cluster). */
  | 'zero-flag'
  /** All zero (extended L2: the subcluster bitmap keeps its zero bits, loses its allocated ones). */
  | 'unallocated';

export interface PreallocatedFixesOptions {
  clusterSize: number;
  /** 8, or 16 with extended L2. */
  l2EntryBytes: number;
  replacement: PreallocatedReplacement;
  /** Host byte ranges `[offset, length]` of the metadata no fix may write into. */
  metadata: readonly (readonly [number, number])[];
  /** Clusters of refcount blocks (no fix writes there either). */
  refcountBlockClusters: ReadonlySet<number>;
}

/** Most entries planned in one repair (a few tens of MiB of map): further ones stay reported, and
 * a second repair fixes them. */
const MAX_PLANNED = 1024 * 1024;

export class PreallocatedFixes {
  /** Planned entries by host byte offset: the replacement's zero bits (extended L2; else 0). */
  readonly #planned = new Map<number, number>();
  /** Clusters of the active L2 tables met so far (a snapshot's fix never writes there). */
  readonly #activeL2Clusters = new Set<number>();
  #tableOffset = 0;
  #active = true;

  constructor(private readonly options: PreallocatedFixesOptions) {}

  /** Entries planned. */
  get count(): number {
    return this.#planned.size;
  }

  /** The table walked next: at `tableOffset` (as its L1 entry names it), active or a snapshot's. */
  beginTable(tableOffset: number, active: boolean): void {
    this.#tableOffset = tableOffset;
    this.#active = active;
    if (active) {
      const { clusterSize } = this.options;
      this.#activeL2Clusters.add(Math.floor(tableOffset / clusterSize));
      this.#activeL2Clusters.add(Math.floor((tableOffset + clusterSize - 1) / clusterSize));
    }
  }

  /** Puts the entries planned so far into `table` (just read from `tableOffset`). */
  applyTo(table: Uint8Array, tableOffset: number): void {
    if (this.#planned.size === 0) return;
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const end = tableOffset + table.length;
    for (const [at, zeroBits] of this.#planned) {
      if (at >= tableOffset && at < end) this.#encode(view, at - tableOffset, zeroBits);
    }
  }

  /** Writes the replacement entry at byte `byteOffset` of `view`. */
  #encode(view: DataView, byteOffset: number, zeroBits: number): void {
    const { l2EntryBytes, replacement } = this.options;
    view.setUint32(byteOffset, 0);
    view.setUint32(byteOffset + 4, l2EntryBytes === 8 && replacement === 'zero-flag' ? 1 : 0);
    if (l2EntryBytes === 16) {
      view.setUint32(byteOffset + 8, zeroBits);
      view.setUint32(byteOffset + 12, 0);
    }
  }

  /**
   * Plans the fix of entry `index` of the table being walked (`view` holds it): true when planned
   * (the entry in `view` is replaced), false when it must stay (it lies in other metadata).
   */
  plan(view: DataView, index: number): boolean {
    const { l2EntryBytes } = this.options;
    const at = this.#tableOffset + index * l2EntryBytes;
    if (this.#planned.size >= MAX_PLANNED || this.#overlapsMetadata(at)) return false;
    const byteOffset = index * l2EntryBytes;
    // Extended L2: allocated subclusters become zero ones (a preallocated entry has none: its zero
    // bits stay as they are).
    const zeroBits =
      l2EntryBytes === 16 ? (view.getUint32(byteOffset + 8) | view.getUint32(byteOffset + 12)) >>> 0 : 0;
    this.#encode(view, byteOffset, zeroBits);
    this.#planned.set(at, zeroBits);
    return true;
  }

  /** Whether the cluster holding the entry at host byte `at` holds other metadata (QEMU's overlap
   * check tests whole clusters). */
  #overlapsMetadata(at: number): boolean {
    const { clusterSize, metadata, refcountBlockClusters } = this.options;
    const cluster = Math.floor(at / clusterSize);
    if (cluster === 0 || refcountBlockClusters.has(cluster)) return true;
    if (!this.#active && this.#activeL2Clusters.has(cluster)) return true;
    const start = cluster * clusterSize;
    const end = start + clusterSize;
    return metadata.some(([offset, length]) => length > 0 && offset < end && start < offset + length);
  }

  /** Writes the planned entries (neighbours in one write), then flushes. */
  async write(file: BlockDevice, request: RequestOptions): Promise<void> {
    if (this.#planned.size === 0) return;
    const offsets = [...this.#planned.keys()].sort((a, b) => a - b);
    const entryBytes = this.options.l2EntryBytes;
    for (let first = 0; first < offsets.length; ) {
      let last = first;
      while (last + 1 < offsets.length && offsets[last + 1] === offsets[last]! + entryBytes) last++;
      const run = new Uint8Array((last - first + 1) * entryBytes);
      const view = new DataView(run.buffer);
      for (let k = first; k <= last; k++) {
        this.#encode(view, (k - first) * entryBytes, this.#planned.get(offsets[k]!)!);
      }
      await file.write(offsets[first]!, run, request);
      first = last + 1;
    }
    await file.flush(request);
  }
}
