/**
 * Guest-to-host lookups for qcow2: walks the L1 table and cached L2 slices over a guest range and
 * returns merged {@link Segment}s. One awaited cache lookup per L2 slice, never one per cluster.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import type { TableCache } from '../cache/table-cache.js';
import { hex } from '../format/binary.js';
import { decodeCompressedDescriptor } from '../format/compressed-descriptor.js';
import { L1E_RESERVED_MASK_HIGH, L1E_RESERVED_MASK_LOW, l1EntryOffset } from '../format/l1-entry.js';
import {
  type ClusterType,
  classifyL2Entry,
  classifySubcluster,
  L2E_STD_RESERVED_MASK_HIGH,
  L2E_STD_RESERVED_MASK_LOW,
  l2EntryHostOffset,
  l2EntryReservedBitsSet,
  QCOW_OFLAG_COMPRESSED_HIGH,
  QCOW_OFLAG_ZERO,
  type SubclusterType,
} from '../format/l2-entry.js';
import { pushSegment, type Segment } from './segment.js';

export interface Qcow2MapperOptions {
  /** Reads `length` bytes of metadata at `hostOffset` of the image file. */
  readonly readMetadata: (hostOffset: number, length: number) => Promise<Uint8Array>;
  readonly fileSize: number;
  /** The active (or snapshot) L1 table as halves. */
  readonly l1High: Uint32Array;
  readonly l1Low: Uint32Array;
  readonly clusterBits: number;
  readonly extendedL2: boolean;
  readonly hasDataFile: boolean;
  readonly cache: TableCache<DataView>;
  /** Bytes per cached L2 slice: a power of two dividing the cluster size. */
  readonly sliceBytes: number;
  /**
   * Read ahead: a lookup spanning several L2 slices starts loading them all (as many as half the
   * cache holds, at most {@link MAX_READ_AHEAD_SLICES}) instead of one after the other. Only for
   * images nobody writes through this mapper (a load must never race a write of the slice).
   */
  readonly readAhead?: boolean;
}

/** {@link Qcow2Mapper.lookupCached}: not known without waiting, or not simple: ask `map`. */
export const LOOKUP_GENERAL = -1;
/** {@link Qcow2Mapper.lookupCached}: a zero cluster (reads as zeros, whatever lies below). */
export const LOOKUP_ZERO = -2;
/** {@link Qcow2Mapper.lookupCached}: not allocated in this layer (the backing file answers, else
 * zeros). */
export const LOOKUP_UNALLOCATED = -3;

export class Qcow2Mapper {
  readonly #options: Qcow2MapperOptions;
  readonly #clusterSize: number;
  readonly #entrySize: number;
  readonly #entriesPerSlice: number;
  readonly #bytesPerL1: number;
  readonly #subclusterSize: number;
  /** Whether {@link lookupCached} may answer (standard L2 entries, no external data file). */
  readonly #directLookups: boolean;
  #l1High: Uint32Array;
  #l1Low: Uint32Array;

  constructor(options: Qcow2MapperOptions) {
    this.#options = options;
    this.#l1High = options.l1High;
    this.#l1Low = options.l1Low;
    this.#clusterSize = 2 ** options.clusterBits;
    this.#entrySize = options.extendedL2 ? 16 : 8;
    this.#entriesPerSlice = options.sliceBytes / this.#entrySize;
    this.#bytesPerL1 = (this.#clusterSize / this.#entrySize) * this.#clusterSize;
    this.#subclusterSize = this.#clusterSize / 32;
    this.#directLookups = !options.extendedL2 && !options.hasDataFile;
  }

  /** The L1 table in use (the write path changes its entries in place). */
  get l1(): { high: Uint32Array; low: Uint32Array } {
    return { high: this.#l1High, low: this.#l1Low };
  }

  /** Replaces the L1 table (after a resize). */
  setL1(high: Uint32Array, low: Uint32Array): void {
    this.#l1High = high;
    this.#l1Low = low;
  }

  /** Host offset of the L2 table for `l1Index` (0 = none), validated. */
  l2TableOffset(l1Index: number): number {
    const { fileSize } = this.#options;
    const l1High = this.#l1High;
    const l1Low = this.#l1Low;
    if (l1Index >= l1High.length) return 0;
    const high = l1High[l1Index]!;
    const low = l1Low[l1Index]!;
    if ((high & L1E_RESERVED_MASK_HIGH) !== 0 || (low & L1E_RESERVED_MASK_LOW) !== 0) {
      throw new BlockDeviceError('ECORRUPT', `L1 entry ${l1Index}: reserved bits are set`);
    }
    const l2Offset = l1EntryOffset(high, low);
    if (l2Offset === 0) return 0;
    if (l2Offset % this.#clusterSize !== 0) {
      throw new BlockDeviceError('ECORRUPT', `L1 entry ${l1Index}: L2 table offset is not cluster-aligned`, {
        offset: l2Offset,
      });
    }
    if (l2Offset + this.#clusterSize > fileSize) {
      throw new BlockDeviceError('ECORRUPT', `L1 entry ${l1Index}: L2 table lies past the end of the file`, {
        offset: l2Offset,
      });
    }
    return l2Offset;
  }

  /**
   * What `[guestOffset, guestOffset + length)` reads as when it lies inside one cluster whose
   * mapping is known without waiting (standard L2 entries, no external data file, the L2 slice
   * cached or no L2 table at all): the host offset of `guestOffset` for a plain data cluster,
   * {@link LOOKUP_ZERO} for a zero cluster, {@link LOOKUP_UNALLOCATED} for a cluster this layer does
   * not hold; {@link LOOKUP_GENERAL} for anything else (compressed, across clusters, slice not
   * cached, a damaged entry): the caller asks {@link map}, which also reports corruption.
   * Synchronous, allocates nothing: the fast path of small reads.
   */
  lookupCached(guestOffset: number, length: number): number {
    if (!this.#directLookups) return LOOKUP_GENERAL;
    const clusterSize = this.#clusterSize;
    const offsetInCluster = guestOffset % clusterSize;
    if (offsetInCluster + length > clusterSize) return LOOKUP_GENERAL;
    const l1Index = Math.floor(guestOffset / this.#bytesPerL1);
    if (l1Index >= this.#l1High.length) return LOOKUP_UNALLOCATED;
    const l1High = this.#l1High[l1Index]!;
    const l1Low = this.#l1Low[l1Index]!;
    if ((l1High & L1E_RESERVED_MASK_HIGH) !== 0 || (l1Low & L1E_RESERVED_MASK_LOW) !== 0) {
      return LOOKUP_GENERAL;
    }
    const l2Offset = l1EntryOffset(l1High, l1Low);
    if (l2Offset === 0) return LOOKUP_UNALLOCATED;
    if (l2Offset % clusterSize !== 0 || l2Offset + clusterSize > this.#options.fileSize)
      return LOOKUP_GENERAL;
    const l2Index = Math.floor((guestOffset - l1Index * this.#bytesPerL1) / clusterSize);
    const sliceIndex = Math.floor(l2Index / this.#entriesPerSlice);
    const slice = this.#options.cache.lookup(l2Offset + sliceIndex * this.#options.sliceBytes);
    if (slice === undefined) return LOOKUP_GENERAL;
    const at = (l2Index - sliceIndex * this.#entriesPerSlice) * 8;
    const high = slice.getUint32(at);
    const low = slice.getUint32(at + 4);
    if ((high & SLOW_BITS_HIGH) !== 0 || (low & L2E_STD_RESERVED_MASK_LOW) !== 0) return LOOKUP_GENERAL;
    const hostCluster = l2EntryHostOffset(high, low);
    if (hostCluster % clusterSize !== 0) return LOOKUP_GENERAL;
    if ((low & QCOW_OFLAG_ZERO) !== 0) return LOOKUP_ZERO;
    return hostCluster === 0 ? LOOKUP_UNALLOCATED : hostCluster + offsetInCluster;
  }

  #loadSlice = async (hostOffset: number): Promise<DataView> => {
    const bytes = await this.#options.readMetadata(hostOffset, this.#options.sliceBytes);
    return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  };

  /**
   * Segments covering `[guestOffset, guestOffset + length)`, or a prefix of it when more than
   * `maxEntries` L2 entries would be examined (at least one entry is always examined).
   */
  async map(guestOffset: number, length: number, maxEntries = Number.POSITIVE_INFINITY): Promise<Segment[]> {
    const segments: Segment[] = [];
    const end = guestOffset + length;
    const clusterSize = this.#clusterSize;
    const { extendedL2, hasDataFile, clusterBits, cache, sliceBytes } = this.#options;
    let position = guestOffset;
    let examined = 0;
    if (this.#options.readAhead === true) this.#readAhead(guestOffset, end);
    while (position < end && examined < maxEntries) {
      const l1Index = Math.floor(position / this.#bytesPerL1);
      const l1Start = l1Index * this.#bytesPerL1;
      const l2Offset = this.l2TableOffset(l1Index);
      if (l2Offset === 0) {
        // Skip every following L1 entry without an L2 table at once (an 8 TiB guest holding
        // little has tens of thousands), and everything past the end of the L1 table.
        const nextL1 = this.#nextL1WithTable(l1Index + 1, Math.ceil(end / this.#bytesPerL1));
        const runEnd = Math.min(end, nextL1 * this.#bytesPerL1);
        pushSegment(segments, 'unallocated', position, runEnd - position, -1);
        position = runEnd;
        continue;
      }
      const l2Index = Math.floor((position - l1Start) / clusterSize);
      const sliceIndex = Math.floor(l2Index / this.#entriesPerSlice);
      const sliceHostOffset = l2Offset + sliceIndex * sliceBytes;
      const slice = cache.lookup(sliceHostOffset) ?? (await cache.get(sliceHostOffset, this.#loadSlice));
      const sliceEnd = Math.min(end, l1Start + (sliceIndex + 1) * this.#entriesPerSlice * clusterSize);
      let entryIndex = l2Index - sliceIndex * this.#entriesPerSlice;
      const sliceGuestStart = l1Start + sliceIndex * this.#entriesPerSlice * clusterSize;
      while (position < sliceEnd && examined < maxEntries) {
        if (!extendedL2) {
          // The common entries (unallocated, or data continuing the previous cluster on the host)
          // are classified from their bits in a tight loop that merges them into one run; any
          // other entry takes the general path below, one at a time.
          const lastEntry = Math.min(
            Math.ceil((sliceEnd - sliceGuestStart) / clusterSize),
            entryIndex + (maxEntries - examined),
          );
          const run = scanStandardRun(slice, entryIndex, lastEntry, clusterSize);
          if (run.next > entryIndex) {
            const runEnd = Math.min(sliceEnd, sliceGuestStart + run.next * clusterSize);
            const offsetInFirst = position - (sliceGuestStart + entryIndex * clusterSize);
            if (run.hostCluster === -1) pushSegment(segments, 'unallocated', position, runEnd - position, -1);
            else pushSegment(segments, 'data', position, runEnd - position, run.hostCluster + offsetInFirst);
            examined += run.next - entryIndex;
            entryIndex = run.next;
            position = runEnd;
            continue;
          }
        }
        examined++;
        const at = entryIndex * this.#entrySize;
        const high = slice.getUint32(at);
        const low = slice.getUint32(at + 4);
        const clusterStart = sliceGuestStart + entryIndex * clusterSize;
        const clusterEnd = Math.min(sliceEnd, clusterStart + clusterSize);
        const type = classifyL2Entry(high, low, hasDataFile, extendedL2);
        const entryHostOffset = sliceHostOffset + at;
        if (type !== 'compressed' && l2EntryReservedBitsSet(high, low, extendedL2)) {
          throw new BlockDeviceError('ECORRUPT', 'L2 entry: reserved bits are set', {
            offset: entryHostOffset,
          });
        }
        const hostCluster = type === 'normal' || type === 'zero-alloc' ? l2EntryHostOffset(high, low) : -1;
        if (hostCluster > 0 && hostCluster % clusterSize !== 0) {
          throw new BlockDeviceError(
            'ECORRUPT',
            `L2 entry: host offset ${hex(hostCluster)} is not cluster-aligned`,
            {
              offset: entryHostOffset,
            },
          );
        }
        if (type === 'compressed') {
          if (hasDataFile) {
            throw new BlockDeviceError(
              'ECORRUPT',
              'L2 entry: compressed cluster in an image with a data file',
              {
                offset: entryHostOffset,
              },
            );
          }
          segments.push({
            guestOffset: position,
            length: clusterEnd - position,
            kind: 'compressed',
            hostOffset: -1,
            compressed: decodeCompressedDescriptor(high, low, clusterBits),
            offsetInCluster: position - clusterStart,
          });
        } else if (!extendedL2) {
          this.#pushCluster(
            segments,
            type,
            position,
            clusterEnd - position,
            hostCluster,
            position - clusterStart,
          );
        } else {
          const zeroBits = slice.getUint32(at + 8);
          const allocBits = slice.getUint32(at + 12);
          let sub = Math.floor((position - clusterStart) / this.#subclusterSize);
          while (position < clusterEnd) {
            const subEnd = Math.min(clusterEnd, clusterStart + (sub + 1) * this.#subclusterSize);
            const subType = classifySubcluster(type, zeroBits, allocBits, sub);
            if (subType === 'invalid') {
              throw new BlockDeviceError(
                'ECORRUPT',
                `L2 entry: subcluster ${sub} has an invalid allocation state`,
                {
                  offset: entryHostOffset,
                },
              );
            }
            this.#pushCluster(
              segments,
              subType,
              position,
              subEnd - position,
              hostCluster,
              position - clusterStart,
            );
            position = subEnd;
            sub++;
          }
        }
        position = clusterEnd;
        entryIndex++;
      }
    }
    return segments;
  }

  /**
   * Starts loading the L2 slices of `[guestOffset, end)` beyond the first, in order, without
   * waiting; `map` then finds them loaded or loading. Stops quietly at a bad L1 entry (`map`
   * reports it when it gets there) and never lets a failed load go unhandled.
   */
  #readAhead(guestOffset: number, end: number): void {
    const { cache, sliceBytes, clusterBits } = this.#options;
    const budget = Math.min(MAX_READ_AHEAD_SLICES, Math.floor(cache.maxBytes / sliceBytes / 2));
    const bytesPerSlice = this.#entriesPerSlice * 2 ** clusterBits;
    let sliceGuest = Math.floor(guestOffset / bytesPerSlice) * bytesPerSlice + bytesPerSlice;
    for (let started = 0; sliceGuest < end && started < budget; sliceGuest += bytesPerSlice) {
      const l1Index = Math.floor(sliceGuest / this.#bytesPerL1);
      let l2Offset: number;
      try {
        l2Offset = this.l2TableOffset(l1Index);
      } catch {
        return;
      }
      if (l2Offset === 0) {
        // No table here: go on at the next L1 entry that has one.
        const nextL1 = this.#nextL1WithTable(l1Index + 1, Math.ceil(end / this.#bytesPerL1));
        sliceGuest = nextL1 * this.#bytesPerL1 - bytesPerSlice;
        continue;
      }
      const sliceIndex = Math.floor((sliceGuest - l1Index * this.#bytesPerL1) / bytesPerSlice);
      cache.get(l2Offset + sliceIndex * sliceBytes, this.#loadSlice).catch(() => undefined);
      started++;
    }
  }

  /** The first L1 index in `[from, limit)` whose entry is not zero (`limit` when none). */
  #nextL1WithTable(from: number, limit: number): number {
    const l1High = this.#l1High;
    const l1Low = this.#l1Low;
    const stop = Math.min(limit, l1High.length);
    let index = from;
    while (index < stop && l1High[index] === 0 && l1Low[index] === 0) index++;
    return index < stop ? index : limit;
  }

  #pushCluster(
    segments: Segment[],
    type: ClusterType | SubclusterType,
    position: number,
    length: number,
    hostCluster: number,
    offsetInCluster: number,
  ): void {
    switch (type) {
      case 'normal':
        pushSegment(segments, 'data', position, length, hostCluster + offsetInCluster);
        return;
      case 'zero-alloc':
        pushSegment(segments, 'zero', position, length, hostCluster + offsetInCluster);
        return;
      case 'zero-plain':
        pushSegment(segments, 'zero', position, length, -1);
        return;
      case 'unallocated':
        pushSegment(segments, 'unallocated', position, length, -1);
        return;
      case 'unallocated-alloc':
        // The host cluster exists but this subcluster is not allocated: qemu-img map still
        // reports its offset when no backing layer answers.
        pushSegment(segments, 'unallocated', position, length, hostCluster + offsetInCluster);
        return;
      default:
        throw new BlockDeviceError('ECORRUPT', `L2 entry: unexpected cluster type ${type}`);
    }
  }
}

/** Most L2 slices one lookup loads ahead (64 x 4 KiB tables: 128 MiB of guest at 4 KiB clusters). */
const MAX_READ_AHEAD_SLICES = 64;

/** Bits that send a standard L2 entry to the general path: compressed, reserved, zero. */
const SLOW_BITS_HIGH = (QCOW_OFLAG_COMPRESSED_HIGH | L2E_STD_RESERVED_MASK_HIGH) >>> 0;
const SLOW_BITS_LOW = L2E_STD_RESERVED_MASK_LOW | QCOW_OFLAG_ZERO;

/** Reused result of {@link scanStandardRun} (no allocation per run). */
const scanned = { next: 0, hostCluster: -1 };

/**
 * The run of standard (8-byte) L2 entries from `first` (before `last`) that reads one way: all
 * unallocated (entry 0; `hostCluster` -1), or all normal clusters each right after the previous on
 * the host (`hostCluster` the first one's offset). `next` is the entry after the run, `first` when
 * entry `first` is neither (or misaligned: the general path reports it).
 */
function scanStandardRun(
  slice: DataView,
  first: number,
  last: number,
  clusterSize: number,
): { readonly next: number; readonly hostCluster: number } {
  scanned.next = first;
  scanned.hostCluster = -1;
  if (first >= last) return scanned;
  const high = slice.getUint32(first * 8);
  const low = slice.getUint32(first * 8 + 4);
  let index = first + 1;
  if (high === 0 && low === 0) {
    while (index < last && slice.getUint32(index * 8) === 0 && slice.getUint32(index * 8 + 4) === 0) index++;
    scanned.next = index;
    return scanned;
  }
  if ((high & SLOW_BITS_HIGH) !== 0 || (low & SLOW_BITS_LOW) !== 0) return scanned;
  const hostCluster = l2EntryHostOffset(high, low);
  if (hostCluster === 0 || hostCluster % clusterSize !== 0) return scanned;
  let expected = hostCluster + clusterSize;
  while (index < last) {
    const nextHigh = slice.getUint32(index * 8);
    const nextLow = slice.getUint32(index * 8 + 4);
    if ((nextHigh & SLOW_BITS_HIGH) !== 0 || (nextLow & SLOW_BITS_LOW) !== 0) break;
    if (l2EntryHostOffset(nextHigh, nextLow) !== expected) break;
    expected += clusterSize;
    index++;
  }
  scanned.next = index;
  scanned.hostCluster = hostCluster;
  return scanned;
}
