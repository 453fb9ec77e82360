/**
 * Remembers ranges of an export known to hold data, so that reads looking for holes do not ask
 * the device for block status every time. Asking can be dear: on tmpfs, SEEK_HOLE walks every
 * page up to the next hole, so a status query per read over a dense 1 GiB file costs more than
 * the read itself. The device is asked about whole aligned windows, once per window even when
 * many reads want it at the same time.
 *
 * Block status requests for `base:allocation` over known data are answered from here too, and
 * their answers from the device teach it more.
 *
 * A stale entry is harmless for correctness: it only makes a read send a hole as data (the bytes
 * are still read from the device) or block status report data where a hole is, which the spec
 * allows (a clear HOLE bit promises nothing). Entries that zeroing or trimming may have turned
 * into holes are dropped, so both stay exact for this server's own writes.
 */
import type { BlockDevice } from '@qcowkit/blockdev';

/** Most ranges kept in each list (the oldest are forgotten first). */
const MAX_ENTRIES = 64;
/** Size of the windows the device is asked about. */
export const STATUS_WINDOW = 64 * 1024 * 1024;

interface Range {
  readonly start: number;
  readonly end: number;
}

export class DataExtentCache {
  /** Disjoint [start, end) guest ranges, most recently added last. */
  private entries: Range[] = [];
  private readonly pending = new Map<number, Promise<void>>();
  /**
   * Ranges of window numbers the device has been asked about already (their holes stay the
   * device's to report). Ranges, not window numbers: one answer may reach over millions of windows
   * (an empty petabyte image).
   */
  private learned: Range[] = [];

  /** True when [offset, offset + length) lies inside one known data range. */
  covers(offset: number, length: number): boolean {
    return within(this.entries, offset, offset + length);
  }

  /** Records a data range, merging it with ranges it touches. */
  add(start: number, end: number): void {
    this.entries = merged(this.entries, start, end);
  }

  /** Forgets every range overlapping [offset, offset + length). */
  invalidate(offset: number, length: number): void {
    const end = offset + length;
    this.entries = this.entries.filter((entry) => entry.end <= offset || end <= entry.start);
  }

  /**
   * Asks the device about the windows around [offset, offset + length) not asked about yet (once
   * each: a window with holes is not asked again, its holes are for the caller to ask about).
   */
  async learn(device: BlockDevice, offset: number, length: number): Promise<void> {
    const first = Math.floor(offset / STATUS_WINDOW);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / STATUS_WINDOW);
    const waits: Promise<void>[] = [];
    for (let window = first; window <= last; window++) {
      if (within(this.learned, window, window + 1)) continue;
      let pending = this.pending.get(window);
      if (pending === undefined) {
        pending = this.query(device, window).finally(() => this.pending.delete(window));
        this.pending.set(window, pending);
      }
      waits.push(pending);
    }
    if (waits.length > 0) await Promise.all(waits);
  }

  /**
   * Learns the window's data runs. The device is asked about everything from the window's start
   * to its end, not just the window: a file device's answer costs the same either way (SEEK_HOLE
   * walks to the next hole whatever range is asked), and what lies past the window saves the
   * next windows their own walk. Asking stops once the window is covered.
   */
  private async query(device: BlockDevice, window: number): Promise<void> {
    const start = window * STATUS_WINDOW;
    const end = Math.min(device.size, start + STATUS_WINDOW);
    let position = start;
    while (position < end) {
      const extents = await device.blockStatus(position, device.size - position);
      if (extents.length === 0) return;
      for (const extent of extents) {
        if (extent.offset !== position || extent.length <= 0) return;
        const extentEnd = Math.min(device.size, extent.offset + extent.length);
        if (extent.data && !extent.zero) this.add(extent.offset, extentEnd);
        position = extentEnd;
      }
    }
    // What the answer reached past the window, the following windows know too: those it covered
    // whole, and every one up to the device's end once it got there.
    const known =
      position >= device.size ? Math.ceil(device.size / STATUS_WINDOW) : Math.floor(position / STATUS_WINDOW);
    this.learned = merged(this.learned, window, known);
  }
}

/** True when [start, end) lies inside one of `ranges`. */
function within(ranges: readonly Range[], start: number, end: number): boolean {
  for (const range of ranges) {
    if (range.start <= start && end <= range.end) return true;
  }
  return false;
}

/** `ranges` with [start, end) added, merged with the ranges it touches; at most MAX_ENTRIES. */
function merged(ranges: readonly Range[], start: number, end: number): Range[] {
  if (end <= start) return ranges as Range[];
  let joined: Range = { start, end };
  const out = ranges.filter((range) => {
    if (range.end < joined.start || joined.end < range.start) return true;
    joined = { start: Math.min(range.start, joined.start), end: Math.max(range.end, joined.end) };
    return false;
  });
  out.push(joined);
  if (out.length > MAX_ENTRIES) out.shift();
  return out;
}
