/**
 * The COPIED repair of L1 entries naming misaligned L2 tables or tables past the end of the file:
 * the flag follows the refcount of the cluster the entry names, as QEMU sets it before it looks at
 * the table. A leak repair may just have freed that cluster; a flag left set would be a new
 * corruption.
 */
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { describe, expect, it } from 'vitest';
import { repairCopiedFlags } from '../src/check/repair-copied.js';

const CLUSTER = 65536;
const L1_OFFSET = 3 * CLUSTER;
const COPIED = 1n << 63n;

async function repairOf(entry: bigint, refcount: number, fileClusters = 8) {
  const bytes = new Uint8Array(fileClusters * CLUSTER);
  new DataView(bytes.buffer).setBigUint64(L1_OFFSET, entry);
  const file = MemoryBlockDevice.from(bytes);
  const result = await repairCopiedFlags(
    file,
    { get: async () => refcount },
    { clusterSize: CLUSTER, l1TableOffset: L1_OFFSET, l1Size: 1, extendedL2: false, hasDataFile: false },
    {},
  );
  const stored = new DataView((await file.read(L1_OFFSET, 8)).buffer).getBigUint64(0);
  return { ...result, stored };
}

describe('repairCopiedFlags: L1 entries naming misaligned tables or tables past the end', () => {
  it.each([
    ['misaligned, in a freed cluster', 6n * 65536n + 0x2800n, 0, 8],
    ['misaligned, in a cluster counted twice', 5n * 65536n + 0x200n, 2, 8],
    ['past the end of the file', 12n * 65536n, 0, 8],
  ])('%s: COPIED is cleared', async (_what, offset, refcount, fileClusters) => {
    const { fixed, lines, stored } = await repairOf(COPIED | offset, refcount, fileClusters);
    expect(fixed).toBe(1);
    expect(lines).toEqual([
      `Repairing OFLAG_COPIED L2 cluster: l1_index=0 l1_entry=${(COPIED | offset).toString(16)} refcount=${refcount}`,
    ]);
    expect(stored).toBe(offset);
  });

  it('misaligned, refcount 1: COPIED is set', async () => {
    const offset = 6n * 65536n + 0x2800n;
    const { fixed, stored } = await repairOf(offset, 1);
    expect(fixed).toBe(1);
    expect(stored).toBe(COPIED | offset);
  });

  it('a flag already right is left alone', async () => {
    const offset = 6n * 65536n + 0x2800n;
    const { fixed, lines, stored } = await repairOf(offset, 0);
    expect(fixed).toBe(0);
    expect(lines).toEqual([]);
    expect(stored).toBe(offset);
  });
});
