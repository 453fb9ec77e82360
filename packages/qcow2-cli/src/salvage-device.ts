/**
 * `convert --salvage`: a source that never fails a read or a block-status request, as qemu-img
 * convert --salvage treats its sources. What cannot be read reads as zeros, and each 512-byte
 * sector that failed is reported once:
 *
 * - A read that fails is retried in halves (on sector boundaries) until the failing sectors are
 *   found; those read as zeros and are reported (`error while reading offset N`), the rest is the
 *   source's. qemu-img retries the failed request sector by sector; halving reaches the same
 *   sectors in fewer reads when most of a request is readable.
 * - A block-status request that fails is retried on a quarter of the range, then a quarter of
 *   that, as qemu-img does, down to one sector; a sector whose status cannot be read at all is
 *   reported (`error while reading block status at offset N`) and called data, so it is read (and
 *   then, usually, reported again as unreadable).
 *
 * Sectors found bad are remembered: a second pass over them (qcow2-writer may read a range twice)
 * neither retries nor reports them again. Offsets are the wrapped device's own (for several
 * sources, each source's, as qemu-img prints them). Reads run ahead in parallel, so a read's
 * reports wait for those of the reads started before it: callers reading in guest order (every
 * convert path does) get them in offset order, as qemu-img prints them.
 */
import {
  type BlockDevice,
  type Extent,
  ForwardingBlockDevice,
  isBlockDeviceError,
  type RequestOptions,
  throwIfAborted,
  validateRange,
} from '@qcowkit/blockdev';

/** qemu-img's unit of salvage. */
export const SECTOR = 512;

export interface SalvageReport {
  readonly kind: 'read' | 'blockStatus';
  /** Start of the failing sector, in the wrapped device. */
  readonly offset: number;
  readonly error: unknown;
}

/** Sorted, disjoint [start, end) ranges. */
class RangeSet {
  readonly #starts: number[] = [];
  readonly #ends: number[] = [];

  /** Index of the last range starting at or before `offset`, or -1. */
  #floor(offset: number): number {
    let low = 0;
    let high = this.#starts.length - 1;
    let found = -1;
    while (low <= high) {
      const middle = (low + high) >>> 1;
      if (this.#starts[middle]! <= offset) {
        found = middle;
        low = middle + 1;
      } else {
        high = middle - 1;
      }
    }
    return found;
  }

  /** [start, end) lies inside one range. */
  covers(start: number, end: number): boolean {
    const index = this.#floor(start);
    return index >= 0 && this.#ends[index]! >= end;
  }

  add(start: number, end: number): void {
    let index = this.#floor(start);
    if (index >= 0 && this.#ends[index]! >= start) {
      // Joins the range before it.
      this.#ends[index] = Math.max(this.#ends[index]!, end);
    } else {
      index++;
      this.#starts.splice(index, 0, start);
      this.#ends.splice(index, 0, end);
    }
    // Swallows the ranges it now reaches.
    while (index + 1 < this.#starts.length && this.#starts[index + 1]! <= this.#ends[index]!) {
      this.#ends[index] = Math.max(this.#ends[index]!, this.#ends[index + 1]!);
      this.#starts.splice(index + 1, 1);
      this.#ends.splice(index + 1, 1);
    }
  }
}

/** Whether a failure is the source's (salvaged) rather than the caller's or a closed device's. */
function salvageable(error: unknown, options: RequestOptions | undefined): boolean {
  if (options?.signal?.aborted) return false;
  if (isBlockDeviceError(error)) return error.code !== 'ECLOSED';
  // A system error from a file (EIO from a failing disk) is the source's too.
  return error instanceof Error && typeof (error as NodeJS.ErrnoException).code === 'string';
}

/** A read's place in the order reports are given in. */
interface ReadTurn {
  done: boolean;
  readonly reports: SalvageReport[];
}

export class SalvagingBlockDevice extends ForwardingBlockDevice {
  readonly #report: (report: SalvageReport) => void;
  readonly #badReads = new RangeSet();
  readonly #badStatus = new RangeSet();
  /** Reads not yet reported on, in the order they started. */
  readonly #turns: ReadTurn[] = [];

  /** `report` is called once for each sector found bad, in increasing offsets within a request. */
  constructor(inner: BlockDevice, report: (report: SalvageReport) => void) {
    super(inner);
    this.#report = report;
  }

  override async read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    validateRange(this.size, offset, length, 'read');
    const buffer = new Uint8Array(length);
    await this.readInto(buffer, offset, options);
    return buffer;
  }

  override async readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    validateRange(this.size, offset, buffer.length, 'read');
    throwIfAborted(options?.signal);
    const turn: ReadTurn = { done: false, reports: [] };
    this.#turns.push(turn);
    try {
      await this.#readPiece(buffer, offset, offset, offset + buffer.length, turn.reports, options);
    } finally {
      turn.done = true;
      // Reports of every finished read with no unfinished read before it.
      while (this.#turns[0]?.done === true)
        for (const report of this.#turns.shift()!.reports) this.#report(report);
    }
  }

  /** Reads [from, to) of the device into `buffer` (which starts at device offset `base`). */
  async #readPiece(
    buffer: Uint8Array,
    base: number,
    from: number,
    to: number,
    reports: SalvageReport[],
    options: RequestOptions | undefined,
  ): Promise<void> {
    if (from >= to) return;
    const view = buffer.subarray(from - base, to - base);
    if (this.#badReads.covers(from, to)) {
      view.fill(0);
      return;
    }
    try {
      await this.inner.readInto(view, from, options);
      return;
    } catch (error) {
      if (!salvageable(error, options)) throw error;
      const firstSector = Math.floor(from / SECTOR);
      const lastSector = Math.floor((to - 1) / SECTOR);
      if (firstSector === lastSector) {
        view.fill(0);
        const sector = firstSector * SECTOR;
        if (!this.#badReads.covers(sector, Math.min(sector + SECTOR, this.size))) {
          this.#badReads.add(sector, Math.min(sector + SECTOR, this.size));
          reports.push({ kind: 'read', offset: sector, error });
        }
        return;
      }
      // Halves on a sector boundary, the first one first (reports come in offset order).
      const middle = (firstSector + Math.ceil((lastSector - firstSector + 1) / 2)) * SECTOR;
      await this.#readPiece(buffer, base, from, middle, reports, options);
      await this.#readPiece(buffer, base, middle, to, reports, options);
    }
  }

  override async blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    validateRange(this.size, offset, length, 'blockStatus');
    throwIfAborted(options?.signal);
    if (length === 0) return this.inner.blockStatus(offset, length, options);
    const sectorEnd = Math.min(this.size, (Math.floor(offset / SECTOR) + 1) * SECTOR);
    const unreadable: Extent[] = [
      { offset, length: sectorEnd - offset, zero: false, data: true, present: true, depth: 0 },
    ];
    if (this.#badStatus.covers(offset, sectorEnd)) return unreadable;
    let asked = length;
    for (;;) {
      try {
        return await this.inner.blockStatus(offset, asked, options);
      } catch (error) {
        if (!salvageable(error, options)) throw error;
        if (offset + asked <= sectorEnd) {
          this.#badStatus.add(offset, sectorEnd);
          this.#report({ kind: 'blockStatus', offset: Math.floor(offset / SECTOR) * SECTOR, error });
          return unreadable;
        }
        // A quarter of the sectors asked (rounded up), as qemu-img retries.
        const sectors = Math.ceil((offset + asked - Math.floor(offset / SECTOR) * SECTOR) / SECTOR);
        const quarter = Math.ceil(sectors / 4);
        asked = Math.max(sectorEnd, Math.floor(offset / SECTOR) * SECTOR + quarter * SECTOR) - offset;
      }
    }
  }

  /** The wrapped device is its opener's to close. */
  override close(): Promise<void> {
    return Promise.resolve();
  }
}

/** The words of C's strerror() for the error a salvaged request failed with, as qemu-img prints
 * them (an image's damage is an I/O error there). */
export function strerrorWords(error: unknown): string {
  const code = isBlockDeviceError(error) ? error.code : (error as NodeJS.ErrnoException | null)?.code;
  switch (code) {
    case 'EINVAL':
      return 'Invalid argument';
    case 'ENOSPC':
      return 'No space left on device';
    case 'ENOTSUP':
    case 'EUNSUPPORTED':
    case 'EOPNOTSUPP':
      return 'Operation not supported';
    case 'EACCES':
      return 'Permission denied';
    case 'ENOENT':
      return 'No such file or directory';
    case 'EBUSY':
      return 'Device or resource busy';
    case 'ENOMEM':
      return 'Cannot allocate memory';
    default:
      return 'Input/output error';
  }
}

/** The warning qemu-img prints for a salvaged failure (without its `qemu-img: ` prefix). */
export function salvageWarning(report: SalvageReport): string {
  const what = report.kind === 'read' ? 'reading offset' : 'reading block status at offset';
  return `warning: error while ${what} ${report.offset}: ${strerrorWords(report.error)}`;
}
