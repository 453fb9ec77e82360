/**
 * Reading the internal snapshot table from an image file and finding a snapshot by id or name.
 */
import { type BlockDevice, BlockDeviceError } from '@qcowkit/blockdev';
import type { Qcow2Header } from '../format/header.js';
import {
  decodeSnapshotTable,
  QCOW_MAX_SNAPSHOTS_SIZE,
  type Qcow2SnapshotEntry,
} from '../format/snapshot-table.js';

/** Reads and decodes the snapshot table in growing chunks (never trusting a size from the file). */
export async function readSnapshotTable(
  file: BlockDevice,
  header: Qcow2Header,
): Promise<Qcow2SnapshotEntry[]> {
  if (header.nbSnapshots === 0) return [];
  const available = file.size - header.snapshotsOffset;
  let want = Math.min(available, 64 * 1024);
  for (;;) {
    const bytes = await file.read(header.snapshotsOffset, want);
    const result = decodeSnapshotTable(bytes, header.nbSnapshots, header.clusterSize, header.snapshotsOffset);
    if (result.kind === 'done') return result.entries;
    if (result.needBytes > available || result.needBytes > QCOW_MAX_SNAPSHOTS_SIZE) {
      throw new BlockDeviceError('ECORRUPT', 'snapshot table: runs past the end of the file', {
        offset: header.snapshotsOffset,
      });
    }
    want = Math.min(available, Math.max(result.needBytes, want * 2));
  }
}

/**
 * The snapshot with this id or name (with both given, both must match), or with `idOrName` as an
 * id, else as a name (QEMU's order).
 */
export function findSnapshot(
  entries: readonly Qcow2SnapshotEntry[],
  wanted: { id?: string; name?: string; idOrName?: string },
): Qcow2SnapshotEntry {
  if (wanted.idOrName !== undefined) {
    const key = wanted.idOrName;
    const found = entries.find((entry) => entry.id === key) ?? entries.find((entry) => entry.name === key);
    if (found === undefined)
      throw new BlockDeviceError('ENOENT', `snapshot: no snapshot with id or name '${key}'`);
    return found;
  }
  if (wanted.id === undefined && wanted.name === undefined) {
    throw new BlockDeviceError('EINVAL', 'snapshot: give an id or a name');
  }
  const found = entries.find(
    (entry) =>
      (wanted.id === undefined || entry.id === wanted.id) &&
      (wanted.name === undefined || entry.name === wanted.name),
  );
  if (found === undefined) {
    const what = [
      wanted.id !== undefined ? `id '${wanted.id}'` : '',
      wanted.name !== undefined ? `name '${wanted.name}'` : '',
    ]
      .filter(Boolean)
      .join(' and ');
    throw new BlockDeviceError('ENOENT', `snapshot: no snapshot with ${what}`);
  }
  return found;
}
