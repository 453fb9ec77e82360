/**
 * qemu-img convert's `-S SIZE` (the least run of zeros left out of a new image) for qcow2 targets.
 *
 * What qemu-img 7.2 does, as observed with `qemu-img map` on its outputs:
 * - `-S 0`: no zero detection; every cluster of the guest is written (as data), holes included.
 * - The source is taken extent by extent (block status: data, or zeros/holes that are never
 *   written; an extent ends at most 2 GiB after its start and, when that leaves something, on a
 *   boundary of the source's clusters), and a data extent in pieces of 2 MiB from its start.
 * - In a piece, runs of zero sectors (512 B) between data are written with the data when shorter
 *   than SIZE; a run at the start or the end of a piece is never written. Runs are first
 *   snapped to an alignment of the largest power of two not above SIZE: a data run's end moves up
 *   to the next aligned offset (at most to the piece's end), a zero run's end moves down to the
 *   previous one, and a zero run that lies within the aligned block of the data after it counts as
 *   data.
 * - Every cluster a written run touches is allocated as data; the others stay unallocated.
 *
 * With SIZE at most the cluster size the result is the same as dropping every all-zero cluster
 * (what the writer does by default): a run shorter than a cluster cannot cover one, and the
 * alignment never leaves a cluster. Compressed conversions (`-c`) test whole clusters whatever
 * SIZE is (but `-S 0` stores every cluster, compressed).
 */
import { type BlockDevice, BlockDeviceError, blockStatusAll, type Extent } from '@qcowkit/blockdev';
import { type ClusterRange, readAhead } from './read-ahead.js';
import { isZeroWords } from './zero-detect.js';

const SECTOR = 512;
/** The pieces qemu-img convert reads a data extent in (its copy buffer for a qcow2 target). */
export const SPARSE_PIECE_BYTES = 2 * 1024 * 1024;
/** The most sectors qemu-img asks block status about at once (just under 2 GiB). */
const MAX_STATUS_SECTORS = Math.floor((2 ** 31 - 1) / SECTOR);
/** The largest `-S` qemu-img takes. */
export const MAX_SPARSE_SIZE = 16 * 1024 * 1024;

/** Checks a `sparseSize` option: a multiple of 512 from 0 to 16 MiB, as qemu-img's `-S`. */
export function validateSparseSize(sparseSize: number): void {
  if (
    !Number.isSafeInteger(sparseSize) ||
    sparseSize < 0 ||
    sparseSize % SECTOR !== 0 ||
    sparseSize > MAX_SPARSE_SIZE
  ) {
    throw new BlockDeviceError(
      'EINVAL',
      `qcow2 convert: sparseSize ${String(sparseSize)} is not a multiple of 512 from 0 to ${MAX_SPARSE_SIZE}`,
    );
  }
}

/**
 * How a conversion applies `sparseSize`: `'all'` stores every cluster, `'runs'` needs the zero-run
 * rule above, `'clusters'` is the default (all-zero clusters dropped).
 */
export function sparseMode(
  sparseSize: number | undefined,
  clusterSize: number,
  compress: boolean,
): 'all' | 'runs' | 'clusters' {
  if (sparseSize === undefined) return 'clusters';
  if (sparseSize === 0) return 'all';
  return !compress && sparseSize > clusterSize ? 'runs' : 'clusters';
}

/** The largest power of two not above `value` (value >= 1). */
function powerOfTwoFloor(value: number): number {
  return 2 ** Math.floor(Math.log2(value));
}

/**
 * Runs of sectors `[0, count)` of one piece that a `-S` conversion writes, given which sectors
 * are all zeros (`zero[i]` nonzero), the piece's first sector in the guest, the least zero run
 * left out (`minSectors`) and the alignment (`alignSectors`, a power of two). Calls
 * `onWrite(from, to)` for each written run, in order.
 */
export function sparseWrittenRuns(
  zero: Uint8Array,
  count: number,
  firstSector: number,
  minSectors: number,
  alignSectors: number,
  onWrite: (from: number, to: number) => void,
): void {
  // The run of like sectors at `at` (up to `end`), snapped to the alignment: [length, isZero].
  let runZero = false;
  const run = (at: number, end: number): number => {
    const kind = zero[at]!;
    let to = at + 1;
    while (to < end && zero[to] === kind) to++;
    runZero = kind !== 0;
    if (to === end) return to - at;
    const past = (firstSector + to) % alignSectors;
    if (past === 0) return to - at;
    // A zero run wholly inside the aligned block of the data that follows is written with it.
    if (runZero && to - at <= past) runZero = false;
    if (!runZero) return Math.min(to + alignSectors - past, end) - at;
    return to - past - at;
  };
  let at = 0;
  while (at < count) {
    const first = run(at, count);
    if (runZero) {
      at += first;
      continue;
    }
    // Data: carry on through zero runs shorter than the least run (itself capped at what is left).
    const least = Math.min(minSectors, count - at);
    let used = at + first;
    let checked = used;
    while (checked < count) {
      const length = run(checked, count);
      checked += length;
      if (!runZero) used = checked;
      else if (length >= least) break;
    }
    onWrite(at, used);
    at = used;
  }
}

/**
 * Guest cluster ranges a `-S sparseSize` conversion (sparseSize above the cluster size) stores as
 * data: reads every data extent of `source` below `end` in qemu-img's pieces and applies
 * {@link sparseWrittenRuns}. Sorted and merged. `sourceClusterSize`: the source's cluster size
 * when it has one (a qcow2 image; 512 for raw).
 */
export async function sparseDataClusters(
  source: BlockDevice,
  end: number,
  clusterSize: number,
  sparseSize: number,
  options: { readDepth: number; signal: AbortSignal | undefined; sourceClusterSize?: number | undefined },
): Promise<ClusterRange[]> {
  const { signal } = options;
  const ranges: ClusterRange[] = [];
  const addClusters = (fromByte: number, toByte: number) => {
    const first = Math.floor(fromByte / clusterSize);
    const last = Math.ceil(toByte / clusterSize);
    const previous = ranges[ranges.length - 1];
    if (previous !== undefined && first <= previous.cluster + previous.count) {
      if (last > previous.cluster + previous.count)
        ranges[ranges.length - 1] = { cluster: previous.cluster, count: last - previous.cluster };
    } else {
      ranges.push({ cluster: first, count: last - first });
    }
  };
  const minSectors = sparseSize / SECTOR;
  const alignSectors = powerOfTwoFloor(minSectors);
  const endSector = Math.ceil(end / SECTOR);
  const extents: Extent[] = [];
  const STEP = 2 ** 40;
  for (let position = 0; position < end; position += STEP) {
    for (const extent of await blockStatusAll(source, position, Math.min(STEP, end - position), { signal }))
      extents.push(extent);
  }
  // Status runs as qemu-img asks for them: from where the last one ended, at most
  // MAX_STATUS_SECTORS, the end moved down to a boundary of the source's clusters (unless that
  // leaves nothing); then each data run in pieces of SPARSE_PIECE_BYTES from its start.
  const sourceAlign = Math.max(1, Math.floor((options.sourceClusterSize ?? SECTOR) / SECTOR));
  const pieces: { sector: number; count: number }[] = [];
  let index = 0;
  for (let sector = 0; sector < endSector; ) {
    while (extents[index]!.offset + extents[index]!.length <= sector * SECTOR) index++;
    const extent = extents[index]!;
    let count =
      Math.min(Math.ceil((extent.offset + extent.length) / SECTOR), sector + MAX_STATUS_SECTORS, endSector) -
      sector;
    const past = (sector + count) % sourceAlign;
    if (count > past) count -= past;
    if (!extent.zero && extent.present) {
      for (let at = sector; at < sector + count; at += SPARSE_PIECE_BYTES / SECTOR)
        pieces.push({ sector: at, count: Math.min(SPARSE_PIECE_BYTES / SECTOR, sector + count - at) });
    }
    sector += count;
  }
  const zero = new Uint8Array(SPARSE_PIECE_BYTES / SECTOR);
  const fetch = async (piece: { sector: number; count: number }) => {
    const bytes = new Uint8Array(piece.count * SECTOR);
    const start = piece.sector * SECTOR;
    const valid = Math.max(0, Math.min(bytes.length, source.size - start));
    if (valid > 0) await source.readInto(bytes.subarray(0, valid), start, { signal });
    return bytes;
  };
  for await (const { item: piece, result: bytes } of readAhead(pieces, options.readDepth, fetch)) {
    signal?.throwIfAborted();
    const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2);
    const sectorWords = SECTOR / 4;
    for (let index = 0; index < piece.count; index++) {
      zero[index] = isZeroWords(words, index * sectorWords, (index + 1) * sectorWords) ? 1 : 0;
    }
    sparseWrittenRuns(zero, piece.count, piece.sector, minSectors, alignSectors, (from, to) =>
      addClusters((piece.sector + from) * SECTOR, Math.min((piece.sector + to) * SECTOR, end)),
    );
  }
  return ranges;
}
