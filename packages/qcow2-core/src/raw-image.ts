/**
 * RawImage: a raw disk image over any BlockDevice, as QEMU's raw format driver sees it. Everything
 * passes through (ForwardingBlockDevice) but blockStatus, which reports every range as present at
 * this layer with its offset (a hole in the file is `zero: true, data: false` but still present),
 * as `qemu-img map` does.
 */
import { type BlockDevice, type Extent, ForwardingBlockDevice, type RequestOptions } from '@qcowkit/blockdev';

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

  override async blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
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
