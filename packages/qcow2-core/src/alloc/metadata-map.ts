/**
 * Which host clusters hold which metadata, for QEMU's "overlap check": before any metadata or data
 * write, the target range must not hit metadata of another kind. A hit means the image's structures
 * are inconsistent; the caller marks the image corrupt and stops writing.
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { hex } from '../format/binary.js';

export type MetadataKind =
  | 'header'
  | 'l1-table'
  | 'l2-table'
  | 'refcount-table'
  | 'refcount-block'
  | 'snapshot-table'
  | 'snapshot-l1-table'
  | 'bitmap-directory'
  | 'bitmap-table';

/** Thrown by {@link MetadataMap.check}; the image turns it into a sticky corrupt state. */
export class OverlapError extends BlockDeviceError {
  override name = 'OverlapError';
}

export class MetadataMap {
  readonly #clusterSize: number;
  readonly #kinds = new Map<number, MetadataKind>();

  constructor(clusterSize: number) {
    this.#clusterSize = clusterSize;
  }

  #clusters(hostOffset: number, length: number): [number, number] {
    const first = Math.floor(hostOffset / this.#clusterSize);
    const end = Math.ceil((hostOffset + length) / this.#clusterSize);
    return [first, end];
  }

  add(hostOffset: number, length: number, kind: MetadataKind): void {
    const [first, end] = this.#clusters(hostOffset, length);
    for (let cluster = first; cluster < end; cluster++) this.#kinds.set(cluster, kind);
  }

  remove(hostOffset: number, length: number): void {
    const [first, end] = this.#clusters(hostOffset, length);
    for (let cluster = first; cluster < end; cluster++) this.#kinds.delete(cluster);
  }

  kindAt(hostOffset: number): MetadataKind | undefined {
    return this.#kinds.get(Math.floor(hostOffset / this.#clusterSize));
  }

  /**
   * Throws {@link OverlapError} when `[hostOffset, hostOffset + length)` touches metadata other
   * than `allowed` (undefined: no metadata at all, as for data and newly allocated tables).
   */
  check(hostOffset: number, length: number, allowed: MetadataKind | undefined, what: string): void {
    const [first, end] = this.#clusters(hostOffset, length);
    for (let cluster = first; cluster < end; cluster++) {
      const kind = this.#kinds.get(cluster);
      if (kind !== undefined && kind !== allowed) {
        throw new OverlapError(
          'ECORRUPT',
          `${what}: would overwrite the ${kind} at ${hex(cluster * this.#clusterSize)}`,
          { offset: hostOffset },
        );
      }
      if (kind === undefined && allowed !== undefined) {
        throw new OverlapError(
          'ECORRUPT',
          `${what}: target ${hex(cluster * this.#clusterSize)} is not a known ${allowed}`,
          { offset: hostOffset },
        );
      }
    }
  }
}
