/**
 * RawImage: a raw disk image over any BlockDevice, as QEMU's raw format driver sees it. Reads and
 * writes pass through; blockStatus reports every range as present at this layer with its offset
 * (a hole in the file is `zero: true, data: false` but still present), as `qemu-img map` does.
 */
import type {
  BlockDevice,
  BlockDeviceCapabilities,
  Extent,
  RequestOptions,
  WriteOptions,
  WriteZeroesOptions,
} from '@qcowkit/blockdev';

export class RawImage implements BlockDevice {
  readonly file: BlockDevice;
  readonly description: string;

  constructor(file: BlockDevice, options: { description?: string } = {}) {
    this.file = file;
    this.description = options.description ?? `raw:${file.description}`;
  }

  get size(): number {
    return this.file.size;
  }

  get readOnly(): boolean {
    return this.file.readOnly;
  }

  get capabilities(): BlockDeviceCapabilities {
    return this.file.capabilities;
  }

  read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    return this.file.read(offset, length, options);
  }

  readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    return this.file.readInto(buffer, offset, options);
  }

  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    return this.file.write(offset, data, options);
  }

  writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    return this.file.writeZeroes(offset, length, options);
  }

  discard(offset: number, length: number, options?: RequestOptions): Promise<void> {
    return this.file.discard(offset, length, options);
  }

  flush(options?: RequestOptions): Promise<void> {
    return this.file.flush(options);
  }

  async blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    const extents = await this.file.blockStatus(offset, length, options);
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

  resize(newSize: number): Promise<void> {
    return this.file.resize(newSize);
  }

  close(): Promise<void> {
    return this.file.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
