/**
 * ForwardingBlockDevice: a BlockDevice that passes every request, property and close to another
 * one. The base of a wrapper that changes only some of them: extend it and override those (e.g.
 * writes made durable, a capability taken away, a request checked first), instead of writing out
 * the whole interface again.
 */
import type {
  BlockDevice,
  BlockDeviceCapabilities,
  Extent,
  RequestOptions,
  WriteOptions,
  WriteZeroesOptions,
} from './block-device.js';

export class ForwardingBlockDevice<Inner extends BlockDevice = BlockDevice> implements BlockDevice {
  /** The device every request goes to. */
  readonly inner: Inner;

  constructor(inner: Inner) {
    this.inner = inner;
  }

  get size(): number {
    return this.inner.size;
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }

  get description(): string {
    return this.inner.description;
  }

  get capabilities(): BlockDeviceCapabilities {
    return this.inner.capabilities;
  }

  read(offset: number, length: number, options?: RequestOptions): Promise<Uint8Array> {
    return this.inner.read(offset, length, options);
  }

  readInto(buffer: Uint8Array, offset: number, options?: RequestOptions): Promise<void> {
    return this.inner.readInto(buffer, offset, options);
  }

  write(offset: number, data: Uint8Array, options?: WriteOptions): Promise<void> {
    return this.inner.write(offset, data, options);
  }

  writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    return this.inner.writeZeroes(offset, length, options);
  }

  discard(offset: number, length: number, options?: RequestOptions): Promise<void> {
    return this.inner.discard(offset, length, options);
  }

  flush(options?: RequestOptions): Promise<void> {
    return this.inner.flush(options);
  }

  blockStatus(offset: number, length: number, options?: RequestOptions): Promise<Extent[]> {
    return this.inner.blockStatus(offset, length, options);
  }

  resize(newSize: number): Promise<void> {
    return this.inner.resize(newSize);
  }

  /** Closes the inner device (override to leave it to whoever opened it). */
  close(): Promise<void> {
    return this.inner.close();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
