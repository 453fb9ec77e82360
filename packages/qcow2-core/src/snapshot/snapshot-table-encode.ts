/**
 * Encoding the internal snapshot table (layout in format/snapshot-table.ts). Existing entries keep
 * their extra data byte for byte (unknown fields included); new entries get QEMU's 24 bytes:
 * vm_state_size_large, disk_size, icount (0, as qemu-img snapshot writes).
 */
import { BlockDeviceError } from '@qcowkit/blockdev';
import { encodeText } from '../format/binary.js';
import { QCOW_MAX_SNAPSHOTS_SIZE, type Qcow2SnapshotEntry } from '../format/snapshot-table.js';

const FIXED_ENTRY_SIZE = 40;
/** Size of the extra data QEMU writes for a new snapshot. */
export const SNAPSHOT_EXTRA_DATA_SIZE = 24;

/** The fields of a snapshot table entry to encode. */
export type SnapshotEntryFields = Pick<
  Qcow2SnapshotEntry,
  | 'l1TableOffset'
  | 'l1Size'
  | 'id'
  | 'name'
  | 'dateSec'
  | 'dateNsec'
  | 'vmClockNsec'
  | 'vmStateSize'
  | 'extraData'
>;

function setU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, Math.floor(value / 0x1_0000_0000));
  view.setUint32(at + 4, value >>> 0);
}

/** Extra data for a new entry. */
export function newSnapshotExtraData(diskSize: number, vmStateSize = 0): Uint8Array {
  const extra = new Uint8Array(SNAPSHOT_EXTRA_DATA_SIZE);
  const view = new DataView(extra.buffer);
  setU64(view, 0, vmStateSize);
  setU64(view, 8, diskSize);
  return extra;
}

/** The table bytes for `entries`, each padded to 8 bytes. */
export function encodeSnapshotTable(entries: readonly SnapshotEntryFields[]): Uint8Array {
  const parts = entries.map((entry) => {
    const id = encodeText(entry.id);
    const name = encodeText(entry.name);
    if (id.length > 0xffff || name.length > 0xffff) {
      throw new BlockDeviceError('EINVAL', `snapshot: id or name of '${entry.name}' is too long`);
    }
    const size = Math.ceil((FIXED_ENTRY_SIZE + entry.extraData.length + id.length + name.length) / 8) * 8;
    const bytes = new Uint8Array(size);
    const view = new DataView(bytes.buffer);
    setU64(view, 0, entry.l1TableOffset);
    view.setUint32(8, entry.l1Size);
    view.setUint16(12, id.length);
    view.setUint16(14, name.length);
    view.setUint32(16, entry.dateSec);
    view.setUint32(20, entry.dateNsec);
    setU64(view, 24, entry.vmClockNsec);
    view.setUint32(32, entry.vmStateSize > 0xffff_ffff ? 0 : entry.vmStateSize);
    view.setUint32(36, entry.extraData.length);
    bytes.set(entry.extraData, FIXED_ENTRY_SIZE);
    bytes.set(id, FIXED_ENTRY_SIZE + entry.extraData.length);
    bytes.set(name, FIXED_ENTRY_SIZE + entry.extraData.length + id.length);
    return bytes;
  });
  const total = parts.reduce((sum, part) => sum + part.length, 0);
  if (total > QCOW_MAX_SNAPSHOTS_SIZE) {
    throw new BlockDeviceError(
      'EUNSUPPORTED',
      `snapshot table: ${total} bytes exceed ${QCOW_MAX_SNAPSHOTS_SIZE}`,
    );
  }
  const table = new Uint8Array(total);
  let at = 0;
  for (const part of parts) {
    table.set(part, at);
    at += part.length;
  }
  return table;
}
