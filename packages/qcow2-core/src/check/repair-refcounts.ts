/**
 * In-place refcount repair, as `qemu-img check -r` does it before any rebuild: every cluster whose
 * stored refcount differs from the references the check counted is set to that count, when the
 * mode allows it (leaks: only decreases; all: both ways) and the refcount can be written in place.
 * A referenced cluster whose stored refcount is 0 or unreadable cannot be fixed in place: it asks
 * for a rebuild of the refcount structures (mode all), as in QEMU.
 */
import type { BlockDevice, RequestOptions } from '@qcowkit/blockdev';
import { encodeRefcount } from '../format/refcount.js';
import type { ComputedRefcounts } from './computed-refcounts.js';
import { reftableEntryAligned, reftableEntryOffset, reftableReservedBitsSet } from './entries.js';
import type { StoredRefcounts } from './stored-refcounts.js';

export type RepairMode = 'leaks' | 'all';

export interface RefcountRepairOutcome {
  /** Lines as qemu-img prints them ("Repairing cluster ...", or the error when not repaired). */
  lines: string[];
  leaksFixed: number;
  corruptionsFixed: number;
  /** Some refcounts cannot be fixed in place: the refcount structures must be rebuilt (in leaks
   * mode nothing is then written). */
  rebuildNeeded: boolean;
  /** Corruptions found and not fixed in place (refcounts too low, a damaged refcount table):
   * a rebuild fixes them. */
  unfixedCorruptions: number;
}

/**
 * How many refcount table entries are damaged (reserved bits, misaligned or out-of-file blocks,
 * a block whose cluster is not referenced exactly once): only a rebuild repairs those. `outside`
 * counts the blocks past the end of the file apart: as in QEMU, they ask for a rebuild only in
 * mode all (QEMU grows the file there, then rebuilds); mode leaks leaves them reported.
 */
function refcountTableDamage(
  stored: StoredRefcounts,
  computed: ComputedRefcounts,
  clusterSize: number,
): { damaged: number; outside: number } {
  let damaged = 0;
  let outside = 0;
  for (let index = 0; index < stored.tableEntries; index++) {
    const { high, low } = stored.tableEntry(index);
    if (high === 0 && low === 0) continue;
    if (reftableReservedBitsSet(low) || !reftableEntryAligned(low, clusterSize)) {
      damaged++;
      continue;
    }
    const clusterIndex = Math.floor(reftableEntryOffset(high, low) / clusterSize);
    if (clusterIndex >= computed.used) outside++;
    else if (clusterIndex === 0 || computed.get(clusterIndex) !== 1) damaged++;
  }
  return { damaged, outside };
}

/** Fixes mismatching refcounts in place and writes the refcount blocks it changed (then flushes). */
export async function repairRefcountsInPlace(
  file: BlockDevice,
  stored: StoredRefcounts,
  computed: ComputedRefcounts,
  geometry: { clusterSize: number; refcountOrder: number },
  mode: RepairMode,
  request: RequestOptions,
  /** Called once the fixes are known, before any is written: it may throw to write nothing. */
  beforeWrite?: (outcome: RefcountRepairOutcome) => void | Promise<void>,
): Promise<RefcountRepairOutcome> {
  const { clusterSize, refcountOrder } = geometry;
  const tableDamage = refcountTableDamage(stored, computed, clusterSize);
  const outcome: RefcountRepairOutcome = {
    lines: [],
    leaksFixed: 0,
    corruptionsFixed: 0,
    rebuildNeeded: tableDamage.damaged > 0 || (mode === 'all' && tableDamage.outside > 0),
    unfixedCorruptions: tableDamage.damaged + tableDamage.outside,
  };
  const perBlock = stored.entriesPerBlock;
  const changed = new Map<number, { hostOffset: number; bytes: Uint8Array }>();
  for (let start = 0; start < computed.used; ) {
    const blockIndex = Math.floor(start / perBlock);
    const blockEnd = Math.min(computed.used, (blockIndex + 1) * perBlock);
    const block = await stored.block(blockIndex, request);
    for (let clusterIndex = start; clusterIndex < blockEnd; clusterIndex++) {
      const reference = computed.get(clusterIndex);
      if (typeof block === 'string') {
        outcome.rebuildNeeded = true;
        continue;
      }
      const refcount = block === undefined ? 0 : stored.decode(block, clusterIndex - blockIndex * perBlock);
      if (refcount === reference) continue;
      const fixable = block !== undefined && refcount !== 0 && (refcount > reference || mode === 'all');
      if (refcount === 0) outcome.rebuildNeeded = true;
      const label = fixable ? 'Repairing' : refcount < reference ? 'ERROR' : 'Leaked';
      outcome.lines.push(`${label} cluster ${clusterIndex} refcount=${refcount} reference=${reference}`);
      if (!fixable || block === undefined) {
        if (refcount < reference) outcome.unfixedCorruptions++;
        continue;
      }
      let copy = changed.get(blockIndex);
      if (copy === undefined) {
        const { high, low } = stored.tableEntry(blockIndex);
        copy = { hostOffset: reftableEntryOffset(high, low), bytes: block.slice() };
        changed.set(blockIndex, copy);
      }
      encodeRefcount(copy.bytes, clusterIndex - blockIndex * perBlock, refcountOrder, reference);
      if (refcount > reference) outcome.leaksFixed++;
      else outcome.corruptionsFixed++;
    }
    start = blockEnd;
  }
  // Leaks mode cannot rebuild: then it changes nothing (the caller reports it, as QEMU fails).
  if (mode === 'leaks' && outcome.rebuildNeeded) return { ...outcome, leaksFixed: 0, corruptionsFixed: 0 };
  await beforeWrite?.(outcome);
  for (const { hostOffset, bytes } of changed.values()) {
    await file.write(hostOffset, bytes, request);
  }
  if (changed.size > 0) await file.flush(request);
  return outcome;
}
