/**
 * Fast zeroing (NBD's FAST_ZERO) for a writable qcow2 image. qcow2 zeroes whole clusters in its
 * metadata (the zero flag, or no entry where nothing shows through), which is faster than writing
 * zeros; a partial cluster has to be written as data, which is not. So a fast-only request
 * succeeds when every partial cluster at its ends already reads as zeros (nothing to do there) and
 * the whole clusters between are zeroed in the metadata; otherwise it fails with ENOTSUP before
 * changing anything, as the spec asks. A v2 image over a backing file has no zero flag (its zeros
 * are written as data) and an image whose data lives in a raw external file must write zeros
 * there: neither offers fast zeroing.
 *
 * The partial ends are checked, never widened to their whole cluster: a widened zeroing could
 * erase a concurrent write to the rest of that cluster, which does not overlap the request.
 */
import {
  type BlockDevice,
  type BlockDeviceCapabilities,
  BlockDeviceError,
  ForwardingBlockDevice,
  type WriteZeroesOptions,
} from '@qcowkit/blockdev';

/** What this needs to know of a qcow2 image (a writable Qcow2Image has all of it). */
export interface ZeroableQcow2 extends BlockDevice {
  readonly version: 2 | 3;
  readonly clusterSize: number;
  readonly backingFileName: string | undefined;
  readonly dataFileRaw: boolean;
}

/** True when whole clusters of `image` are zeroed without writing data. */
export function zeroesInMetadata(image: ZeroableQcow2): boolean {
  const hasBacking = image.backingFileName !== undefined && image.backingFileName !== '';
  return !image.readOnly && !image.dataFileRaw && !(image.version === 2 && hasBacking);
}

export class FastZeroQcow2 extends ForwardingBlockDevice<ZeroableQcow2> {
  readonly #capabilities: BlockDeviceCapabilities;
  readonly #fast: boolean;

  constructor(image: ZeroableQcow2) {
    super(image);
    this.#fast = zeroesInMetadata(image);
    this.#capabilities = { ...image.capabilities, writeZeroes: this.#fast, fastZero: this.#fast };
  }

  /** The wrapped image. */
  get image(): ZeroableQcow2 {
    return this.inner;
  }

  override get capabilities(): BlockDeviceCapabilities {
    return this.#capabilities;
  }

  override async writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    if (options?.fastOnly !== true) return this.image.writeZeroes(offset, length, options);
    const refuse = (why: string): never => {
      throw new BlockDeviceError(
        'ENOTSUP',
        `writeZeroes: ${this.image.description}: no fast zeroing ${why}`,
        { offset },
      );
    };
    if (!this.#fast) refuse('on this image');
    const clusterSize = this.image.clusterSize;
    const end = offset + length;
    const size = this.image.size;
    const wholeStart = Math.ceil(offset / clusterSize) * clusterSize;
    // The image's last, short cluster is whole when the request reaches the end.
    const wholeEnd = end === size ? end : Math.floor(end / clusterSize) * clusterSize;
    if (wholeStart >= wholeEnd) {
      // Inside one cluster: fast only when the bytes are zeros already.
      if (length > 0 && !(await this.#readsAsZeros(offset, length))) refuse('for a partial cluster');
      return;
    }
    if (offset < wholeStart && !(await this.#readsAsZeros(offset, wholeStart - offset))) {
      refuse('for a partial cluster');
    }
    if (wholeEnd < end && !(await this.#readsAsZeros(wholeEnd, end - wholeEnd))) {
      refuse('for a partial cluster');
    }
    const { fastOnly: _fastOnly, ...rest } = options;
    await this.image.writeZeroes(wholeStart, wholeEnd - wholeStart, rest);
  }

  async #readsAsZeros(offset: number, length: number): Promise<boolean> {
    const end = offset + length;
    let position = offset;
    while (position < end) {
      const extents = await this.image.blockStatus(position, end - position);
      if (extents.length === 0) return false;
      for (const extent of extents) {
        if (!extent.zero) return false;
        position = extent.offset + extent.length;
        if (position >= end) break;
      }
    }
    return true;
  }
}
