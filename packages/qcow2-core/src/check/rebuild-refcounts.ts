/**
 * Rebuilding the refcount structures from the references the check counted, as `qemu-img check
 * -r all` does when the stored ones cannot be fixed in place: new refcount blocks go into free
 * clusters (first fit), a new refcount table after the last cluster in use, each covering the
 * others and itself. They are written and flushed before the header points at them (then flushed
 * again), so a crash leaves either the old structures or the new ones. The old ones become leaks,
 * which the caller frees afterwards.
 */
import { type BlockDevice, BlockDeviceError, type RequestOptions } from '@qcowkit/blockdev';
import { QCOW_MAX_REFTABLE_SIZE } from '../format/geometry.js';
import { encodeRefcount, maxRefcount } from '../format/refcount.js';
import type { ComputedRefcounts } from './computed-refcounts.js';

/** Header fields rewritten: refcount_table_offset (u64 at 48), refcount_table_clusters (u32 at 56). */
const REFCOUNT_TABLE_OFFSET_FIELD = 48;

/** Where the new structures go, in clusters. */
export interface RefcountLayout {
  /** Refcount block index -> host cluster index of the new block. */
  blocks: Map<number, number>;
  tableClusterIndex: number;
  tableClusters: number;
  /** The refcount of every host cluster, the new structures included. */
  counts: number[];
}

/** Places new refcount blocks and a new table so that they count every cluster, themselves too. */
export function planRefcountStructure(
  counts: number[],
  clusterSize: number,
  entriesPerBlock: number,
): RefcountLayout {
  const blocks = new Map<number, number>();
  let tableClusterIndex = -1;
  let tableClusters = 0;
  let firstFree = 0;
  const highestUsed = (): number => {
    let index = counts.length - 1;
    while (index >= 0 && (counts[index] ?? 0) === 0) index--;
    return index;
  };
  for (;;) {
    let changed = false;
    const blockCount = Math.floor(highestUsed() / entriesPerBlock) + 1;
    for (let blockIndex = 0; blockIndex < blockCount; blockIndex++) {
      if (blocks.has(blockIndex)) continue;
      const first = blockIndex * entriesPerBlock;
      const end = Math.min(counts.length, first + entriesPerBlock);
      let used = false;
      for (let clusterIndex = first; clusterIndex < end && !used; clusterIndex++) {
        used = (counts[clusterIndex] ?? 0) !== 0;
      }
      if (!used) continue;
      while ((counts[firstFree] ?? 0) !== 0) firstFree++;
      counts[firstFree] = 1;
      blocks.set(blockIndex, firstFree);
      changed = true;
    }
    const needed = Math.ceil(((Math.floor(highestUsed() / entriesPerBlock) + 1) * 8) / clusterSize);
    if (needed > tableClusters) {
      for (let k = 0; k < tableClusters; k++) counts[tableClusterIndex + k] = 0;
      tableClusterIndex = highestUsed() + 1;
      tableClusters = needed;
      for (let k = 0; k < tableClusters; k++) counts[tableClusterIndex + k] = 1;
      changed = true;
    }
    if (!changed) break;
  }
  if (tableClusters * clusterSize > QCOW_MAX_REFTABLE_SIZE) {
    throw new BlockDeviceError(
      'EUNSUPPORTED',
      `qcow2 repair: a refcount table of ${tableClusters} clusters is larger than ${QCOW_MAX_REFTABLE_SIZE} bytes`,
    );
  }
  return { blocks, tableClusterIndex, tableClusters, counts };
}

/**
 * The counted references as an array (capped at the refcount width), ready for a rebuild; with
 * `stats`, also the highest of them (in the same pass: offline edits need it, see
 * ImageEdit.highestCount).
 */
export function countsOf(
  computed: ComputedRefcounts,
  refcountOrder: number,
  stats?: { highest: number },
): number[] {
  const max = maxRefcount(refcountOrder);
  const used = computed.used;
  const array = computed.array;
  // Filled in place (a packed array of small integers), not grown by push.
  const counts = new Array<number>(used).fill(0);
  let highest = 0;
  for (let clusterIndex = 0; clusterIndex < used; clusterIndex++) {
    const count = Math.min(array[clusterIndex]!, max);
    counts[clusterIndex] = count;
    if (count > highest) highest = count;
  }
  if (stats !== undefined) stats.highest = highest;
  return counts;
}

/** The file's length once `layout`'s structures are written. */
function layoutEnd(layout: RefcountLayout, clusterSize: number): number {
  let end = (layout.tableClusterIndex + layout.tableClusters) * clusterSize;
  for (const clusterIndex of layout.blocks.values()) end = Math.max(end, (clusterIndex + 1) * clusterSize);
  return end;
}

/** The refusal of a rebuild whose structures would reach `end`, over a cluster of `namedPastEnd`. */
function coveredPastEnd(
  file: BlockDevice,
  end: number,
  clusterSize: number,
  namedPastEnd: ReadonlySet<number>,
): BlockDeviceError | undefined {
  for (const clusterIndex of namedPastEnd) {
    if (clusterIndex * clusterSize < end) {
      return new BlockDeviceError(
        'ECORRUPT',
        `qcow2: ${file.description}: cannot rebuild the refcount structures: the new ones would cover cluster ${clusterIndex}, which the image names past the end of the file`,
        { offset: clusterIndex * clusterSize },
      );
    }
  }
  return undefined;
}

/**
 * Why {@link rebuildRefcountStructure} would refuse `counts` (see its `namedPastEnd`), planned on a
 * copy and nothing written; undefined when it would go ahead. A repair asks first, so that a
 * rebuild it cannot make leaves the file untouched, its in-place fixes included.
 */
export function rebuildRefusal(
  file: BlockDevice,
  counts: readonly number[],
  geometry: { clusterSize: number; refcountOrder: number },
  namedPastEnd: ReadonlySet<number>,
): BlockDeviceError | undefined {
  const { clusterSize, refcountOrder } = geometry;
  const layout = planRefcountStructure([...counts], clusterSize, (clusterSize * 8) / 2 ** refcountOrder);
  return coveredPastEnd(file, layoutEnd(layout, clusterSize), clusterSize, namedPastEnd);
}

/**
 * Writes new refcount structures holding `counts` and switches the header to them. `counts` must
 * count every cluster in use, the current refcount structures included (so the new ones avoid
 * them); it gains the new structures. Returns where they went.
 */
export async function rebuildRefcountStructure(
  file: BlockDevice,
  counts: number[],
  geometry: { clusterSize: number; refcountOrder: number },
  request: RequestOptions,
  /** Leave the header alone (the caller switches it, e.g. together with refcount_order). */
  switchHeader = true,
  /**
   * Clusters past the end of the file that metadata still names (a truncated file: see
   * `ComputedRefcounts.namedPastEnd`). The new structures must neither land on one nor grow the
   * file over one (it would then read as a zero table counted nowhere): then nothing is written
   * and the rebuild fails, as QEMU's overlap check stops its own.
   */
  namedPastEnd: ReadonlySet<number> = new Set(),
): Promise<RefcountLayout> {
  const { clusterSize, refcountOrder } = geometry;
  const entriesPerBlock = (clusterSize * 8) / 2 ** refcountOrder;
  const layout = planRefcountStructure(counts, clusterSize, entriesPerBlock);
  const end = layoutEnd(layout, clusterSize);
  const refusal = coveredPastEnd(file, end, clusterSize, namedPastEnd);
  if (refusal !== undefined) throw refusal;
  if (end > file.size) await file.resize(end);

  for (const [blockIndex, clusterIndex] of layout.blocks) {
    const block = new Uint8Array(clusterSize);
    const first = blockIndex * entriesPerBlock;
    const last = Math.min(layout.counts.length, first + entriesPerBlock);
    for (let index = first; index < last; index++) {
      const count = layout.counts[index] ?? 0;
      if (count !== 0) encodeRefcount(block, index - first, refcountOrder, count);
    }
    await file.write(clusterIndex * clusterSize, block, request);
  }
  const table = new Uint8Array(layout.tableClusters * clusterSize);
  const view = new DataView(table.buffer);
  for (const [blockIndex, clusterIndex] of layout.blocks) {
    const hostOffset = clusterIndex * clusterSize;
    view.setUint32(blockIndex * 8, Math.floor(hostOffset / 0x1_0000_0000));
    view.setUint32(blockIndex * 8 + 4, hostOffset >>> 0);
  }
  await file.write(layout.tableClusterIndex * clusterSize, table, request);
  await file.flush(request);
  if (!switchHeader) return layout;

  const field = new Uint8Array(12);
  const fieldView = new DataView(field.buffer);
  const tableOffset = layout.tableClusterIndex * clusterSize;
  fieldView.setUint32(0, Math.floor(tableOffset / 0x1_0000_0000));
  fieldView.setUint32(4, tableOffset >>> 0);
  fieldView.setUint32(8, layout.tableClusters);
  await file.write(REFCOUNT_TABLE_OFFSET_FIELD, field, request);
  await file.flush(request);
  return layout;
}
