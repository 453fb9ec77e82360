/**
 * `qcow2 convert -t CACHE`: what QEMU's cache mode for the target means here. qemu-img convert
 * (7.2) defaults to `unsafe` and then never flushes its target (strace: no fdatasync after the
 * data, for raw and qcow2 targets, new or `-n`); `writeback` and `none` flush once when the
 * target is closed; `writethrough` and `directsync` flush after every write. `none` and
 * `directsync` also open the target with O_DIRECT, bypassing the page cache: here the page cache
 * is always used, so `none` behaves as `writeback` and `directsync` as `writethrough` (the same
 * flushes, the data also left in the page cache). `-T` (the source's mode) changes nothing: reads
 * always go through the page cache.
 */
import {
  ForwardingBlockDevice,
  type RequestOptions,
  type WriteOptions,
  type WriteZeroesOptions,
} from '@qcowkit/blockdev';
import type { FileFlush } from '@qcowkit/qcow2-writer/node';

/** qemu-img convert's default target cache mode. */
export const DEFAULT_TARGET_CACHE = 'unsafe';

/** When the target is flushed (fdatasync) under `-t cache` (a mode cacheParser accepted). */
export function targetFlush(cache: string | undefined): FileFlush {
  switch (cache ?? DEFAULT_TARGET_CACHE) {
    case 'unsafe':
      return 'never';
    case 'writethrough':
    case 'directsync':
      return 'every-write';
    default:
      // writeback, none, off
      return 'on-close';
  }
}

/**
 * `device` with every write durable when it resolves (`cache=writethrough`): writes and zero
 * writes are asked with `fua` (a qcow2 image then flushes its metadata and its file, as QEMU does
 * after each write in this mode), a discard is followed by a flush.
 */
export class WriteThroughDevice extends ForwardingBlockDevice {
  override write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    return this.inner.write(offset, data, { ...options, fua: true });
  }

  override writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    return this.inner.writeZeroes(offset, length, { ...options, fua: true });
  }

  override async discard(offset: number, length: number, options?: RequestOptions): Promise<void> {
    await this.inner.discard(offset, length, options);
    await this.inner.flush(options);
  }

  /** The inner device is its opener's to close. */
  override close(): Promise<void> {
    return Promise.resolve();
  }
}
