/**
 * Guest-to-host lookups for legacy qcow (v1): L1 entries point at L2 tables of 2^l2_bits 64-bit
 * entries; an L2 entry is a cluster's host offset or a compressed cluster (see qcow-v1-header.ts).
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import type { TableCache } from '../cache/table-cache.js';
import { decodeQcowV1L2Entry } from '../format/qcow-v1-header.js';
import { pushSegment, type Segment } from './segment.js';

export interface QcowV1MapperOptions {
  readonly readMetadata: (hostOffset: number, length: number) => Promise<Uint8Array>;
  readonly fileSize: number;
  readonly l1High: Uint32Array;
  readonly l1Low: Uint32Array;
  readonly clusterBits: number;
  readonly l2Bits: number;
  readonly cache: TableCache<DataView>;
}

const TWO_POW_32 = 0x1_0000_0000;

export class QcowV1Mapper {
  readonly #options: QcowV1MapperOptions;
  readonly #clusterSize: number;
  readonly #l2Entries: number;

  constructor(options: QcowV1MapperOptions) {
    this.#options = options;
    this.#clusterSize = 2 ** options.clusterBits;
    this.#l2Entries = 2 ** options.l2Bits;
  }

  #loadTable = async (hostOffset: number): Promise<DataView> => {
    const bytes = await this.#options.readMetadata(hostOffset, this.#l2Entries * 8);
    return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  };

  async map(guestOffset: number, length: number, maxEntries = Number.POSITIVE_INFINITY): Promise<Segment[]> {
    const { l1High, l1Low, fileSize, cache, clusterBits } = this.#options;
    const clusterSize = this.#clusterSize;
    const bytesPerL1 = clusterSize * this.#l2Entries;
    const segments: Segment[] = [];
    const end = guestOffset + length;
    let position = guestOffset;
    let examined = 0;
    while (position < end && examined < maxEntries) {
      const l1Index = Math.floor(position / bytesPerL1);
      const l1Start = l1Index * bytesPerL1;
      const l1End = Math.min(end, l1Start + bytesPerL1);
      const high = l1High[l1Index] ?? 0;
      if (high > 0x00ffffff) {
        throw new BlockDeviceError('ECORRUPT', `qcow L1 entry ${l1Index}: offset is too large`);
      }
      const l2Offset = high * TWO_POW_32 + (l1Low[l1Index] ?? 0);
      if (l2Offset === 0) {
        pushSegment(segments, 'unallocated', position, l1End - position, -1);
        position = l1End;
        continue;
      }
      if (l2Offset + this.#l2Entries * 8 > fileSize) {
        throw new BlockDeviceError(
          'ECORRUPT',
          `qcow L1 entry ${l1Index}: L2 table lies past the end of the file`,
          {
            offset: l2Offset,
          },
        );
      }
      const table = await cache.get(l2Offset, this.#loadTable);
      while (position < l1End && examined < maxEntries) {
        examined++;
        const l2Index = Math.floor((position - l1Start) / clusterSize);
        const clusterStart = l1Start + l2Index * clusterSize;
        const clusterEnd = Math.min(l1End, clusterStart + clusterSize);
        const entry = decodeQcowV1L2Entry(
          table.getUint32(l2Index * 8),
          table.getUint32(l2Index * 8 + 4),
          clusterBits,
        );
        switch (entry.type) {
          case 'unallocated':
            pushSegment(segments, 'unallocated', position, clusterEnd - position, -1);
            break;
          case 'normal':
            pushSegment(
              segments,
              'data',
              position,
              clusterEnd - position,
              entry.hostOffset + (position - clusterStart),
            );
            break;
          case 'compressed':
            segments.push({
              guestOffset: position,
              length: clusterEnd - position,
              kind: 'compressed',
              hostOffset: -1,
              compressed: {
                hostOffset: entry.hostOffset,
                sectors: 0,
                compressedLength: entry.compressedLength,
              },
              offsetInCluster: position - clusterStart,
            });
            break;
        }
        position = clusterEnd;
      }
    }
    return segments;
  }
}
