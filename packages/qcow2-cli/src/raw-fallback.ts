/**
 * Opens a file as a read-only raw device: `FileBlockDevice` from `@qcowkit/blockdev/node` when the
 * installed blockdev exports it, otherwise a minimal positioned-read device (all data, no holes)
 * so the CLI keeps working on raw files while the blockdev package lands.
 */
import { open, stat } from 'node:fs/promises';
import { type BlockDevice, BlockDeviceError, type Extent, validateRange } from '@qcowkit/blockdev';
import type { FileDevice } from './engine.js';

interface BlockdevNodeApi {
  FileBlockDevice: {
    open(
      path: string,
      options?: { readOnly?: boolean; lock?: boolean; forceShare?: boolean },
    ): Promise<FileDevice>;
  };
}

export async function openRawFallback(path: string, forceShare: boolean): Promise<FileDevice> {
  let api: Partial<BlockdevNodeApi> = {};
  try {
    api = (await import('@qcowkit/blockdev/node')) as unknown as Partial<BlockdevNodeApi>;
  } catch {
    api = {};
  }
  if (api.FileBlockDevice !== undefined) {
    return api.FileBlockDevice.open(path, { readOnly: true, forceShare });
  }
  return MinimalRawFile.open(path);
}

class MinimalRawFile implements FileDevice {
  readonly readOnly = true;
  readonly capabilities = {
    discard: false,
    writeZeroes: false,
    fastZero: false,
    blockStatus: false,
    flush: false,
    fua: false,
    resize: false,
    minimumAlignment: 1,
    preferredAlignment: 4096,
    maximumTransfer: 32 * 2 ** 20,
  };
  readonly description: string;
  private constructor(
    readonly path: string,
    readonly size: number,
    private readonly handle: import('node:fs/promises').FileHandle,
  ) {
    this.description = `file:${path}`;
  }

  static async open(path: string): Promise<MinimalRawFile> {
    const handle = await open(path, 'r');
    const info = await handle.stat();
    if (!info.isFile()) {
      await handle.close();
      throw new BlockDeviceError('EINVAL', `${path}: not a regular file`);
    }
    return new MinimalRawFile(path, info.size, handle);
  }

  async allocatedBytes(): Promise<number> {
    return (await stat(this.path)).blocks * 512;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buffer = new Uint8Array(length);
    await this.readInto(buffer, offset);
    return buffer;
  }

  async readInto(buffer: Uint8Array, offset: number): Promise<void> {
    validateRange(this.size, offset, buffer.length, 'read');
    let done = 0;
    while (done < buffer.length) {
      const { bytesRead } = await this.handle.read(buffer, done, buffer.length - done, offset + done);
      if (bytesRead === 0) {
        buffer.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    validateRange(this.size, offset, length, 'blockStatus');
    return [{ offset, length, zero: false, data: true, present: true, depth: 0, hostOffset: offset }];
  }

  write(): Promise<void> {
    return this.readOnlyError('write');
  }
  writeZeroes(): Promise<void> {
    return this.readOnlyError('writeZeroes');
  }
  discard(): Promise<void> {
    return this.readOnlyError('discard');
  }
  resize(): Promise<void> {
    return this.readOnlyError('resize');
  }
  async flush(): Promise<void> {}
  async close(): Promise<void> {
    await this.handle.close().catch(() => undefined);
  }
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  private async readOnlyError(kind: string): Promise<never> {
    throw new BlockDeviceError('EROFS', `${kind}: ${this.description} is read-only`);
  }
}

export type { BlockDevice };
