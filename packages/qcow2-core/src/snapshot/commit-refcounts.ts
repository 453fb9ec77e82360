/**
 * Making the stored refcounts equal an offline edit's planned counts, for the snapshot
 * operations: the refcount blocks are read once per operation (all of them, in a few large reads)
 * and kept, in memory, equal to what the file holds; each commit compares them with the plan in
 * one pass, writes the blocks that changed together (several in flight), then flushes once. When
 * some cluster needs a refcount block that does not exist yet, or the blocks are too many to hold
 * in memory, the edit's general path does it (it rebuilds the refcount structures when needed).
 */
import { entryOffset } from '../check/entries.js';
import { repairCopiedFlags } from '../check/repair-copied.js';
import { StoredRefcounts } from '../check/stored-refcounts.js';
import { WriteBehind } from '../check/write-behind.js';
import { encodeRefcount } from '../format/refcount.js';
import type { ImageEdit } from '../ops/image-edit.js';

/** Changed refcount blocks being written at once. */
const WRITES_IN_FLIGHT = 16;

/** The stored refcounts of an edit's image, while its refcount table stays where it was. */
const storedOf = new WeakMap<ImageEdit, { table: string; stored: StoredRefcounts }>();

async function loadStored(edit: ImageEdit): Promise<StoredRefcounts> {
  const { header } = edit;
  const table = `${header.refcountTableOffset}:${header.refcountTableClusters}:${header.refcountOrder}`;
  const known = storedOf.get(edit);
  if (known !== undefined && known.table === table) return known.stored;
  const stored = await StoredRefcounts.load(edit.file, {
    clusterSize: header.clusterSize,
    refcountBits: 2 ** header.refcountOrder,
    refcountTableOffset: header.refcountTableOffset,
    refcountTableClusters: header.refcountTableClusters,
    request: edit.request,
  });
  storedOf.set(edit, { table, stored });
  return stored;
}

/** The general path, after which what this module keeps is stale. */
function commitInGeneral(edit: ImageEdit): Promise<void> {
  storedOf.delete(edit);
  return edit.commitRefcounts();
}

/** Writes the planned refcounts (durable when it resolves). */
export async function commitRefcounts(edit: ImageEdit): Promise<void> {
  const { file, header, request } = edit;
  const refcountOrder = header.refcountOrder;
  const stored = await loadStored(edit);
  const resident = stored.residentBlocks;
  if (resident === undefined) return commitInGeneral(edit);
  const counts = edit.counts;
  const perBlock = stored.entriesPerBlock;
  const wide16 = refcountOrder === 4;
  const changed: { blockIndex: number; hostOffset: number; bytes: Uint8Array }[] = [];
  for (let blockIndex = 0; blockIndex * perBlock < counts.length; blockIndex++) {
    const base = blockIndex * perBlock;
    const end = Math.min(counts.length, base + perBlock);
    const block = resident[blockIndex];
    if (block === undefined) {
      // No block here (or an unreadable one): fine while nothing here is in use.
      for (let clusterIndex = base; clusterIndex < end; clusterIndex++) {
        if ((counts[clusterIndex] ?? 0) !== 0) return commitInGeneral(edit);
      }
      continue;
    }
    let copy: Uint8Array | undefined;
    for (let clusterIndex = base; clusterIndex < end; clusterIndex++) {
      const count = counts[clusterIndex] ?? 0;
      const index = clusterIndex - base;
      const now = wide16 ? (block[index * 2]! << 8) | block[index * 2 + 1]! : stored.decode(block, index);
      if (now === count) continue;
      if (copy === undefined) {
        copy = block.slice();
        const { high, low } = stored.tableEntry(blockIndex);
        changed.push({ blockIndex, hostOffset: entryOffset(high, low), bytes: copy });
      }
      if (wide16 && count <= 0xffff) {
        copy[index * 2] = count >>> 8;
        copy[index * 2 + 1] = count & 0xff;
      } else {
        encodeRefcount(copy, index, refcountOrder, count);
      }
    }
  }
  if (changed.length === 0) return;
  const writes = new WriteBehind(WRITES_IN_FLIGHT);
  try {
    for (const { hostOffset, bytes } of changed) await writes.add(file.write(hostOffset, bytes, request));
    await writes.drain();
  } catch (error) {
    // Which blocks reached the file is unknown: read them again next time.
    storedOf.delete(edit);
    throw error;
  } finally {
    await writes.settle();
  }
  for (const { blockIndex, bytes } of changed) stored.replaceBlock(blockIndex, bytes);
  await file.flush(request);
}

/**
 * Sets the COPIED flags of the active tables from the stored refcounts (after a commit: the ones
 * kept here, without reading the blocks again).
 */
export async function fixCopiedFlags(edit: ImageEdit): Promise<void> {
  const { header } = edit;
  await repairCopiedFlags(
    edit.file,
    await loadStored(edit),
    {
      clusterSize: header.clusterSize,
      l1TableOffset: header.l1TableOffset,
      l1Size: header.l1Size,
      extendedL2: edit.extendedL2,
      hasDataFile: edit.hasDataFile,
    },
    edit.request,
    false,
  );
}
