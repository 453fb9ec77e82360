/**
 * FileMapping: a file's bytes seen in place, through read-only shared memory mappings, instead of
 * copied into a buffer by pread.
 *
 * Why: a conversion that reads a range, scans it for zeros and writes it copies every byte twice
 * (page cache to buffer, buffer to page cache). Scanning the mapped pages and writing straight
 * from them copies once. Measured in-process on /dev/shm (512 MiB of random data, 2 MiB chunks,
 * zero scan of each 4 KiB block, writeSync into a new file, medians of 8-10 alternating rounds on
 * 2 busy cores): pread + write 299-334 ms of CPU, mapped in 64 MiB windows 285-304 ms (page faults
 * 10,860 against 3,451: the kernel maps 16 pages per fault; the scan's first touch of each page
 * costs a TLB and cache miss the buffer did not). Smaller windows (8 MiB) lost: mmap and munmap
 * per window cost more than the copy saved. So the gain is modest and only on memory-backed files;
 * callers choose it there (`isMemoryBacked`), never on a disk where a page fault of the event
 * loop's thread would wait for the disk.
 *
 * Bounds (what keeps the process alive):
 * - Address space: windows of `windowBytes` at multiples of it, each mapped `maxViewBytes` longer
 *   so any view of up to that many bytes lies in one window; at most `maxWindows` stay mapped
 *   while unused, whatever the file's size.
 * - No touch past the end: a page of a mapping past the file's end raises SIGBUS, which kills
 *   Node. Views lie inside the size the file had when opened, and each window is mapped only
 *   after fstat says the file still reaches its end. A file truncated by someone while a window
 *   is in use is the remaining risk: `FileBlockDevice.openMapping` allows a mapping only on a
 *   regular file whose QEMU-compatible lock (OFD) refuses writers, so QEMU and qcowkit cannot;
 *   a process ignoring locks still can.
 * - No touch after munmap: a window is unmapped only when no view of it is held (`release()`), so
 *   a view is valid until its release. Using its bytes after that is a bug this cannot catch
 *   (an ArrayBuffer over foreign memory cannot be detached from JavaScript).
 * - Only resident pages: a view is given only when mincore says every page of it is in memory. On
 *   tmpfs a read fault on a hole would allocate a page in the source file (pread of a hole does
 *   not), and elsewhere a missing page would be read from disk on the event loop's thread; such
 *   ranges get `undefined` and the caller reads them as before.
 */
import { fstatSync } from 'node:fs';
import type { Libc, MappingArea } from './libc.js';

export interface FileMappingOptions {
  /** Bytes of a window (rounded up to whole pages; default 64 MiB). */
  readonly windowBytes?: number;
  /** Longest view (default 4 MiB); a window is mapped this much past its end. */
  readonly maxViewBytes?: number;
  /** Windows mapped at once (default 2): the address space used is this many windows. */
  readonly maxWindows?: number;
}

/** A range of the file seen in place. Valid until `release()`. */
export interface MappedRange {
  /** The range's bytes (a view of the mapping, no copy). */
  readonly bytes: Buffer;
  /** The same bytes as 32-bit words (the range starts 4-byte aligned), for zero scans. */
  readonly words: Uint32Array;
  /** Gives the range back; its bytes must not be touched afterwards. Idempotent. */
  release(): void;
}

/** Default window size: a handful of mmap calls for a large conversion, bounded address space. */
export const MAPPING_WINDOW_BYTES = 64 * 1024 * 1024;
const DEFAULT_MAX_VIEW = 4 * 1024 * 1024;
const DEFAULT_MAX_WINDOWS = 2;

/** A place in the reserved area that holds one window at a time. */
interface Slot {
  /** Byte offset of the slot in the area. */
  readonly at: number;
  /** The window mapped here, or -1. */
  window: number;
  /** Bytes of the file mapped here (page-rounded), 0 when none. */
  mappedBytes: number;
  /** mincore's answer for the window, one byte per page. */
  readonly resident: Uint8Array;
  users: number;
  /** When the slot was last given a view (for choosing which to replace). */
  lastUse: number;
}

type MappingLibc = Libc & Required<Pick<Libc, 'reserveMapping' | 'pageSize'>>;

export class FileMapping {
  readonly #fd: number;
  readonly #size: number;
  readonly #libc: MappingLibc;
  readonly #windowBytes: number;
  readonly #maxView: number;
  readonly #slotBytes: number;
  readonly #slotCount: number;
  readonly #pageSize: number;
  #area: MappingArea | undefined;
  #slots: Slot[] = [];
  #uses = 0;
  #closed = false;
  /** The file no longer reaches a window's end (it shrank), or mapping failed: no more views. */
  #stopped = false;

  /**
   * For `FileBlockDevice.openMapping`, which checks that mapping `fd` is safe: `size` is the size
   * it read at open, and no view goes past it.
   */
  constructor(fd: number, size: number, libc: MappingLibc, options: FileMappingOptions = {}) {
    this.#fd = fd;
    this.#size = size;
    this.#libc = libc;
    this.#pageSize = libc.pageSize;
    this.#windowBytes = this.#pages(options.windowBytes ?? MAPPING_WINDOW_BYTES);
    this.#maxView = this.#pages(options.maxViewBytes ?? DEFAULT_MAX_VIEW);
    this.#slotBytes = this.#windowBytes + this.#maxView;
    this.#slotCount = Math.max(1, options.maxWindows ?? DEFAULT_MAX_WINDOWS);
  }

  /** Windows mapped now. */
  get mappedWindows(): number {
    return this.#slots.filter((slot) => slot.window >= 0).length;
  }

  /**
   * `length` bytes at `hostOffset` in place, or undefined where they cannot be (closed, longer
   * than `maxViewBytes`, past the size at open, not 4-byte aligned, a page not in memory, every
   * window in use by other views, the file shrank, mmap failed): the caller then reads them.
   */
  view(hostOffset: number, length: number): MappedRange | undefined {
    if (
      this.#closed ||
      this.#stopped ||
      length <= 0 ||
      length > this.#maxView ||
      hostOffset < 0 ||
      hostOffset % 4 !== 0 ||
      hostOffset + length > this.#size
    ) {
      return undefined;
    }
    const window = Math.floor(hostOffset / this.#windowBytes);
    const slot = this.#slotFor(window);
    if (slot === undefined) return undefined;
    const inWindow = hostOffset - window * this.#windowBytes;
    const page = this.#pageSize;
    const resident = slot.resident;
    for (let p = Math.floor(inWindow / page), last = Math.ceil((inWindow + length) / page); p < last; p++) {
      if ((resident[p]! & 1) === 0) return undefined;
    }
    slot.users++;
    slot.lastUse = ++this.#uses;
    const memory = this.#area!.memory;
    let held = true;
    return {
      bytes: Buffer.from(memory, slot.at + inWindow, length),
      words: new Uint32Array(memory, slot.at + inWindow, length >>> 2),
      release: () => {
        if (!held) return;
        held = false;
        slot.users--;
        if (this.#closed) this.#releaseArea();
      },
    };
  }

  /** Unmaps everything once no view is held (now, or at the last release). Idempotent. */
  close(): void {
    this.#closed = true;
    this.#releaseArea();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #pages(bytes: number): number {
    return Math.max(this.#pageSize, Math.ceil(bytes / this.#pageSize) * this.#pageSize);
  }

  /** The slot holding `window`, mapping it into a free slot when none does yet. */
  #slotFor(window: number): Slot | undefined {
    let choice: Slot | undefined;
    for (const slot of this.#slots) {
      if (slot.window === window) return slot;
      if (slot.users === 0 && (choice === undefined || slot.lastUse < choice.lastUse)) choice = slot;
    }
    if (this.#area === undefined) {
      const reserved = this.#libc.reserveMapping(this.#slotBytes * this.#slotCount);
      if (!reserved.ok) {
        this.#stopped = true;
        return undefined;
      }
      this.#area = reserved.area;
      const pagesPerSlot = this.#slotBytes / this.#pageSize;
      this.#slots = Array.from({ length: this.#slotCount }, (_, index) => ({
        at: index * this.#slotBytes,
        window: -1,
        mappedBytes: 0,
        resident: new Uint8Array(pagesPerSlot),
        users: 0,
        lastUse: 0,
      }));
      choice = this.#slots[0];
    }
    if (choice === undefined) return undefined; // every slot is in use
    const area = this.#area;
    const start = window * this.#windowBytes;
    const length = Math.min(this.#size, start + this.#slotBytes) - start;
    const mappedBytes = this.#pages(length);
    // The file must still reach the end of what is mapped (a touch past its end is SIGBUS).
    let current: number;
    try {
      current = fstatSync(this.#fd).size;
    } catch {
      current = -1;
    }
    if (current < start + length || !area.mapFile(choice.at, this.#fd, start, length).ok) {
      if (choice.mappedBytes > 0) area.clear(choice.at, choice.mappedBytes);
      choice.window = -1;
      choice.mappedBytes = 0;
      this.#stopped = true;
      return undefined;
    }
    // A shorter window than the one before: what is left of that one becomes inaccessible.
    if (choice.mappedBytes > mappedBytes) {
      area.clear(choice.at + mappedBytes, choice.mappedBytes - mappedBytes);
    }
    choice.window = window;
    choice.mappedBytes = mappedBytes;
    const resident = choice.resident.subarray(0, mappedBytes / this.#pageSize);
    if (!area.residency(choice.at, mappedBytes, resident).ok) resident.fill(0);
    return choice;
  }

  #releaseArea(): void {
    if (this.#area === undefined || this.#slots.some((slot) => slot.users > 0)) return;
    this.#area.release();
    this.#area = undefined;
    this.#slots = [];
  }
}
