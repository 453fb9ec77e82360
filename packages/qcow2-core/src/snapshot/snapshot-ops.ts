/**
 * Internal snapshots: create, apply (revert), delete, list, on an image file, as `qemu-img
 * snapshot -c | -a | -d | -l` does. Each operation plans its refcounts in memory (ImageEdit) and
 * writes in the crash-safe order: refcounts raised before the snapshot table or the active L1
 * table points at anything new, lowered only after nothing points at it any more.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import { hasPersistentBitmaps } from '../bitmaps/resize-with-bitmaps.js';
import { loadHeader } from '../check/check.js';
import { QCOW_MAX_SNAPSHOTS } from '../format/geometry.js';
import { QCOW_OFLAG_COPIED_HIGH } from '../format/l1-entry.js';
import type { Qcow2SnapshotEntry } from '../format/snapshot-table.js';
import { ImageEdit, type ImageEditOptions, setU64 } from '../ops/image-edit.js';
import { addTreeReferences, canShareTree } from '../ops/tree-references.js';
import { findSnapshot, readSnapshotTable } from './snapshot-list.js';
import {
  encodeSnapshotTable,
  newSnapshotExtraData,
  type SnapshotEntryFields,
} from './snapshot-table-encode.js';

/** Header fields: nb_snapshots (u32 at 60) then snapshots_offset (u64 at 64). */
const NB_SNAPSHOTS_FIELD = 60;
/** Header fields: l1_size (u32 at 36) then l1_table_offset (u64 at 40). */
const L1_SIZE_FIELD = 36;
/** Header field: size (u64 at 24). */
const SIZE_FIELD = 24;

export interface SnapshotCreateOptions extends ImageEditOptions {
  /** When the snapshot was taken (default: now). */
  readonly date?: Date;
}

/** The snapshots of an image file (its snapshot table, decoded); the file may be read-only. */
export async function listSnapshots(file: BlockDevice): Promise<Qcow2SnapshotEntry[]> {
  return readSnapshotTable(file, await loadHeader(file, {}));
}

/** Writes a new snapshot table (refcounted first), points the header at it, frees the old one. */
async function replaceSnapshotTable(edit: ImageEdit, entries: readonly SnapshotEntryFields[]): Promise<void> {
  const { header, clusterSize } = edit;
  const oldEntries = await readSnapshotTable(edit.file, header);
  const oldSize = oldEntries.length === 0 ? 0 : encodeSnapshotTable(oldEntries).length;
  const table = encodeSnapshotTable(entries);
  const tableOffset = table.length === 0 ? 0 : edit.allocate(Math.ceil(table.length / clusterSize));
  if (table.length > 0) {
    await edit.write(tableOffset, table);
    await edit.flush();
  }
  await edit.commitRefcounts();
  const field = new Uint8Array(12);
  const view = new DataView(field.buffer);
  view.setUint32(0, entries.length);
  setU64(view, 4, tableOffset);
  const oldOffset = header.snapshotsOffset;
  await edit.writeHeader(NB_SNAPSHOTS_FIELD, field);
  if (header.nbSnapshots > 0) edit.addReferences(oldOffset, oldSize, -1);
}

/** The L1 table at `offset` with COPIED cleared (snapshot tables never carry it). */
async function readL1WithoutCopied(file: BlockDevice, offset: number, l1Size: number): Promise<Uint8Array> {
  const l1 = await file.read(offset, l1Size * 8);
  const view = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  for (let i = 0; i < l1Size; i++)
    view.setUint32(i * 8, (view.getUint32(i * 8) & ~QCOW_OFLAG_COPIED_HIGH) >>> 0);
  return l1;
}

/** Creates an internal snapshot of the current state; returns its entry. */
export async function createSnapshot(
  file: BlockDevice,
  name: string,
  options: SnapshotCreateOptions = {},
): Promise<Qcow2SnapshotEntry> {
  const edit = await ImageEdit.open(file, options);
  const { header, clusterSize } = edit;
  if (edit.hasDataFile) {
    throw new BlockDeviceError(
      'EUNSUPPORTED',
      'snapshot: internal snapshots are not supported with an external data file (as in QEMU)',
    );
  }
  const entries = await readSnapshotTable(file, header);
  if (entries.length >= QCOW_MAX_SNAPSHOTS) {
    throw new BlockDeviceError('EUNSUPPORTED', `snapshot: the image already has ${entries.length} snapshots`);
  }
  const id = String(entries.reduce((max, entry) => Math.max(max, Number.parseInt(entry.id, 10) || 0), 0) + 1);
  const date = options.date ?? new Date();
  const ms = date.getTime();

  // 1. Plan: the L1 copy and one more reference to everything the active L1 reaches.
  const l1Bytes = header.l1Size * 8;
  const l1Offset = l1Bytes === 0 ? 0 : edit.allocate(Math.ceil(l1Bytes / clusterSize));
  // When no refcount can overflow, the same pass clears COPIED in the active tables (every
  // cluster they reach is about to be shared: writes to them copy from now on); otherwise the
  // counting comes first, so an overflow is refused before anything is written.
  const oneWalk = canShareTree(edit);
  await addTreeReferences(edit, header.l1TableOffset, header.l1Size, 1, { clearCopied: oneWalk });
  // 2. The copy; COPIED cleared (durable with the copy) before the refcounts rise; then the
  // refcounts, durable before the table names the copy.
  if (l1Bytes > 0) {
    await edit.write(l1Offset, await readL1WithoutCopied(file, header.l1TableOffset, header.l1Size));
    await edit.flush();
  }
  if (!oneWalk) await edit.fixCopiedFlags(true);
  await edit.commitRefcounts();
  // 3. The new table, the header switch, then the old table freed.
  const entry: SnapshotEntryFields = {
    l1TableOffset: l1Offset,
    l1Size: header.l1Size,
    id,
    name,
    dateSec: Math.floor(ms / 1000),
    dateNsec: (ms % 1000) * 1_000_000,
    vmClockNsec: 0,
    vmStateSize: 0,
    extraData: newSnapshotExtraData(header.size),
  };
  await replaceSnapshotTable(edit, [...entries, entry]);
  await edit.commitRefcounts();
  const after = await readSnapshotTable(file, edit.header);
  return after[after.length - 1]!;
}

/** Deletes the snapshot with this id or name (an id first, as QEMU looks). */
export async function deleteSnapshot(
  file: BlockDevice,
  idOrName: string,
  options: ImageEditOptions = {},
): Promise<void> {
  const edit = await ImageEdit.open(file, options);
  const entries = await readSnapshotTable(file, edit.header);
  const victim = findSnapshot(entries, { idOrName });
  // 1. The table without it (after this, its tables are only leaks until freed).
  await replaceSnapshotTable(
    edit,
    entries.filter((entry) => entry !== victim),
  );
  // 2. Its references dropped, its L1 table freed, COPIED restored where clusters are no longer shared.
  await addTreeReferences(edit, victim.l1TableOffset, victim.l1Size, -1);
  edit.addReferences(victim.l1TableOffset, victim.l1Size * 8, -1);
  await edit.commitRefcounts();
  await edit.fixCopiedFlags();
}

/** Reverts the image to the snapshot with this id or name: its data and its guest size. */
export async function applySnapshot(
  file: BlockDevice,
  idOrName: string,
  options: ImageEditOptions = {},
): Promise<void> {
  const edit = await ImageEdit.open(file, options);
  const { header, clusterSize } = edit;
  const entries = await readSnapshotTable(file, header);
  const target = findSnapshot(entries, { idOrName });
  // Reverting the data would make every persistent bitmap wrong: QEMU refuses while there is one.
  if (hasPersistentBitmaps(header)) {
    throw new BlockDeviceError(
      'EBUSY',
      `snapshot: cannot apply '${idOrName}': the image has persistent dirty bitmaps (remove them first)`,
    );
  }

  // 1. One more reference to everything the snapshot reaches (durable first).
  const grow = target.l1Size > header.l1Size;
  const newL1Size = Math.max(target.l1Size, header.l1Size);
  const newL1Offset = grow ? edit.allocate(Math.ceil((newL1Size * 8) / clusterSize)) : header.l1TableOffset;
  await addTreeReferences(edit, target.l1TableOffset, target.l1Size, 1);
  await edit.commitRefcounts();
  // 2. Planned (not yet written): the active L1's references dropped, read before it changes.
  await addTreeReferences(edit, header.l1TableOffset, header.l1Size, -1);
  // 3. The active L1 := the snapshot's (zero-padded), then the guest size.
  const l1 = new Uint8Array(newL1Size * 8);
  if (target.l1Size > 0) l1.set(await readL1WithoutCopied(file, target.l1TableOffset, target.l1Size));
  await edit.write(newL1Offset, l1);
  await edit.flush();
  if (grow) {
    const field = new Uint8Array(12);
    const view = new DataView(field.buffer);
    view.setUint32(0, newL1Size);
    setU64(view, 4, newL1Offset);
    await edit.writeHeader(L1_SIZE_FIELD, field);
    edit.addReferences(header.l1TableOffset, header.l1Size * 8, -1);
  }
  const diskSize = target.diskSize ?? header.size;
  if (diskSize !== header.size) {
    const field = new Uint8Array(8);
    setU64(new DataView(field.buffer), 0, diskSize);
    await edit.writeHeader(SIZE_FIELD, field);
  }
  // 4. Refcounts lowered, then COPIED set where clusters are no longer shared.
  await edit.commitRefcounts();
  await edit.fixCopiedFlags();
}
