/**
 * Making the stored refcounts equal an offline edit's planned counts, for the snapshot
 * operations: the refcount blocks are read once (all of them, in a few large reads), compared with
 * the plan in one pass, and the blocks that changed written together (several in flight), then
 * one flush. When some cluster needs a refcount block that does not exist yet, or the blocks are
 * too many to hold in memory, the edit's general path does it (it rebuilds the refcount
 * structures when needed).
 */
import { entryOffset } from '../check/entries.js';
import { StoredRefcounts } from '../check/stored-refcounts.js';
import { WriteBehind } from '../check/write-behind.js';
import { encodeRefcount } from '../format/refcount.js';
import type { ImageEdit } from '../ops/image-edit.js';

/** Changed refcount blocks being written at once. */
const WRITES_IN_FLIGHT = 16;

/** Writes the planned refcounts (durable when it resolves). */
export async function commitRefcounts(edit: ImageEdit): Promise<void> {
  const { file, header, request, clusterSize } = edit;
  const refcountOrder = header.refcountOrder;
  const stored = await StoredRefcounts.load(file, {
    clusterSize,
    refcountBits: 2 ** refcountOrder,
    refcountTableOffset: header.refcountTableOffset,
    refcountTableClusters: header.refcountTableClusters,
    request,
  });
  const resident = stored.residentBlocks;
  if (resident === undefined) return edit.commitRefcounts();
  const counts = edit.counts;
  const perBlock = stored.entriesPerBlock;
  const changed: { hostOffset: number; bytes: Uint8Array }[] = [];
  for (let blockIndex = 0; blockIndex * perBlock < counts.length; blockIndex++) {
    const base = blockIndex * perBlock;
    const end = Math.min(counts.length, base + perBlock);
    const block = resident[blockIndex];
    if (block === undefined) {
      // No block here (or an unreadable one): fine while nothing here is in use.
      for (let clusterIndex = base; clusterIndex < end; clusterIndex++) {
        if ((counts[clusterIndex] ?? 0) !== 0) return edit.commitRefcounts();
      }
      continue;
    }
    let copy: Uint8Array | undefined;
    for (let clusterIndex = base; clusterIndex < end; clusterIndex++) {
      const count = counts[clusterIndex] ?? 0;
      if (stored.decode(block, clusterIndex - base) === count) continue;
      if (copy === undefined) {
        copy = block.slice();
        const { high, low } = stored.tableEntry(blockIndex);
        changed.push({ hostOffset: entryOffset(high, low), bytes: copy });
      }
      encodeRefcount(copy, clusterIndex - base, refcountOrder, count);
    }
  }
  if (changed.length === 0) return;
  const writes = new WriteBehind(WRITES_IN_FLIGHT);
  try {
    for (const { hostOffset, bytes } of changed) await writes.add(file.write(hostOffset, bytes, request));
    await writes.drain();
  } finally {
    await writes.settle();
  }
  await file.flush(request);
}
