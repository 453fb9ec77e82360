/**
 * Qcow2Image as a read-write BlockDevice: the conformance kit (model-based writes, zeroes,
 * discards, flushes, reopens, concurrency, bounds) on images over memory and over files, across
 * cluster sizes, refcount widths, extended L2, v2, lazy refcounts and a backing file.
 */
import { join } from 'node:path';
import { type BlockDevice, MemoryBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { describeBlockDeviceConformance, patternBytes } from '@qcowkit/blockdev/testing';
import { afterAll } from 'vitest';
import { type Qcow2CreateOptions, Qcow2Image } from '../src/index.js';
import { keepOpen } from './keep-open.js';
import { tempDir } from './qemu.js';

const RUNS = 8 * Number(process.env.QCOWKIT_SOAK ?? 1);
const SIZES = [1, 4097, 197_635, 2 ** 32 + 1536];
const dir = tempDir();
// Long soak runs (QCOWKIT_CONFORMANCE_RUNS) leave thousands of files to remove.
afterAll(() => dir.remove(), 120_000);
let counter = 0;

const storages = new WeakMap<BlockDevice, BlockDevice>();

function register(options: Omit<Qcow2CreateOptions, 'size'>, name: string, onFile: boolean): void {
  const openOptions = {};
  describeBlockDeviceConformance({
    name: `qcow2 ${name}${onFile ? ' over a file' : ''}`,
    sizes: SIZES,
    numRuns: RUNS,
    maxOperations: 20,
    supportsResize: true,
    timeout: 60_000,
    async create(size) {
      const inner = onFile
        ? await FileBlockDevice.create(join(dir.path, `c-${counter++}.qcow2`), 0)
        : new MemoryBlockDevice(0);
      const storage = onFile ? inner : keepOpen(inner);
      const image = await Qcow2Image.create(storage, { ...options, size, ...openOptions });
      storages.set(image, onFile ? inner : storage);
      return image;
    },
    async reopen(device) {
      const storage = storages.get(device)!;
      if (storage instanceof FileBlockDevice) {
        await device.close();
        const file = await FileBlockDevice.open(storage.path, { readOnly: false });
        const image = await Qcow2Image.open(file, { readOnly: false });
        storages.set(image, file);
        return image;
      }
      await device.close();
      const image = await Qcow2Image.open(storage, { readOnly: false });
      storages.set(image, storage);
      return image;
    },
  });
}

register({}, '64 KiB clusters', false);
register({ clusterSize: 4096, refcountBits: 8 }, '4 KiB clusters, 8-bit refcounts', true);
register({ clusterSize: 512, refcountBits: 1 }, '512 B clusters, 1-bit refcounts', false);
register({ clusterSize: 16384, refcountBits: 64, extendedL2: true }, 'extended L2, 64-bit refcounts', false);
register({ clusterSize: 4096, compat: '0.10' }, 'v2', false);
register(
  { clusterSize: 2 * 1024 * 1024, lazyRefcounts: true, refcountBits: 2 },
  '2 MiB clusters, lazy refcounts',
  true,
);

// Over a backing file: discard shows the backing file again (the kit accepts that).
describeBlockDeviceConformance({
  name: 'qcow2 4 KiB clusters over a backing file',
  sizes: [4097, 197_635],
  numRuns: RUNS,
  maxOperations: 20,
  supportsResize: true,
  discardReadsZero: false,
  initialContent: (size) => patternBytes(7, size),
  async create(size) {
    const backing = patternBytes(7, Math.ceil(size / 512) * 512);
    return Qcow2Image.create(keepOpen(new MemoryBlockDevice(0)), {
      size,
      clusterSize: 4096,
      backingFile: 'backing.raw',
      backingFormat: 'raw',
      resolveBacking: async () => MemoryBlockDevice.from(backing.slice()),
    });
  },
});
