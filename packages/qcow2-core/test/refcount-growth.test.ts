/**
 * The refcount table growing more than once between two commits: every table made in memory and
 * replaced before the commit is freed again (it was never written), so the image ends without
 * leaks. QEMU's check is the oracle.
 */
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { MemoryBlockDevice } from '@qcowkit/blockdev';
import { describe, expect, it } from 'vitest';
import { MetadataMap } from '../src/alloc/metadata-map.js';
import { RefcountStore } from '../src/alloc/refcount-store.js';
import { decodeHeader, encodeHeader } from '../src/format/index.js';
import { Qcow2Image } from '../src/index.js';
import { requireTools, suiteTempDir } from './qemu.js';

const haveQemu = requireTools('qemu-img');

describe.skipIf(!haveQemu)('refcount table growth', () => {
  const dir = suiteTempDir();

  it('growing twice between commits leaks no table', async () => {
    // 512 B clusters with 64-bit refcounts: a refcount block covers 64 clusters and a one-cluster
    // table 4096, so a few thousand allocations grow the table several times.
    const file = new MemoryBlockDevice(0);
    const image = await Qcow2Image.create(file, { size: 1 << 20, clusterSize: 512, refcountBits: 64 });
    // Flushed, not closed (closing would close the memory device); nothing writes through it again.
    await image.flush();
    const header = decodeHeader(await file.read(0, 512));
    const metadata = new MetadataMap(512);
    const store = await RefcountStore.load({
      file,
      clusterBits: 9,
      refcountOrder: 6,
      tableOffset: header.refcountTableOffset,
      tableClusters: header.refcountTableClusters,
      metadata,
      // The header as a whole, re-encoded by the format's own encoder with the new table.
      writeTablePointer: async (refcountTableOffset, refcountTableClusters) => {
        const current = decodeHeader(await file.read(0, 512));
        const fields = {
          ...current,
          extensions: current.extensions.list,
          refcountTableOffset,
          refcountTableClusters,
        };
        await file.write(0, encodeHeader(fields));
        await file.flush();
      },
    });
    const tables = new Set<number>([store.tableOffset]);
    const runs: number[] = [];
    for (let index = 0; index < 9000; index++) {
      runs.push(await store.allocate(1));
      tables.add(store.tableOffset);
    }
    // Two tables or more were made in memory after the one on disk.
    expect(tables.size).toBeGreaterThanOrEqual(3);
    await store.commit();
    // Give the data clusters back: the image is then clean unless a replaced table leaked (the
    // clusters of a freed table may have been handed out again meanwhile: they are in `runs`).
    for (const cluster of runs) await store.adjust(cluster, 1, -1);
    await store.commit();
    const name = join(dir.path, 'grown.qcow2');
    writeFileSync(name, await file.read(0, file.size));
    const status = spawnSync('qemu-img', ['check', name], { encoding: 'utf8' });
    expect(status.status, status.stdout + status.stderr).toBe(0);
  });
});
