/**
 * RawImage: a raw disk image over any BlockDevice, as QEMU's raw format driver sees it. Everything
 * passes through (ForwardingBlockDevice) but blockStatus, which reports every range as present at
 * this layer with its offset (a hole in the file is `zero: true, data: false` but still present),
 * as `qemu-img map` does.
 *
 * A read-only file whose length is not a multiple of 512 reads as QEMU's block layer sees it, in
 * whole 512-byte sectors: the guest is the file rounded up, the tail reading as zeros (a 25-byte
 * file is a 512-byte guest). A writable one keeps the file's own size (QEMU would grow the file on
 * a write there; nothing here does).
 */
import {
  type BlockDevice,
  type Extent,
  ForwardingBlockDevice,
  type RequestOptions,
  validateRange,
} from '@qcowkit/blockdev';

const SECTOR = 512;

export class RawImage extends ForwardingBlockDevice {
  readonly #description: string;

  constructor(file: BlockDevice, options: { description?: string } = {}) {
    super(file);
    this.#description = options.description ?? `raw:${file.description}`;
  }

  /** The file holding the image (the device every request goes to). */
  get file(): BlockDevice {
    return this.inner;
  }

  override get description(): string {
    return this.#description;
  }

  /** The file's length, rounded up to whole sectors when the file is read-only. */
  override get size(): number {
    const size = this.inner.size;
    return this.inner.readOnly && size % SECTOR !== 0 ? size - (size % SECTOR) + SECTOR : size;
  }

  override async read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    const buffer = new Uint8Array(length);
    await this.readInto(buffer, offset, options);
    return buffer;
  }

  override async readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    const fileSize = this.inner.size;
    if (offset + buffer.length <= fileSize) return this.inner.readInto(buffer, offset, options);
    validateRange(this.size, offset, buffer.length, 'read');
    // The sector's tail past the file's end reads as zeros.
    const inFile = Math.max(0, fileSize - offset);
    buffer.fill(0, inFile);
    if (inFile > 0) await this.inner.readInto(buffer.subarray(0, inFile), offset, options);
  }

  override async blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    const fileSize = this.inner.size;
    if (offset + length > fileSize) {
      validateRange(this.size, offset, length, 'blockStatus');
      const inFile = Math.max(0, fileSize - offset);
      const head = inFile > 0 ? await this.blockStatus(offset, inFile, options) : [];
      const tailStart = offset + inFile;
      return [
        ...head,
        {
          offset: tailStart,
          length: offset + length - tailStart,
          zero: true,
          data: false,
          present: true,
          depth: 0,
          hostOffset: tailStart,
        },
      ];
    }
    const extents = await this.inner.blockStatus(offset, length, options);
    return extents.map((extent) => ({
      offset: extent.offset,
      length: extent.length,
      zero: extent.zero,
      data: extent.data,
      present: true,
      depth: 0,
      hostOffset: extent.offset,
    }));
  }
}
