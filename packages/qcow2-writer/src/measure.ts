/**
 * Space a new image needs, computed as `qemu-img measure -O qcow2` computes it:
 * `fullyAllocated` is the size with every cluster allocated (metadata for the whole guest plus
 * the guest size rounded up to a cluster), `required` replaces the guest size by the clusters the
 * source actually holds data in (block status; zero ranges count nothing).
 */
import { type BlockDevice, blockStatusAll } from '@qcowkit/blockdev';
import { alignUp, refcountsPerBlock } from '@qcowkit/qcow2-core/format';
import { type Qcow2ImageOptions, resolveGeometry } from './options.js';

export interface MeasureResult {
  /** Bytes the image needs for the source (or an empty image of that size). */
  readonly required: number;
  /** Bytes a fully allocated image of that size needs. */
  readonly fullyAllocated: number;
}

/** Refcount table and block bytes covering `clusters` clusters and themselves (QEMU's formula). */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number): number {
  const entriesPerTableCluster = clusterSize / 8;
  const perBlock = refcountsPerBlock(clusterSize, refcountOrder);
  let table = 0;
  let blocks = 0;
  let total = 0;
  let last: number;
  do {
    last = total;
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / entriesPerTableCluster);
    total = clusters + blocks + table;
  } while (total !== last);
  return (blocks + table) * clusterSize;
}

/** Size of a fully preallocated image of `guestSize` bytes (metadata and data). */
export function preallocatedSize(
  guestSize: number,
  clusterSize: number,
  refcountOrder: number,
  extendedL2: boolean,
): number {
  const entrySize = extendedL2 ? 16 : 8;
  const alignedSize = alignUp(guestSize, clusterSize);
  let metadata = clusterSize; // header
  const l2Entries = alignUp(alignedSize / clusterSize, clusterSize / entrySize);
  metadata += l2Entries * entrySize;
  const l1Entries = alignUp((l2Entries * entrySize) / clusterSize, clusterSize / 8);
  metadata += l1Entries * 8;
  metadata += refcountMetadataSize((metadata + alignedSize) / clusterSize, clusterSize, refcountOrder);
  return metadata + alignedSize;
}

/** Bytes of whole clusters holding data in `source`, as qemu-img measure counts them. */
async function dataClusterBytes(
  source: BlockDevice,
  clusterSize: number,
  signal?: AbortSignal,
): Promise<number> {
  let required = 0;
  let offset = 0;
  const end = source.size;
  const STEP = 2 ** 40;
  for (let window = 0; window < end; window += STEP) {
    const extents = await blockStatusAll(source, window, Math.min(STEP, end - window), { signal });
    for (const extent of extents) {
      const extentEnd = extent.offset + extent.length;
      if (extentEnd <= offset) continue;
      const start = Math.max(offset, extent.offset);
      if (!extent.zero && extent.data && extent.present) {
        const stop = alignUp(extentEnd, clusterSize);
        required += (start % clusterSize) + (stop - start);
        offset = stop;
      } else {
        offset = extentEnd;
      }
    }
  }
  return required;
}

/** `qemu-img measure -O qcow2 [-o ...] (--size SIZE | SOURCE)`. */
export async function measure(
  sourceOrSize: BlockDevice | number,
  options: Qcow2ImageOptions & { signal?: AbortSignal } = {},
): Promise<MeasureResult> {
  const size = typeof sourceOrSize === 'number' ? sourceOrSize : sourceOrSize.size;
  const geometry = resolveGeometry(options, size);
  const clusterSize = geometry.clusterSize;
  const virtualSize = alignUp(typeof sourceOrSize === 'number' ? geometry.size : size, clusterSize);
  const fullyAllocated = preallocatedSize(
    virtualSize,
    clusterSize,
    geometry.refcountOrder,
    geometry.extendedL2,
  );
  const data =
    typeof sourceOrSize === 'number' ? 0 : await dataClusterBytes(sourceOrSize, clusterSize, options.signal);
  return { required: fullyAllocated - virtualSize + data, fullyAllocated };
}
