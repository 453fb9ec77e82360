/**
 * `qemu-img check -r leaks|all`: check, repair what the mode allows, check again.
 *
 * 0. Mode all: preallocated L2 entries whose host offset is misaligned are made plain zero
 *    entries (see preallocated-fixes.ts; the check counts them out), written and flushed first.
 * 1. Refcounts that differ from the counted references are fixed in place (leaks: decreased;
 *    all: also increased).
 * 2. Mode all, when refcounts cannot be fixed in place (a referenced cluster with refcount 0, an
 *    unreadable refcount block, a damaged refcount table): the refcount structures are rebuilt
 *    (see rebuild-refcounts.ts), then the old ones, now leaked, are freed.
 * 3. Mode all: COPIED flags of the active tables are set to match the refcounts.
 * 4. The image is checked again; that state is the result, with leaksFixed / corruptionsFixed
 *    (qemu-img prints that second check only when something was fixed). When no corruption and
 *    no check error remain, the dirty and corrupt bits are cleared, as QEMU marks a repaired image
 *    clean and consistent.
 *
 * Every step flushes before the next one, and each only drops references, raises refcounts, lowers
 * refcounts nothing references, or switches the header to fully written structures: a crash
 * mid-repair leaves at worst leaks. Data clusters are never moved or rewritten (but an L1 entry
 * naming its table at a misaligned offset makes what lies there a table, as QEMU sees it).
 */
import { BlockDeviceError, type RequestOptions } from '@qcowkit/blockdev';
import { QCOW2_INCOMPAT_DATA_FILE, QCOW2_INCOMPAT_EXTL2 } from '../format/feature-bits.js';
import { inspectQcow2Image, loadHeader, type Qcow2CheckTarget, type Qcow2Inspection } from './check.js';
import { reftableEntryOffset } from './entries.js';
import { countsOf, rebuildRefcountStructure, rebuildRefusal } from './rebuild-refcounts.js';
import { repairCopiedFlags } from './repair-copied.js';
import { type RepairMode, repairRefcountsInPlace } from './repair-refcounts.js';
import { StoredRefcounts } from './stored-refcounts.js';
import type { Qcow2CheckOptions, Qcow2CheckResult } from './types.js';

/** Incompatible feature bits QEMU clears on a repaired image: dirty (0) and corrupt (1). */
const DIRTY_AND_CORRUPT = 0b11;
/** Byte offset of the low half of incompatible_features (v3). */
const INCOMPATIBLE_FEATURES_LOW_FIELD = 76;

/**
 * `repair: 'leaks'` met refcounts only a rebuild can fix (`repair: 'all'`): nothing was changed.
 * qemu-img fails the same way ("Check failed: Input/output error", exit 1); `messages` holds the
 * lines it prints before.
 */
export class Qcow2RebuildNeededError extends BlockDeviceError {
  override name = 'Qcow2RebuildNeededError';
  constructor(readonly messages: string[]) {
    super('EIO', "qcow2 check: the refcount structures need a rebuild, which only repair 'all' does");
  }
}

export async function repairQcow2Image(
  image: Qcow2CheckTarget,
  mode: RepairMode,
  options: Qcow2CheckOptions = {},
): Promise<Qcow2CheckResult> {
  if (mode !== 'leaks' && mode !== 'all') {
    throw new BlockDeviceError('EINVAL', `qcow2 check: repair mode ${String(mode)} is not leaks or all`);
  }
  const { file } = image;
  if (file.readOnly) {
    throw new BlockDeviceError('EROFS', `qcow2 check: repair needs a writable file (${file.description})`);
  }
  const request: RequestOptions = options.signal === undefined ? {} : { signal: options.signal };
  const inspectOptions = { ...options };
  delete inspectOptions.repair;
  // Mode all repairs misaligned preallocated entries as it counts (planned here, written below).
  const first = await inspectQcow2Image(image, { ...inspectOptions, fixPreallocated: mode === 'all' });
  const before = first.result;
  const entryFixes = first.fixes?.count ?? 0;
  const lines: string[] = [];
  let leaksFixed = 0;
  let corruptionsFixed = entryFixes;
  let rebuilt = false;
  const needsWork = before.leaks > 0 || before.corruptions > 0 || before.checkErrors > 0 || entryFixes > 0;

  if (needsWork) {
    const geometry = { clusterSize: first.header.clusterSize, refcountOrder: first.header.refcountOrder };
    const namedPastEnd = first.computed.namedPastEnd;
    const inPlace = await repairRefcountsInPlace(
      file,
      first.stored,
      first.computed,
      geometry,
      mode,
      request,
      async (outcome) => {
        // A rebuild that will be refused is refused now, before the in-place fixes are written.
        if (mode === 'all' && outcome.rebuildNeeded && namedPastEnd.size > 0) {
          const refusal = rebuildRefusal(
            file,
            countsOf(first.computed, geometry.refcountOrder),
            geometry,
            namedPastEnd,
          );
          if (refusal !== undefined) throw refusal;
        }
        // Repaired entries stop naming their clusters (durably) before any refcount changes.
        await first.fixes?.write(file, request);
      },
    );
    if (mode === 'leaks' && inPlace.rebuildNeeded) {
      throw new Qcow2RebuildNeededError([
        ...before.messages.filter((line) => !isCopiedLine(line)),
        'ERROR need to rebuild refcount structures',
      ]);
    }
    // QEMU prints the in-place pass only when it does not rebuild.
    if (!inPlace.rebuildNeeded) lines.push(...inPlace.lines);
    leaksFixed += inPlace.leaksFixed;
    corruptionsFixed += inPlace.corruptionsFixed;
    if (inPlace.rebuildNeeded) {
      lines.push('Rebuilding refcount structure');
      rebuilt = true;
      await rebuildRefcountStructure(
        file,
        countsOf(first.computed, geometry.refcountOrder),
        geometry,
        request,
        true,
        namedPastEnd,
      );
      corruptionsFixed += inPlace.unfixedCorruptions;
      // The old structures are leaked now: free them.
      const afterRebuild = await inspectQcow2Image({ file }, inspectOptions);
      const freed = await repairRefcountsInPlace(
        file,
        afterRebuild.stored,
        afterRebuild.computed,
        geometry,
        'leaks',
        request,
      );
      lines.push(...freed.lines);
    }
    if (mode === 'all') {
      const header = await loadHeader(file, request);
      const stored = await StoredRefcounts.load(file, {
        clusterSize: header.clusterSize,
        refcountBits: 2 ** header.refcountOrder,
        refcountTableOffset: header.refcountTableOffset,
        refcountTableClusters: header.refcountTableClusters,
        request,
      });
      const copied = await repairCopiedFlags(
        file,
        stored,
        {
          clusterSize: header.clusterSize,
          l1TableOffset: header.l1TableOffset,
          l1Size: header.l1Size,
          extendedL2: (header.incompatibleFeatures.low & QCOW2_INCOMPAT_EXTL2) !== 0,
          hasDataFile: (header.incompatibleFeatures.low & QCOW2_INCOMPAT_DATA_FILE) !== 0,
          metadata: [
            [0, header.clusterSize],
            [header.refcountTableOffset, header.refcountTableClusters * header.clusterSize],
            [header.l1TableOffset, header.l1Size * 8],
            [header.snapshotsOffset, first.snapshotTable.size],
            ...first.snapshotTable.snapshots.map(
              (snapshot) => [snapshot.l1TableOffset, snapshot.l1Size * 8] as const,
            ),
            ...stored
              .usedTableEntries()
              .map(
                (index) =>
                  [
                    reftableEntryOffset(stored.tableHigh(index), stored.tableLow(index)),
                    header.clusterSize,
                  ] as const,
              ),
          ],
        },
        request,
      );
      if (!inPlace.rebuildNeeded) lines.push(...copied.lines);
      corruptionsFixed += copied.fixed;
    }
  }

  const after: Qcow2Inspection = needsWork ? await inspectQcow2Image({ file }, inspectOptions) : first;
  if (after.result.corruptions === 0 && after.result.checkErrors === 0) await markClean(image, request);
  // qemu-img checks again only when something was fixed; else its verdict is the repair's own,
  // the same counts as a check now (nothing was written).
  const checkedAgain = leaksFixed > 0 || corruptionsFixed > 0;
  return {
    ...after.result,
    leaksFixed,
    corruptionsFixed,
    messages: needsWork
      ? repairMessages(before.messages, lines, after.result.messages, mode, rebuilt, checkedAgain)
      : before.messages,
  };
}

/** COPIED findings (checked after the refcounts). */
const isCopiedLine = (line: string): boolean => line.startsWith('ERROR OFLAG_COPIED');

/**
 * The lines as `qemu-img check -r` prints them: its comparison before repairing (without COPIED
 * findings, checked only after the repair), the repair (in-place fixes then COPIED findings, which
 * leaks mode reports without fixing; or the rebuild and the freeing of the old structures), then
 * the check after.
 */
function repairMessages(
  before: string[],
  lines: string[],
  after: string[],
  mode: RepairMode,
  rebuilt: boolean,
  checkedAgain: boolean,
): string[] {
  return [
    ...before.filter((line) => !isCopiedLine(line)),
    ...lines,
    ...(mode === 'leaks' && !rebuilt ? after.filter(isCopiedLine) : []),
    ...(checkedAgain ? after : []),
  ];
}

/** Clears the dirty and corrupt bits of a v3 header (QEMU marks a repaired image clean). */
async function markClean(image: Qcow2CheckTarget, request: RequestOptions): Promise<void> {
  const { file } = image;
  const version = new DataView((await file.read(4, 4, request)).buffer).getUint32(0);
  if (version !== 3) return;
  const field = await file.read(INCOMPATIBLE_FEATURES_LOW_FIELD, 4, request);
  const view = new DataView(field.buffer, field.byteOffset, 4);
  const low = view.getUint32(0);
  if ((low & DIRTY_AND_CORRUPT) === 0) return;
  view.setUint32(0, (low & ~DIRTY_AND_CORRUPT) >>> 0);
  await file.write(INCOMPATIBLE_FEATURES_LOW_FIELD, field, request);
  await file.flush(request);
}
