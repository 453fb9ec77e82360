/**
 * The overlay stacked over and under real files: memory over a file (the file stays untouched
 * until commit) and a file over memory (the copy-on-write layer is a sparse file).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type BlockDevice, MemoryBlockDevice, OverlayBlockDevice } from '@qcowkit/blockdev';
import { FileBlockDevice } from '@qcowkit/blockdev/node';
import { describeBlockDeviceConformance, patternBytes } from '@qcowkit/blockdev/testing';
import { afterAll, describe, expect, it } from 'vitest';

const dir = mkdtempSync(join(tmpdir(), 'qcowkit-overlay-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let counter = 0;
/** Lower devices outlive the overlays laid over them across reopens; closed at the end. */
const lowers: BlockDevice[] = [];
afterAll(async () => {
  for (const lower of lowers) await lower.close();
});
function track<T extends BlockDevice>(lower: T): T {
  lowers.push(lower);
  return lower;
}
const freshPath = (name: string) => join(dir, `${name}-${counter++}.raw`);

const lowerContent = (size: number) => patternBytes(99, Math.min(size, 200 * 1024));

/** Commits the overlay into its lower device and lays a fresh overlay of the same kind on top. */
async function commitAndReopen(device: BlockDevice, upper: (size: number) => Promise<BlockDevice>) {
  const overlay = device as OverlayBlockDevice;
  await overlay.commit();
  await overlay.close();
  return new OverlayBlockDevice(overlay.lower, {
    granularity: overlay.granularity,
    upper: await upper(overlay.lower.size),
    closeUpper: true,
  });
}

const memoryUpper = async (size: number) => new MemoryBlockDevice(size);
const fileUpper = (size: number) => FileBlockDevice.create(freshPath('upper'), size);

describeBlockDeviceConformance({
  name: 'OverlayBlockDevice: memory over a file',
  create: async (size) => {
    const lower = track(await FileBlockDevice.create(freshPath('lower'), size));
    await lower.write(0, lowerContent(size));
    return new OverlayBlockDevice(lower, { upper: await memoryUpper(size), closeUpper: true });
  },
  initialContent: lowerContent,
  reopen: (device) => commitAndReopen(device, memoryUpper),
  sizes: [4097, 197_635, 2 ** 32 + 1536],
  numRuns: 20,
  supportsResize: true,
});

describeBlockDeviceConformance({
  name: 'OverlayBlockDevice: a file over memory',
  create: async (size) => {
    const lower = track(new MemoryBlockDevice(size));
    await lower.write(0, lowerContent(size));
    return new OverlayBlockDevice(lower, {
      granularity: 4096,
      upper: await fileUpper(size),
      closeUpper: true,
    });
  },
  initialContent: lowerContent,
  reopen: (device) => commitAndReopen(device, fileUpper),
  sizes: [4097, 197_635, 2 ** 32 + 1536],
  numRuns: 20,
  supportsResize: true,
});

describe('OverlayBlockDevice over a file', () => {
  it('never writes the lower file before commit, and commit writes exactly the changes', async () => {
    const path = freshPath('base');
    const base = await FileBlockDevice.create(path, 1 << 20);
    await base.write(0, lowerContent(1 << 20));
    await base.close();

    const lower = await FileBlockDevice.open(path, { readOnly: true });
    const overlay = new OverlayBlockDevice(lower, { closeLower: true });
    await overlay.write(1000, new Uint8Array(5000).fill(7));
    await overlay.writeZeroes(300_000, 70_000);
    const before = await FileBlockDevice.open(path, { readOnly: true, lock: 'none' });
    const original = new Uint8Array(1 << 20);
    original.set(lowerContent(1 << 20));
    expect(await before.read(0, 1 << 20)).toEqual(original);
    await before.close();
    const seen = await overlay.read(0, 1 << 20);
    await overlay.close();

    const writable = await FileBlockDevice.open(path);
    const recommitted = new OverlayBlockDevice(writable, { closeLower: true });
    await recommitted.write(1000, new Uint8Array(5000).fill(7));
    await recommitted.writeZeroes(300_000, 70_000);
    await recommitted.commit();
    await recommitted.close();
    const after = await FileBlockDevice.open(path, { readOnly: true });
    expect(await after.read(0, 1 << 20)).toEqual(seen);
    await after.close();
  });
});
