import {
  type BlockDevice,
  FaultInjectingBlockDevice,
  ForwardingBlockDevice,
  MemoryBlockDevice,
  OverlayBlockDevice,
} from '@qcowkit/blockdev';
import { describeBlockDeviceConformance, patternBytes } from '@qcowkit/blockdev/testing';

describeBlockDeviceConformance({
  name: 'MemoryBlockDevice',
  create: async (size) => new MemoryBlockDevice(size),
  createReadOnly: async (content) => MemoryBlockDevice.from(content, { readOnly: true }),
  supportsResize: true,
});

describeBlockDeviceConformance({
  name: 'MemoryBlockDevice with 512-byte chunks',
  create: async (size) => new MemoryBlockDevice(size, { chunkSize: 512 }),
  sizes: [4097, 197_635],
  numRuns: 20,
  supportsResize: true,
});

describeBlockDeviceConformance({
  name: 'ForwardingBlockDevice over a memory device',
  create: async (size) => new ForwardingBlockDevice(new MemoryBlockDevice(size)),
  createReadOnly: async (content) =>
    new ForwardingBlockDevice(MemoryBlockDevice.from(content, { readOnly: true })),
  sizes: [4097],
  numRuns: 20,
  supportsResize: true,
});

/** Reopening an overlay commits it into its lower device and lays a fresh overlay on top. */
async function commitAndReopen(device: BlockDevice): Promise<BlockDevice> {
  const overlay = device as OverlayBlockDevice;
  await overlay.commit();
  await overlay.close();
  return new OverlayBlockDevice(overlay.lower, { granularity: overlay.granularity });
}

describeBlockDeviceConformance({
  name: 'OverlayBlockDevice over an empty memory device',
  create: async (size) => new OverlayBlockDevice(new MemoryBlockDevice(size)),
  reopen: commitAndReopen,
  createReadOnly: async (content) =>
    new OverlayBlockDevice(MemoryBlockDevice.from(content, { readOnly: true }), { readOnly: true }),
  supportsResize: true,
});

/** The lower device holds random-looking data (the first 300 KiB at most), so reads fall through
 * to it, copy-on-write copies it, and zeroing must hide it. */
const LOWER_SEED = 1234;
const lowerContent = (size: number) => patternBytes(LOWER_SEED, Math.min(size, 300 * 1024));

describeBlockDeviceConformance({
  name: 'OverlayBlockDevice (4 KiB granules) over a memory device full of data',
  create: async (size) => {
    const lower = new MemoryBlockDevice(size);
    await lower.write(0, lowerContent(size));
    return new OverlayBlockDevice(lower, { granularity: 4096 });
  },
  initialContent: lowerContent,
  reopen: commitAndReopen,
  supportsResize: true,
});

describeBlockDeviceConformance({
  name: 'FaultInjectingBlockDevice without faults',
  // closeInner: false, so a reopen can close the wrapper (flushing it) and wrap the same memory again.
  create: async (size) => new FaultInjectingBlockDevice(new MemoryBlockDevice(size), { closeInner: false }),
  reopen: async (device) => {
    const faulty = device as FaultInjectingBlockDevice;
    await faulty.close();
    return new FaultInjectingBlockDevice(faulty.inner, { closeInner: false });
  },
  createReadOnly: async (content) =>
    new FaultInjectingBlockDevice(MemoryBlockDevice.from(content, { readOnly: true })),
  supportsResize: true,
});

/** Forwards every request to a memory device after a turn of the event loop, so requests to the
 * overlay interleave the way they do over real storage. */
class YieldingDevice extends MemoryBlockDevice {
  static #turn() {
    return new Promise<void>((resolve) => setImmediate(resolve));
  }
  override async readInto(buffer: Uint8Array, offset: number): Promise<void> {
    await YieldingDevice.#turn();
    await super.readInto(buffer, offset);
  }
  override async write(offset: number, data: Uint8Array): Promise<void> {
    const copy = data.slice();
    await YieldingDevice.#turn();
    await super.write(offset, copy);
  }
  override async writeZeroes(offset: number, length: number): Promise<void> {
    await YieldingDevice.#turn();
    await super.writeZeroes(offset, length);
  }
  override async discard(offset: number, length: number): Promise<void> {
    await YieldingDevice.#turn();
    await super.discard(offset, length);
  }
}

describeBlockDeviceConformance({
  name: 'OverlayBlockDevice over slow devices (requests interleave)',
  create: async (size) => {
    const lower = new YieldingDevice(size);
    await lower.write(0, lowerContent(size));
    return new OverlayBlockDevice(lower, { granularity: 4096, upper: new YieldingDevice(size) });
  },
  initialContent: lowerContent,
  sizes: [4097, 197_635],
  numRuns: 25,
  supportsResize: true,
});
